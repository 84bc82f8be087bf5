"""The scheduler configurations of torch's own test/optim/test_lrscheduler.py against the jax_impl.schedules twins.

tests/torch_lrscheduler_configs.py holds them (derived from the file; see its docstring).  For each
configuration torch's scheduler runs on a real torch optimizer with the test's param groups (a float
lr and a float32 tensor lr), and each group's lr after construction and after every step must equal
the twin's table bit for bit; where torch raises (at construction or at a step) the twin must raise
the same error type with the same message, at the same point.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl import schedules as S
from torch_lrscheduler_configs import CONFIGS, PLATEAU, TENSOR, plateau_kwargs

OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def _lr(spec):
    return torch.tensor(spec[1]) if isinstance(spec, tuple) and spec[0] == TENSOR else spec


def _optimizer(config) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": _lr(spec)} for spec in config.groups]
    return OPTIMIZERS[config.optimizer](groups, lr=float(_lr(config.groups[0])))


def run_torch(config):
    """Each group's lr after construction and each round of steps, and what torch raised (or None)."""
    optimizer = _optimizer(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the epoch-argument deprecation, the step-order warnings
        try:
            made = config.torch(optimizer)
        except Exception as error:  # noqa: BLE001
            return None, error
        schedulers, rounds = made[0], made[1]
        optimizer = made[2] if len(made) > 2 else optimizer
        lrs = [[float(group["lr"])] for group in optimizer.param_groups]
        for calls in rounds:
            optimizer.step()
            try:
                for index, epoch in calls:
                    schedulers[index].step() if epoch is None else schedulers[index].step(epoch)
            except Exception as error:  # noqa: BLE001
                return lrs, error
            for values, group in zip(lrs, optimizer.param_groups):
                values.append(float(group["lr"]))
    return lrs, None


def run_twin(config, g):
    try:
        schedule = config.twin(_lr(config.groups[g]), g)
    except Exception as error:  # noqa: BLE001
        return None, error
    return schedule.table, schedule.error


def verdict(config) -> tuple[str, str]:
    """("bitwise" | "refused as torch" | "DIFFERS", detail) for one configuration, all its param groups."""
    torch_lrs, torch_error = run_torch(config)
    details = []
    for g in range(len(config.groups)):
        table, twin_error = run_twin(config, g)
        if torch_error is None and twin_error is not None and table is None:
            return "DIFFERS", f"group {g}: the twin refused ({twin_error!r}), torch did not"
        if torch_error is not None and twin_error is None:
            return "DIFFERS", f"group {g}: torch raised {torch_error!r}, the twin did not"
        if torch_error is not None and (type(torch_error) is not type(twin_error)
                                        or str(torch_error) != str(twin_error)):
            return "DIFFERS", f"group {g}: torch raised {torch_error!r}, twin {twin_error!r}"
        if torch_lrs is None:
            if table is not None:
                return "DIFFERS", f"group {g}: torch refused, the twin built a table"
            continue
        if table is None:
            return "DIFFERS", f"group {g}: the twin refused ({twin_error!r}), torch did not"
        expected = np.asarray(torch_lrs[g], dtype=np.float64)
        got = np.asarray(table[:len(expected)], dtype=np.float64)
        if len(table) < len(expected) or (torch_error is not None and len(table) != len(expected)):
            return "DIFFERS", f"group {g}: twin table has {len(table)} entries, torch {len(expected)}"
        differ = np.flatnonzero(expected.view(np.int64) != got.view(np.int64))
        if differ.size:
            i = differ[0]
            return "DIFFERS", f"group {g}: first at count {i}: twin {got[i]!r}, torch {expected[i]!r}"
        details.append(f"{len(expected)} lrs")
    if torch_lrs is None:
        return "refused as torch", f"{type(torch_error).__name__}: {torch_error}"
    if torch_error is not None:
        return "bitwise", f"{details[0]}, then torch and the twin raise {type(torch_error).__name__}: {torch_error}"
    return "bitwise", ", ".join(sorted(set(details)))


@pytest.fixture(autouse=True)
def _short_tables(monkeypatch):
    # The tables' first entries do not depend on their length: 10,000 counts (not 100,000) keep this fast.
    monkeypatch.setattr(S, "DEFAULT_HORIZON", 10_000)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{i}-{c.test}" for i, c in enumerate(CONFIGS)])
def test_torch_configuration(config):
    result, detail = verdict(config)
    assert result == ("refused as torch" if config.raises else "bitwise"), detail


def _plateau_lrs(kwargs, metrics, lr, g, jit=False):
    tx = S.reduce_lr_on_plateau(lr, **plateau_kwargs(kwargs, g))
    state = tx.init(None)
    step = lambda s, value: tx.update({"w": jnp.ones(2)}, s, value=value)  # noqa: E731
    step = jax.jit(step) if jit else step
    lrs = [float(state.lr)]
    for metric in metrics:
        _, state = step(state, metric)
        lrs.append(float(state.lr))
    return lrs


@pytest.mark.parametrize("name, kwargs, metrics, groups", PLATEAU, ids=[p[0] for p in PLATEAU])
def test_reduce_lr_on_plateau_transformation_is_torch(name, kwargs, metrics, groups, x64):
    """The optax transformation fed the test's metrics: state.lr is torch's lr bit for bit (x64; op by op,
    the next test compiles it)."""
    config = next(c for c in CONFIGS if c.test == name)
    torch_lrs, error = run_torch(config)
    assert error is None
    for g in range(len(groups)):
        assert _plateau_lrs(kwargs, metrics, _lr(groups[g]), g) == torch_lrs[g]


JITTED = [PLATEAU[i] for i in (1, 4, 7)]  # abs/min, rel/max with cooldown, per-group min_lr: compiling costs ~1 s each


@pytest.mark.parametrize("name, kwargs, metrics, groups", JITTED, ids=[p[0] for p in JITTED])
def test_reduce_lr_on_plateau_without_x64_is_torchs_float32(name, kwargs, metrics, groups):
    """Without x64, under jit (the comparisons on the host): float32 metrics (torch fed the same values),
    torch's decisions, its lr rounded once to float32."""
    assert not jax.config.jax_enable_x64
    metrics = [float(np.float32(m)) for m in metrics]
    config = next(c for c in CONFIGS if c.test == name)
    optimizer = _optimizer(config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
    expected = [[float(np.float32(group["lr"]))] for group in optimizer.param_groups]
    for metric in metrics:
        scheduler.step(metric)
        for values, group in zip(expected, optimizer.param_groups):
            values.append(float(np.float32(group["lr"])))
    for g in range(len(groups)):
        assert _plateau_lrs(kwargs, metrics, _lr(groups[g]), g, jit=True) == expected[g]


def report() -> str:
    """Markdown: torch scheduler class x configurations x verdict (``python tests/jax_impl_tests/<this file>``)."""
    from collections import defaultdict

    from torch_lrscheduler_configs import NOT_TWINNED

    S.DEFAULT_HORIZON = 10_000
    rows, off = defaultdict(lambda: defaultdict(int)), []
    for config in CONFIGS:
        result, detail = verdict(config)
        rows[config.classes][result] += 1
        rows[config.classes]["raises later"] += result == "bitwise" and "then torch and the twin raise" in detail
        if result == "DIFFERS":
            off.append(f"- {config.test}: {detail}")
    lines = ["| torch scheduler class(es) | configurations | bitwise | of which: then raise as torch | refused as torch "
             "| differs |", "|---|---|---|---|---|---|"]
    n = lambda r: r["bitwise"] + r["refused as torch"] + r["DIFFERS"]  # noqa: E731
    for classes in sorted(rows):
        r = rows[classes]
        lines.append(f"| {classes} | {n(r)} | {r['bitwise']} | {r['raises later']} | {r['refused as torch']} "
                     f"| {r['DIFFERS']} |")
    total = defaultdict(int)
    for r in rows.values():
        for k, v in r.items():
            total[k] += v
    lines.append(f"| **all** | **{n(total)}** | **{total['bitwise']}** | **{total['raises later']}** "
                 f"| **{total['refused as torch']}** | **{total['DIFFERS']}** |")
    lines += ["", "Not bitwise:" if off else "Not bitwise: none."] + off
    lines += ["", "Not twinned (no one-param-group scheduler configuration):"]
    lines += [f"- {test}: {why}" for test, why in NOT_TWINNED.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
