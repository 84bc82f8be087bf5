"""jax_impl.adamw, jitted, against torch.optim.AdamW(fused=True) on the CPU: bit for bit.

These tests pin XLA:CPU's behaviour too: if a new XLA contracts an FMA
differently or rewrites a division, they fail with the first differing step.
"""

import math

import pytest

from crosscheck.trajectory import sources
from crosscheck.trajectory.implementations import Hyper
from helpers import OPTIONS, run_pair

# 300 steps show every rounding difference of the step (they appear in the first steps and persist);
# the slow tests below run 10,000 steps, past where the bias-correction tables matter.
STEPS = 300


@pytest.mark.parametrize("option", OPTIONS)
def test_float32_bitwise(option):
    mismatches = run_pair("jax_impl", "torch.AdamW(fused)", Hyper(**OPTIONS[option]), STEPS, check_every=250)
    assert not mismatches, f"first mismatch (step, leaf, quantity, distance): {mismatches[0]}"


@pytest.mark.parametrize("grads", sources.SYNTHETIC)
def test_float32_bitwise_gradient_kinds(grads):
    mismatches = run_pair("jax_impl", "torch.AdamW(fused)", Hyper(), STEPS, grads=grads, check_every=250)
    assert not mismatches, mismatches[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("option", ["default", "amsgrad", "maximize", "mask"])
def test_half_precision_bitwise(dtype, option):
    hyper = Hyper(dtype=dtype, **OPTIONS[option])
    mismatches = run_pair("jax_impl", "torch.AdamW(fused)", hyper, STEPS, check_every=250)
    assert not mismatches, mismatches[0]


@pytest.mark.parametrize("option", ["default", "amsgrad", "b1 >= 0.5 lerp branch"])
def test_float64_bitwise(x64, option):
    mismatches = run_pair("jax_impl", "torch.AdamW(fused)", Hyper(dtype="float64", **OPTIONS[option]), STEPS,
                          check_every=250)
    assert not mismatches, mismatches[0]


def test_schedule_bitwise_with_x64(x64):
    # torch's lr is a Python double; under jax_enable_x64 the schedule carries it exactly.
    hyper = Hyper(schedule=sources.CosineSchedule(1e-3, STEPS))
    mismatches = run_pair("jax_impl", "torch.AdamW(fused)", hyper, STEPS, check_every=250)
    assert not mismatches, mismatches[0]


def test_schedule_float32_gap_is_bounded():
    """Without x64 a schedule's lr is float32, so -lr/bc1 rounds twice.

    Measured (this test's stream): the params differ by at most 1.19e-7 (one
    float32 ulp at magnitude 1) after 1000 and after 4000 steps, in 5-12% of
    the elements: bounded, no growth with t.  The bound is 4x that.
    """
    from crosscheck.trajectory import implementations
    from helpers import initial_params
    import numpy as np

    steps = 1000   # the length the bound was measured at
    hyper = Hyper(schedule=sources.CosineSchedule(1e-3, steps))
    params = initial_params()
    a = implementations.make("jax_impl", hyper, params)
    b = implementations.make("torch.AdamW(fused)", hyper, params)
    source = sources.synthetic("gaussian")
    worst = 0.0
    for t in range(steps):
        g = source(t, params)
        a.step(g)
        b.step(g)
    for x, y in zip(a.params(), b.params()):
        if np.size(x):
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    assert worst <= 4 * 2.0**-23, worst
    assert math.isfinite(worst)


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_float32_bitwise_10000_steps(option):
    mismatches = run_pair("jax_impl", "torch.AdamW(fused)", Hyper(**OPTIONS[option]), 10_000, check_every=2500)
    assert not mismatches, mismatches[0]


def test_nan_and_inf_gradients_propagate_like_torch():
    """Non-finite gradients give torch's result elementwise, in params and both moments."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jax_impl
    from crosscheck.common.metrics import bits

    grads = np.array([1.0, np.nan, np.inf, -np.inf, 0.0, 3e38, -2.0, 1e-30, np.nan], np.float32)
    for amsgrad, maximize in ((False, False), (True, False), (False, True)):
        param = torch.ones(9, requires_grad=True)
        opt = torch.optim.AdamW([param], amsgrad=amsgrad, maximize=maximize, fused=True)
        tx = jax_impl.adamw(amsgrad=amsgrad, maximize=maximize)
        params = [jnp.ones(9)]
        state = tx.init(params)
        step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
        for _ in range(3):
            param.grad = torch.from_numpy(grads.copy())
            opt.step()
            params, state = step([jnp.asarray(grads)], state, params)
        torch_state = opt.state[param]
        for ours, theirs in ((params[0], param.detach()), (state[0].mu[0], torch_state["exp_avg"]),
                             (state[0].nu[0], torch_state["exp_avg_sq"])):
            ours, theirs = np.asarray(ours), theirs.numpy()
            if maximize:
                # maximize negates a NaN gradient; which operand's NaN an instruction
                # passes on (and so the NaN's sign) is up to each code generator.
                np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
                ours, theirs = np.nan_to_num(ours), np.nan_to_num(theirs)
            np.testing.assert_array_equal(bits(ours), bits(theirs))
