"""Compile time grows linearly with the number of leaves: guarded by the program's shape, not by a wall time.

XLA's passes over one custom call grow faster than linearly with its operands
(1,200 leaves in one kernel call took 110 s to compile, in calls of 16 leaves
2.4 s: ``benchmarks/compile_time.py``), so no call may take more than
``KERNEL_LEAVES_PER_CALL`` leaves, and the lowered program's size per leaf must
not grow with the leaf count.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import jax_impl
from jax_impl import _dispatch, cpu_kernel

PATHS = ("apply_exact", "update")


def lowered(path: str, leaves: int, kernel: str = "auto", amsgrad: bool = False) -> str:
    params = {f"w{i:04d}": jnp.full((8,) if i % 2 else (3, 5), 0.5, jnp.float32) for i in range(leaves)}
    tx = jax_impl.adamw(1e-3, amsgrad=amsgrad, kernel=kernel)
    state = tx.init(params)
    if path == "apply_exact":
        step = lambda g, s, p: jax_impl.apply_exact(tx, g, s, p)  # noqa: E731
    else:
        step = lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))  # noqa: E731
    return jax.jit(step).lower(params, state, params).as_text()


def kernel_calls(text: str) -> list[int]:
    """The operand count of each call of the CPU kernel in a lowered program."""
    return [operands.count("%") for operands in re.findall(r"custom_call @jax_impl_adamw\(([^)]*)\)", text)]


needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="the CPU kernel does not build here")


@needs_kernel
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_no_kernel_call_takes_more_than_its_share_of_leaves(path, amsgrad):
    per_leaf = 5 if amsgrad else 4  # param, grad, exp_avg, exp_avg_sq (, max_exp_avg_sq)
    calls = kernel_calls(lowered(path, 100, amsgrad=amsgrad))
    assert calls, "the kernel path was not taken"
    assert max(calls) <= 1 + per_leaf * _dispatch.KERNEL_LEAVES_PER_CALL, calls  # + the step's scalars
    # Every leaf still goes to the kernel: 100 leaves, one call per 16.
    assert sum((c - 1) // per_leaf for c in calls) == 100
    assert len(calls) == -(-100 // _dispatch.KERNEL_LEAVES_PER_CALL)


@pytest.mark.parametrize("kernel", [pytest.param("auto", marks=needs_kernel), "xla"])
@pytest.mark.parametrize("path", PATHS)
def test_program_size_per_leaf_does_not_grow(path, kernel):
    # Lowered text is linear in the program's operations; 10% slack covers the
    # longer names of leaves 1000+ and the fixed part shrinking in proportion.
    small, large = (len(lowered(path, n, kernel)) for n in (50, 400))
    assert large / small <= 8 * 1.1, (small, large)


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_chunked_kernel_calls_keep_the_bits(path):
    """40 leaves in three kernel calls give the XLA path's bits (which are torch's: test_cpu_kernel.py)."""
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(8,) if i % 3 else (7, 3) for i in range(40)]
    params = {f"w{i:02d}": jax.random.normal(keys[0], s) for i, s in enumerate(shapes)}
    grads = {k: jax.random.normal(keys[1], p.shape) * 1e-2 for k, p in params.items()}
    out = {}
    for kernel in ("cpu", "xla"):
        tx = jax_impl.adamw(1e-2, weight_decay=0.1, kernel=kernel)
        state = tx.init(params)
        if path == "apply_exact":
            out[kernel] = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))(grads, state, params)
        else:
            out[kernel] = jax.jit(tx.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(out["cpu"]), jax.tree.leaves(out["xla"])):
        assert jnp.array_equal(jax.lax.bitcast_convert_type(a, jnp.int32), jax.lax.bitcast_convert_type(b, jnp.int32))
