"""``python -m crosscheck schedules``: torch's lr schedulers against their ``jax_impl.schedules`` twins and optax.

For each case the torch scheduler runs on a one-parameter optimizer and is
stepped after every ``optimizer.step()``; the lr of update ``c + 1`` (0-based
count ``c``) is compared with the JAX schedule at count ``c``: its float64
table (must be bitwise torch's Python float), the value it gives under
``jax.jit`` (float32 without x64: must be torch's float rounded once), and the
nearest optax schedule, whose max difference, first parting step and best
count offset (optax counts updates from 0, torch scheduler steps from its
construction) are reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from crosscheck.common import interrupt
from jax_impl import schedules as S

LR = 0.1
# optax computes in float32, a few ulps (~1e-6 relative) from torch's doubles
# at best; "parting" means a material difference, well above that.
PARTING_RTOL = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    torch: Callable[[torch.optim.Optimizer, int], object]  # (optimizer, steps) -> scheduler
    jax: Callable[[int], S.TorchSchedule]  # horizon -> schedule
    optax: Callable[[int], optax.Schedule] | None  # steps -> nearest optax schedule
    optax_name: str = "-"


def _lambda(epoch: int) -> float:
    return 1.0 / (1.0 + 0.01 * epoch)


T = torch.optim.lr_scheduler
CASES = (
    Case("step_lr(step_size=30, gamma=0.1)", lambda o, n: T.StepLR(o, 30, 0.1),
         lambda h: S.step_lr(LR, 30, 0.1, horizon=h),
         lambda n: optax.exponential_decay(LR, 30, 0.1, staircase=True), "exponential_decay(staircase)"),
    Case("multi_step_lr([300, 800, 2000])", lambda o, n: T.MultiStepLR(o, [300, 800, 2000], 0.5),
         lambda h: S.multi_step_lr(LR, [300, 800, 2000], 0.5, horizon=h),
         lambda n: optax.piecewise_constant_schedule(LR, {300: 0.5, 800: 0.5, 2000: 0.5}),
         "piecewise_constant_schedule"),
    Case("exponential_lr(gamma=0.999)", lambda o, n: T.ExponentialLR(o, 0.999),
         lambda h: S.exponential_lr(LR, 0.999, horizon=h), lambda n: optax.exponential_decay(LR, 1, 0.999),
         "exponential_decay"),
    Case("cosine_annealing_lr(T_max=steps, eta_min=1e-4)", lambda o, n: T.CosineAnnealingLR(o, n, 1e-4),
         lambda h: S.cosine_annealing_lr(LR, h - 1, 1e-4, horizon=h),
         lambda n: optax.cosine_decay_schedule(LR, n, alpha=1e-4 / LR), "cosine_decay_schedule"),
    Case("cosine_annealing_lr closed form", lambda o, n: T.CosineAnnealingLR(o, n, 1e-4),
         lambda h: S.cosine_annealing_lr(LR, h - 1, 1e-4, closed_form=True, horizon=h), None),
    Case("cosine_annealing_warm_restarts(T_0=100, T_mult=2)",
         lambda o, n: T.CosineAnnealingWarmRestarts(o, 100, 2, 1e-5),
         lambda h: S.cosine_annealing_warm_restarts(LR, 100, 2, 1e-5, horizon=h),
         lambda n: optax.sgdr_schedule([{"init_value": LR, "peak_value": LR, "decay_steps": 100 * 2 ** i,
                                         "warmup_steps": 0, "end_value": 1e-5} for i in range(8)]),
         "sgdr_schedule"),
    Case("linear_lr(0.01 -> 1, 500 steps)", lambda o, n: T.LinearLR(o, 0.01, 1.0, 500),
         lambda h: S.linear_lr(LR, 0.01, 1.0, 500, horizon=h),
         lambda n: optax.linear_schedule(LR * 0.01, LR, 500), "linear_schedule"),
    Case("constant_lr(factor=0.5, 500 steps)", lambda o, n: T.ConstantLR(o, 0.5, 500),
         lambda h: S.constant_lr(LR, 0.5, 500, horizon=h),
         lambda n: optax.piecewise_constant_schedule(LR * 0.5, {500: 2.0}), "piecewise_constant_schedule"),
    Case("polynomial_lr(steps, power=2)", lambda o, n: T.PolynomialLR(o, n, 2.0),
         lambda h: S.polynomial_lr(LR, h - 1, 2.0, horizon=h),
         lambda n: optax.polynomial_schedule(LR, 0.0, 2.0, n), "polynomial_schedule"),
    Case("one_cycle_lr(max_lr, total_steps=steps)",
         lambda o, n: T.OneCycleLR(o, LR, total_steps=n, cycle_momentum=False),
         lambda h: S.one_cycle_lr(LR, h - 1, horizon=h),
         lambda n: optax.cosine_onecycle_schedule(n, LR, 0.3, 25.0, 1e4), "cosine_onecycle_schedule"),
    Case("lambda_lr(1 / (1 + 0.01 t))", lambda o, n: T.LambdaLR(o, _lambda),
         lambda h: S.lambda_lr(LR, _lambda, horizon=h), None),
    Case("sequential_lr(linear warmup 100, cosine)",
         lambda o, n: T.SequentialLR(o, [T.LinearLR(o, 0.01, 1.0, 100), T.CosineAnnealingLR(o, n - 100)], [100]),
         lambda h: S.sequential_lr(LR, [S.linear_lr(LR, 0.01, 1.0, 100), S.cosine_annealing_lr(LR, h - 101)], [100],
                                   horizon=h),
         lambda n: optax.warmup_cosine_decay_schedule(LR * 0.01, LR, 100, n), "warmup_cosine_decay_schedule"),
)


def torch_lrs(case: Case, steps: int) -> np.ndarray:
    """The lr torch uses for updates 1..steps (index = update count before it)."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=LR)
    scheduler = case.torch(optimizer, steps)
    values = []
    param.grad = torch.zeros(1)
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.asarray(values, dtype=np.float64)


