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
    (lambda: S.sequential_lr(0.1, [S.step_lr(0.2, 5), S.step_lr(0.1, 5)], [10]), r"schedules\[0\]: built with lr=0.2"),
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
