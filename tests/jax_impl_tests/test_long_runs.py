"""Counts past the tabulated ranges: bias correction past 2**22 steps, schedules past their tables."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_impl
from jax_impl import bias_correction as bc


def _torch_step_at(count, b1, b2, lr, p0, g, m0, v0):
    """torch.optim.AdamW(fused=True)'s update ``count + 1`` from the given state.

    torch's step is float32: past 2**24 it cannot count (2**24 + 1 rounds to 2**24), and a run
    that got there stays at step 2**24; a step set to a count above it reads as float32(count).
    """
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), weight_decay=1e-2, fused=True)
    opt.state[p] = {"step": torch.tensor(float(min(count, bc.TORCH_STEP_LIMIT)), dtype=torch.float32),
                    "exp_avg": torch.from_numpy(m0.copy()), "exp_avg_sq": torch.from_numpy(v0.copy())}
    p.grad = torch.from_numpy(g.copy())
    opt.step()
    state = opt.state[p]
    return p.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy()


@pytest.mark.parametrize("b1, b2, kernel", [(0.99999999, 0.999, "auto"), (0.9, 0.99999999, "auto"),
                                             (0.9, 0.9999999, "auto"), (0.99999999, 0.9999999, "xla")])
@pytest.mark.parametrize("count", [2**22, 2**23, 2**24 - 1, 2**24 + 1, 2**30])
def test_bias_correction_past_the_table_is_torchs(count, b1, b2, kernel):
    # Past 2**22 steps the tables end; the scalars are computed in the graph in float64,
    # as torch computes them (a float32 fallback gave -inf params for b1=0.99999999 and
    # was off by 0.5% for b2=0.9999999).
    assert count >= bc.MAX_TABLE_STEPS and not bc.is_saturated(bc.bias_correction(0.99999999))
    rng = np.random.default_rng(count)
    p0, g = rng.standard_normal(37).astype(np.float32), rng.standard_normal(37).astype(np.float32)
    m0 = (0.1 * rng.standard_normal(37)).astype(np.float32)
    v0 = (0.01 * rng.random(37)).astype(np.float32)
    want = _torch_step_at(count, b1, b2, 1e-3, p0, g, m0, v0)
    tx = jax_impl.adamw(1e-3, b1, b2, weight_decay=1e-2, kernel=kernel)
    view = jax_impl.AdamWState(count=jnp.asarray(count, jnp.int32), exp_avg=jnp.asarray(m0),
                               exp_avg_sq=jnp.asarray(v0), max_exp_avg_sq=None)
    state = jax_impl.from_torch_view(tx.init(jnp.asarray(p0)), view)
    params, state = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(jnp.asarray(g), state, jnp.asarray(p0))
    assert np.all(np.isfinite(np.asarray(params)))
    for got, expected in zip((params, state[0].mu, state[0].nu), want):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32), expected.view(np.uint32))


def test_in_graph_double_keeps_the_callers_dtypes():
    # The float64 scalars live inside the step only: without x64 everything the user sees stays float32.
    assert not jax.config.jax_enable_x64
    tx = jax_impl.adamw(1e-3, 0.99999999, 0.99999999)
    params = jnp.ones(3)
    moments, *rest = tx.init(params)
    state = (moments._replace(count=jnp.asarray(2**23, jnp.int32)), *rest)
    new_params, new_state = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(jnp.ones(3), state, params)
    assert new_params.dtype == jnp.float32 and new_state[0].mu.dtype == jnp.float32
    assert new_state[0].count.dtype == jnp.int32
    expected = 1.0 - math.pow(0.99999999, float(np.float32(2**23 + 1)))
    assert expected > 0.08  # far from 0: the float32 fallback had 1 - 0.99999999**t == 0 here (b1 ~ 1 - 1e-8 rounds to 1)


# ------------------------------------------------------------------ schedules past their tables

from jax_impl import schedules as S  # noqa: E402


def test_default_horizon_covers_the_arguments():
    # Was: the table stopped at 100,000 counts and held 5.0e-4 at count 150,000 (torch: 1.46e-4).
    schedule = S.cosine_annealing_lr(1e-3, T_max=200_000)
    assert schedule.horizon == 200_001
    closed = 1e-3 * (1 + math.cos(math.pi * 150_000 / 200_000)) / 2  # torch's recursion is within 1e-15 of it
    assert abs(float(schedule.table[150_000]) - closed) < 1e-15
    assert S.multi_step_lr(0.1, [10, 250_000]).horizon == 250_001
    assert S.linear_lr(0.1, total_iters=300_000).horizon == 300_001
    assert S.sequential_lr(0.1, [S.linear_lr(0.1, total_iters=10), S.cosine_annealing_lr(0.1, 150_000)],
                           [10]).horizon == 150_011


@pytest.mark.parametrize("make, count, expected", [
    (lambda: S.step_lr(0.1, 30, 0.1, horizon=20_000), 10**7, 0.0),  # underflows to 0 by count ~10,000
    (lambda: S.multi_step_lr(0.1, [5, 9], 0.5, horizon=20), 10**6, 0.025),
    (lambda: S.linear_lr(0.1, 0.5, 1.0, 8, horizon=20), 10**6, 0.1),
    (lambda: S.constant_lr(0.1, 0.5, 8, horizon=20), 10**6, 0.1),
])
def test_a_steady_schedule_holds_its_value_past_the_table(make, count, expected):
    schedule = make()
    assert schedule.holds_beyond
    assert float(schedule(count)) == np.float32(expected)
    assert float(jax.jit(schedule)(jnp.asarray(count))) == np.float32(expected)


@pytest.mark.parametrize("make", [
    lambda: S.exponential_lr(0.1, 0.9, horizon=10),
    lambda: S.step_lr(0.1, 3, 0.5, horizon=10),
    lambda: S.cosine_annealing_lr(0.1, 100, horizon=50),
    lambda: S.lambda_lr(0.1, lambda t: 1 / (1 + t), horizon=10),
])
def test_a_count_past_a_changing_schedule_raises_or_is_nan(make):
    schedule = make()
    assert not schedule.holds_beyond
    with pytest.raises(ValueError, match=rf"no lr at count {schedule.horizon}: the table covers counts "
                                         rf"0..{schedule.horizon - 1}"):
        schedule(schedule.horizon)
    values = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(schedule.horizon + 2)))
    np.testing.assert_array_equal(values[:-2], np.float32(schedule.table))
    assert np.isnan(values[-2:]).all()


def _at_count(state, count: int):
    """``state`` after ``count`` updates (the moments' count and the schedule's)."""
    view = jax_impl.torch_view(state)._replace(count=jnp.asarray(count, jnp.int32))
    return jax_impl.from_torch_view(state, view)


def test_adamw_past_a_changing_schedule_gives_nan_not_a_held_lr():
    tx = jax_impl.adamw(S.exponential_lr(0.1, 0.9, horizon=10))
    params = jnp.ones(3)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    params, state = step(jnp.ones(3), _at_count(tx.init(params), 9), params)
    assert np.isfinite(np.asarray(params)).all()  # count 9: the table's last entry
    params, state = step(jnp.ones(3), state, params)
    assert np.isnan(np.asarray(params)).all()
    tx = jax_impl.adamw(S.multi_step_lr(0.1, [3], horizon=10))  # steady: holds past the table
    params, state = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(
        jnp.ones(3), _at_count(tx.init(jnp.ones(3)), 50), jnp.ones(3))
    assert np.isfinite(np.asarray(params)).all()


@pytest.mark.parametrize("T_max, eta_min", [(7, 0.0), (50, 1e-4)])
def test_cosine_fast_path_is_torchs_across_restarts(T_max, eta_min):  # noqa: N803
    # The long-table fast path (CosineAnnealingLR.run_steps) replays torch's recursion, restarts included.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max, eta_min)
    expected = []
    for _ in range(1500):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    table = S.cosine_annealing_lr(0.1, T_max, eta_min, horizon=1500).table
    first = np.flatnonzero(table != np.asarray(expected))
    assert first.size == 0, f"first differing count {first[0]}"