def _parting(a: np.ndarray, b: np.ndarray, rtol: float) -> int | None:
    diff = np.abs(a - b) > rtol * np.maximum(np.abs(a), np.abs(b))
    return int(np.argmax(diff)) if diff.any() else None


def compare(case: Case, steps: int) -> dict:
    expected = torch_lrs(case, steps)
    schedule = case.jax(steps + 1)
    table = schedule.table[:steps]
    counts = jnp.arange(steps)
    jitted = np.asarray(jax.jit(jax.vmap(schedule))(counts), dtype=np.float64)
    rounded = expected.astype(jnp.float64 if jax.config.jax_enable_x64 else np.float32).astype(np.float64)
    row = {"case": case.name, "steps": steps,
           "table_max_abs": float(np.max(np.abs(table - expected))),
           "table_bitwise": bool(np.array_equal(table, expected)),
           "table_first_diff": _parting(table, expected, 0.0),
           "jit_bitwise": bool(np.array_equal(jitted, rounded)),
           "optax": case.optax_name}
    if case.optax is not None:
        opt = case.optax(steps)
        shifted = {}
        table_of = jax.jit(jax.vmap(opt))
        for shift in (-1, 0, 1):
            values = np.asarray(table_of(jnp.maximum(counts + shift, 0)), dtype=np.float64)
            rel = np.abs(values - expected) / np.maximum(np.abs(expected), 1e-30)
            shifted[shift] = (float(np.max(rel)), values)
        best = min(shifted, key=lambda s: shifted[s][0])
        values = shifted[0][1]
        row.update({"optax_max_abs": float(np.max(np.abs(values - expected))),
                    "optax_max_rel": shifted[0][0],
                    "optax_first_parting_step": _parting(values, expected, PARTING_RTOL),
                    "optax_best_offset": best, "optax_max_rel_at_best_offset": shifted[best][0]})
        row["_optax_values"] = values
    row["_torch"], row["_jax"] = expected, table
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| torch scheduler (`jax_impl.schedules`) | steps | JAX table vs torch | under jit | nearest optax | "
             "optax max rel. diff | optax parts (rel. > 1e-4) at count | optax best count offset |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table = "**bitwise**" if r["table_bitwise"] else f"max {r['table_max_abs']:.3g} from count {r['table_first_diff']}"
        jit = "bitwise (float32 of torch's)" if r["jit_bitwise"] else "differs"
        if r.get("optax_max_rel") is None:
            optax_cols = "- | - | - | -"
        else:
            offset = r["optax_best_offset"]
            offset_text = "0" if offset == 0 else f"{offset:+d} (then {r['optax_max_rel_at_best_offset']:.2g})"
            optax_cols = (f"`{r['optax']}` | {r['optax_max_rel']:.3g} | {r['optax_first_parting_step']} | "
                          f"{offset_text}")
        lines.append(f"| {r['case']} | {r['steps']} | {table} | {jit} | {optax_cols} |")
    return "\n".join(lines) + "\n"


