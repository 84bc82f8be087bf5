"""jax_impl.schedules equal torch's lr schedulers bit for bit, and keep jax_impl.adamw bitwise without x64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_impl
from crosscheck import cli
from crosscheck.recipes import schedules as check
from crosscheck.common.metrics import distance
from jax_impl import schedules as S


@pytest.mark.parametrize("case", check.CASES, ids=[c.name for c in check.CASES])
def test_twin_is_torch_for_10000_steps(case):
    expected = check.torch_lrs(case, 10_000)
    table = case.jax(10_001).table[:10_000]
    if "closed form" in case.name:
        # torch steps CosineAnnealingLR recursively: the closed form is a few ulps off.
        assert np.max(np.abs(table - expected)) < 1e-15
    else:
        first = np.flatnonzero(table != expected)
        assert first.size == 0, f"first differing count {first[0]}: {table[first[0]]!r} vs torch {expected[first[0]]!r}"


@pytest.mark.parametrize("make_torch, make_jax", [
    (lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.LinearLR(o, 0.01, 1.0, 50),
                                                         torch.optim.lr_scheduler.CosineAnnealingLR(o, 250)], [50]),
     lambda: S.sequential_lr(0.01, [S.linear_lr(0.01, 0.01, 1.0, 50), S.cosine_annealing_lr(0.01, 250)], [50])),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 40, 2, 1e-4),
     lambda: S.cosine_annealing_warm_restarts(0.01, 40, 2, 1e-4)),
    (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.01, total_steps=300, cycle_momentum=False),
     lambda: S.one_cycle_lr(0.01, 300)),
    (lambda o: torch.optim.lr_scheduler.StepLR(o, 25, 0.5), lambda: S.step_lr(0.01, 25, 0.5)),
], ids=["warmup+cosine", "warm restarts", "one cycle", "step"])
def test_adamw_with_schedule_is_bitwise_without_x64(make_torch, make_jax):
    """jax_impl.adamw takes each step's scalars from the float64 table, as torch's kernel from the Python float."""
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    shapes = [(33,), (4, 3, 3, 3), (), (7,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    optimizer = torch.optim.AdamW(tensors, lr=0.01, fused=True)
    scheduler = make_torch(optimizer)
    tx = jax_impl.adamw(make_jax())
    leaves, state = [jnp.asarray(p) for p in params], None
    state = tx.init(leaves)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for _ in range(300):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        optimizer.step()
        scheduler.step()
        leaves, state = step([jnp.asarray(g) for g in grads], state, leaves)
    assert [int(distance(np.asarray(a), b.detach().numpy()).max_ulps) for a, b in zip(leaves, tensors)] == [0] * 4


def test_schedule_is_an_optax_schedule_under_jit():
    schedule = S.multi_step_lr(0.1, [3, 6], 0.9, horizon=10)  # steady after 6: holds past the table
    values = jax.jit(jax.vmap(schedule))(jnp.arange(12))
    np.testing.assert_array_equal(np.asarray(values), np.float32(schedule.table[np.minimum(np.arange(12), 9)]))


@pytest.mark.parametrize("make, message", [
    (lambda: S.cosine_annealing_lr(0.1, 0), r"Invalid T_max: 0"),
    (lambda: S.cosine_annealing_lr(-0.1, 10), r"Invalid lr: -0.1"),
    (lambda: S.multi_step_lr(0.1, [30, 10]), r"Invalid milestones: \[30, 10\]"),
    (lambda: S.one_cycle_lr(0.1, 100, horizon=500), r"Invalid horizon: 500 steps asked for, but total_steps=100"),
    (lambda: S.step_lr(0.1, 0), r"Invalid step_size: 0"),
    (lambda: S.linear_lr(0.1, start_factor=0.0), r"Starting multiplicative factor expected to be greater than 0"),
    (lambda: S.sequential_lr(0.1, [S.step_lr(0.1, 5)], [10]), r"one more than the number of milestone points, but "
                                                              r"got number of schedulers 1 and the number of milestones "
                                                              r"to be equal to 1"),
    (lambda: S.sequential_lr(0.1, [S.step_lr(0.2, 5), S.step_lr(0.1, 5)], [10]), r"schedulers\[0\]: built with lr=0.2"),
])
def test_bad_arguments_name_themselves(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_cli_schedules(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path), "schedules", "--steps", "600"]) == 0
    out = capsys.readouterr().out
    assert out.count("**bitwise**") == len(check.CASES) - 1  # all but the closed form
    assert (tmp_path / "schedules.png").stat().st_size > 0
    assert cli.main(["schedules", "--steps", "10"]) == 2


# ------------------------------------------------------------------ torch's scheduler classes, all of them

import inspect  # noqa: E402
import warnings  # noqa: E402

T = torch.optim.lr_scheduler
TWINS = {"LambdaLR": "lambda_lr", "MultiplicativeLR": "multiplicative_lr", "StepLR": "step_lr",
         "MultiStepLR": "multi_step_lr", "ConstantLR": "constant_lr", "LinearLR": "linear_lr",
         "ExponentialLR": "exponential_lr", "SequentialLR": "sequential_lr", "PolynomialLR": "polynomial_lr",
         "CosineAnnealingLR": "cosine_annealing_lr", "ChainedScheduler": "chained_scheduler",
         "ReduceLROnPlateau": "reduce_lr_on_plateau", "CyclicLR": "cyclic_lr",
         "CosineAnnealingWarmRestarts": "cosine_annealing_warm_restarts", "OneCycleLR": "one_cycle_lr"}


def _torch_lrs(optimizer, scheduler, steps, step=None):
    lrs = [float(optimizer.param_groups[0]["lr"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            optimizer.step()
            scheduler.step() if step is None else step(scheduler, t)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
    return lrs


def _sgd(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("torch_class", sorted(set(T.__all__) - {"LRScheduler"}) + ["SWALR"])
def test_every_torch_scheduler_class_has_a_twin_with_its_arguments(torch_class):
    # Was: no twin for CyclicLR, MultiplicativeLR, ChainedScheduler, ReduceLROnPlateau, SWALR; one_cycle_lr
    # without epochs/steps_per_epoch, in another order.
    cls = torch.optim.swa_utils.SWALR if torch_class == "SWALR" else getattr(T, torch_class)
    twin = getattr(S, TWINS.get(torch_class, "swalr"))
    expected = [(p.name, p.default) for p in inspect.signature(cls).parameters.values()
                if p.name not in ("optimizer", "last_epoch")]
    got = [(p.name, p.default) for p in inspect.signature(twin).parameters.values()
           if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "lr"]
    assert got == expected


def test_nested_sequential_lr_is_torchs():
    # Was [0.1, 0.2, 0.02]: the outer SequentialLR undid the inner one, not the inner one's schedulers.
    c = lambda f, n: S.constant_lr(0.1, factor=f, total_iters=n)  # noqa: E731
    schedule = S.sequential_lr(0.1, [S.sequential_lr(0.1, [c(0.5, 2), c(0.2, 10)], [2])], [])
    o = _sgd()
    C = lambda f, n: T.ConstantLR(o, factor=f, total_iters=n)  # noqa: E731, N806
    expected = _torch_lrs(o, T.SequentialLR(o, [T.SequentialLR(o, [C(0.5, 2), C(0.2, 10)], [2])], []), 14)
    assert list(schedule.table[:15]) == expected
    assert expected[:3] == [0.05, 0.020000000000000004, 0.020000000000000004]


def test_a_float32_tensor_lr_computes_in_float32_as_torch():
    # Was: ValueError("Invalid lr: tensor(0.5000)").  torch computes group["lr"] * gamma on the tensor.
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.5))
    expected = _torch_lrs(o, T.CosineAnnealingLR(o, T_max=7, eta_min=1e-3), 30)
    table = S.cosine_annealing_lr(torch.tensor(0.5), T_max=7, eta_min=1e-3, horizon=31).table
    assert list(table) == expected
    assert list(table) != list(S.cosine_annealing_lr(0.5, T_max=7, eta_min=1e-3, horizon=31).table)  # not doubles


def test_two_schedulers_on_one_optimizer_and_chained_scheduler():
    o = _sgd()
    first, second = T.StepLR(o, 3, 0.5), T.ExponentialLR(o, 0.9)
    expected = _torch_lrs(o, None, 20, step=lambda _, t: (first.step(), second.step()))
    twin = S.chained_scheduler(0.1, [S.step_lr(0.1, 3, 0.5), S.exponential_lr(0.1, 0.9)], horizon=21)
    assert list(twin.table) == expected
    o = _sgd()
    assert _torch_lrs(o, T.ChainedScheduler([T.StepLR(o, 3, 0.5), T.ExponentialLR(o, 0.9)]), 20) == expected


def test_resuming_with_last_epoch():
    o = _sgd(0.02)
    o.param_groups[0]["initial_lr"] = 0.1
    expected = _torch_lrs(o, T.CosineAnnealingLR(o, 30, 1e-3, last_epoch=12), 25)
    assert list(S.cosine_annealing_lr(0.02, 30, 1e-3, last_epoch=12, initial_lr=0.1, horizon=26).table) == expected
    with pytest.raises(KeyError, match="param 'initial_lr' is not specified in param_groups\\[0\\]"):
        S.cosine_annealing_lr(0.02, 30, last_epoch=12)


def test_fractional_epochs():
    epochs = [i / 7 for i in range(60)]  # torch's per-batch CosineAnnealingWarmRestarts: step(epoch + i / iters)
    o = _sgd()
    expected = _torch_lrs(o, T.CosineAnnealingWarmRestarts(o, 3, 2, 1e-4), 60, step=lambda s, t: s.step(epochs[t]))
    assert list(S.cosine_annealing_warm_restarts(0.1, 3, 2, 1e-4, step_epochs=epochs).table) == expected


def test_one_cycle_lr_takes_epochs_and_steps_per_epoch_in_torchs_order():
    o = _sgd()
    expected = _torch_lrs(o, T.OneCycleLR(o, 0.3, None, 4, 5, 0.25, "linear", cycle_momentum=False), 20)
    schedule = S.one_cycle_lr(0.3, None, 4, 5, 0.25, "linear")
    assert list(schedule.table) == expected
    with pytest.raises(ValueError, match=r"no lr at count 21: torch raises ValueError: Tried to step 21 times"):
        schedule(21)


def test_constant_lr_factor_0_is_built_and_stops_where_torch_raises():
    # Was: a bare ZeroDivisionError while building.  torch builds it and raises at step total_iters.
    o = _sgd()
    scheduler = T.ConstantLR(o, factor=0, total_iters=4)
    expected = _torch_lrs(o, scheduler, 3)
    with pytest.raises(ZeroDivisionError):
        scheduler.step()
    schedule = S.constant_lr(0.1, factor=0, total_iters=4)
    assert list(schedule.table) == expected
    assert isinstance(schedule.error, ZeroDivisionError)
    with pytest.raises(ValueError, match=r"no lr at count 4: torch raises ZeroDivisionError: float division by zero"):
        schedule(4)


def test_linear_lr_total_iters_0_is_accepted_as_torch():
    # Was: ValueError("Invalid total_iters: 0").
    o = _sgd()
    expected = _torch_lrs(o, T.LinearLR(o, 0.25, 1.0, total_iters=0), 5)
    schedule = S.linear_lr(0.1, 0.25, 1.0, total_iters=0, horizon=6)
    assert list(schedule.table) == expected
    assert schedule.holds_beyond and expected[-1] == 0.1 * 0.25  # torch never leaves start_factor
