"""Subnormal numbers: torch keeps them on every CPU path; so does jax_impl's CPU kernel.

XLA:CPU runs its threads with flush-to-zero and denormals-are-zero; the
kernel clears both for its own work on each thread and restores them
(adamw_kernel.cc's KeepSubnormals).  XLA's own ops keep flushing: the XLA
path's differences are pinned here as docs/exactness.md states them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax.numpy as jnp
import jax_impl

PATHS = ("fused", "foreach", "for-loop")
TORCH_FLAGS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
# (p0, grad, hyperparameters): each touches subnormals in another place.
CASES = {
    "subnormal gradient": (0.0, 1e-40, dict(lr=1e-3, weight_decay=0.0)),  # torch: p = -9.9e-36, m = 1e-41
    "subnormal g*g with eps=0": (1.0, 3e-20, dict(lr=1e-3, weight_decay=0.0, eps=0.0)),  # torch: 0.99899, not -inf
    "subnormal param at lr=0": (1e-40, 1.0, dict(lr=0.0, weight_decay=1e-2)),  # torch keeps p
}

needs_kernel = pytest.mark.skipif(not jax_impl.cpu_kernel.available(), reason="no C++ compiler for the CPU kernel")


def _run(path, kernel, p0, g, hyper, steps=3, n=9):
    """Both optimizers for ``steps`` steps from float32 arrays built in NumPy (a JAX conversion would flush)."""
    p0, g = np.full(n, p0, np.float32), np.full(n, g, np.float32)
    tp = torch.tensor(p0, requires_grad=True)
    lr, wd, eps = hyper["lr"], hyper["weight_decay"], hyper.get("eps", 1e-8)
    optimizer = torch.optim.AdamW([tp], lr=lr, weight_decay=wd, eps=eps, **TORCH_FLAGS[path])
    tx = jax_impl.adamw(lr, weight_decay=wd, eps=eps, kernel=kernel, torch_path=path)
    params = [jnp.asarray(p0)]
    state = tx.init(params)
    for _ in range(steps):
        tp.grad = torch.tensor(g)
        optimizer.step()
        params, state = jax_impl.apply_exact(tx, [jnp.asarray(g)], state, params)
    ours = np.asarray(params[0]), np.asarray(state[0].mu[0]), np.asarray(state[0].nu[0])
    theirs = tp.detach().numpy(), *(optimizer.state[tp][k].numpy() for k in ("exp_avg", "exp_avg_sq"))
    return ours, theirs


@needs_kernel
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", PATHS)
def test_cpu_kernel_keeps_subnormals_as_torch(path, case):
    ours, theirs = _run(path, "cpu", *CASES[case])
    for name, x, y in zip(("param", "exp_avg", "exp_avg_sq"), ours, theirs):
        np.testing.assert_array_equal(x, y, err_msg=f"{path}, {case}: {name}")
    assert np.any((ours[0] != 0) & (np.abs(ours[0]) < np.finfo(np.float32).tiny)) or case != "subnormal param at lr=0"


@needs_kernel
def test_the_issue_example_keeps_subnormals():
    p0, g = np.zeros(8, np.float32), np.full(8, 1e-40, np.float32)
    tx = jax_impl.adamw(1e-3, weight_decay=0.0)
    params, state = jax_impl.apply_exact(tx, {"w": jnp.asarray(g)}, tx.init({"w": jnp.asarray(p0)}),
                                         {"w": jnp.asarray(p0)})
    tp = torch.zeros(8, requires_grad=True)
    optimizer = torch.optim.AdamW([tp], lr=1e-3, weight_decay=0.0, fused=True)
    tp.grad = torch.tensor(g)
    optimizer.step()
    np.testing.assert_array_equal(np.asarray(params["w"]), tp.detach().numpy())   # -9.9e-36, not 0
    np.testing.assert_array_equal(np.asarray(state[0].mu["w"]), optimizer.state[tp]["exp_avg"].numpy())  # 1e-41
    assert np.all(np.asarray(params["w"]) != 0)


@pytest.mark.parametrize("case", CASES)
def test_xla_path_flushes_subnormals_to_zero(case):
    """What docs/exactness.md says of the XLA path (kernel="xla", and leaves the kernel does not take):
    a subnormal input reads as 0 and a subnormal result is written as 0, so the first case gives p = m = 0,
    the second -inf (v = 0, eps = 0), the third p = 0."""
    (p, m, _), (tp, tm, _) = _run("for-loop", "xla", *CASES[case])
    expected = {"subnormal gradient": (0.0, 0.0), "subnormal g*g with eps=0": (-np.inf, tm[0]),
                "subnormal param at lr=0": (0.0, tm[0])}[case]
    assert (p[0], m[0]) == expected
    assert not np.array_equal(p, tp)  # torch kept the subnormals