# One colour per implementation in both rows of panels (a difference has the colour of the side that is not torch).
COLORS = {"torch": "tab:blue", "jax_impl": "tab:orange", "optax": "tab:green"}


def figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    n = len(rows)
    fig, axes = plt.subplots(2 * math.ceil(n / cols), cols, figsize=(5 * cols, 5 * math.ceil(n / cols)),
                             squeeze=False)
    for i, r in enumerate(rows):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        x = np.arange(len(r["_torch"]))
        top.plot(x, r["_torch"], label="torch", lw=2, color=COLORS["torch"])
        top.plot(x, r["_jax"], "--", label="jax_impl.schedules", lw=1, color=COLORS["jax_impl"])
        if "_optax_values" in r:
            top.plot(x, r["_optax_values"], ":", label=f"optax.{r['optax']}", lw=1, color=COLORS["optax"])
            bottom.plot(x, np.abs(r["_optax_values"] - r["_torch"]), label="|optax - torch|", lw=1,
                        color=COLORS["optax"])
        bottom.plot(x, np.abs(r["_jax"] - r["_torch"]), label="|jax_impl - torch|", lw=1, color=COLORS["jax_impl"])
        top.set_title(r["case"], fontsize=8)
        top.legend(fontsize=6)
        bottom.set_yscale("symlog", linthresh=1e-12)
        bottom.set_xlabel("update count")
        bottom.legend(fontsize=6)
    for i in range(n, axes.shape[0] // 2 * cols):
        axes[2 * (i // cols), i % cols].axis("off")
        axes[2 * (i // cols) + 1, i % cols].axis("off")
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path) -> None:
    from crosscheck.common.report import write_report

    write_report({}, path, figure(rows), dpi=80)


def run(steps: int, out=None) -> tuple[list[dict], bool]:
    """Compare every case over ``steps`` counts; with ``out``, write report.json, report.md, schedules.png there."""
    if steps < 200:
        raise ValueError(f"invalid steps: {steps} (at least 200: the cases have milestones up to 100 and 500)")
    if out is not None:
        from crosscheck.common.report import check_output_dir

        check_output_dir(out)
    rows = []
    for case in CASES:
        interrupt.check()
        rows.append(compare(case, steps))
    if out is not None:
        from pathlib import Path

        from crosscheck.common.report import (report_errors, strict_json,
                                              write_report)

        out = Path(out)
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        text_json, text_md = strict_json({"passed": _passed(rows), "cases": public}), markdown(rows)
        with report_errors(out):
            write_report({out / "report.json": text_json, out / "report.md": text_md}, out / "schedules.png",
                         figure(rows), dpi=80)
    return rows, _passed(rows)


def _passed(rows: list[dict]) -> bool:
    """Every recursive twin bitwise; the closed form is reported, not required (it rounds differently)."""
    return all(r["table_bitwise"] and r["jit_bitwise"] for r in rows if "closed form" not in r["case"])
