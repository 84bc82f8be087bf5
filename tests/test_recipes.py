"""Training recipes against torch on shared gradients: accumulation, param groups, schedules, mixed precision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jax_impl
from crosscheck.metrics import distance
from jax_impl.accumulation import torch_accumulation
from tests.recipe_helpers import gradients, initial_params, mismatches, to_jax, torch_params

LR, WD = 1e-2, 0.1


def run_jax(tx, grads_of_step, steps, params=None):
    params = to_jax(initial_params()) if params is None else params
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for t in range(steps):
        params, state = step(to_jax(grads_of_step(t)), state, params)
    return params, state


def torch_accumulated(k, steps, scale):
    """torch's recipe: (loss / k).backward() k times (.grad written, then added to), step, zero_grad."""
    tparams = torch_params(initial_params())
    optimizer = torch.optim.AdamW(tparams.values(), lr=LR, weight_decay=WD, fused=True)
    for t in range(steps):
        for n, p in tparams.items():
            g = torch.from_numpy(gradients(t, scale)[n])
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        if (t + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()
    return tparams


# ---------------------------------------------------------------- accumulation

@pytest.mark.parametrize("k", [3, 4])
def test_torch_accumulation_is_torch_bitwise(k):
    steps = 5 * k
    params, state = run_jax(torch_accumulation(jax_impl.adamw(LR, weight_decay=WD), k),
                            lambda t: gradients(t, 1 / k), steps)
    assert int(state.inner_opt_state.count) == 5
    assert mismatches(params, torch_accumulated(k, steps, 1 / k)) == {}


def test_multisteps_mean_is_not_torch_accumulation():
    # Measured (README): MultiSteps' Welford mean of the unscaled gradients parts from the sum of the
    # loss/4 gradients on the first window; 25 windows: max 1.7e-8 absolute, 3.7e-5 relative near zero.
    k, steps = 4, 4 * 25
    params, _ = run_jax(optax.MultiSteps(jax_impl.adamw(LR, weight_decay=WD), k), lambda t: gradients(t), steps)
    tparams = torch_accumulated(k, steps, 1 / k)  # loss / 4: the scaled gradients are exact quarters
    assert mismatches(params, tparams)
    for name, p in tparams.items():
        d = distance(np.asarray(params[name]), p.detach().numpy())
        assert d.max_abs < 5e-8, (name, d)


def test_torch_accumulation_is_the_same_on_every_sharding():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = Path(__file__).with_name("recipe_sharded_checks.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=script.parents[1])
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torch_accumulation_rejects_bad_every_k():
    with pytest.raises(ValueError, match="every_k"):
        torch_accumulation(jax_impl.adamw(), 0)
