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


@pytest.mark.parametrize("kernel", ["auto", "xla"])
@pytest.mark.parametrize("b1, b2", [(0.99999999, 0.999), (0.9, 0.99999999), (0.9, 0.9999999)])
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
    state = jax_impl.AdamWState(count=jnp.asarray(count, jnp.int32), exp_avg=jnp.asarray(m0),
                                exp_avg_sq=jnp.asarray(v0), max_exp_avg_sq=None)
    params, state = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(jnp.asarray(g), state, jnp.asarray(p0))
    assert np.all(np.isfinite(np.asarray(params)))
    for got, expected in zip((params, state.exp_avg, state.exp_avg_sq), want):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32), expected.view(np.uint32))


def test_in_graph_double_keeps_the_callers_dtypes():
    # The float64 scalars live inside the step only: without x64 everything the user sees stays float32.
    assert not jax.config.jax_enable_x64
    tx = jax_impl.adamw(1e-3, 0.99999999, 0.99999999)
    params = jnp.ones(3)
    state = tx.init(params)._replace(count=jnp.asarray(2**23, jnp.int32))
    new_params, new_state = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(jnp.ones(3), state, params)
    assert new_params.dtype == jnp.float32 and new_state.exp_avg.dtype == jnp.float32
    assert new_state.count.dtype == jnp.int32
    expected = 1.0 - math.pow(0.99999999, float(np.float32(2**23 + 1)))
    assert expected > 0.08  # far from 0: the float32 fallback had 1 - 0.99999999**t == 0 here (b1 ~ 1 - 1e-8 rounds to 1)
