"""``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_`` as optax transformations, bitwise with torch on the CPU.

torch 2.13's ``clip_grad_norm_`` (``torch/nn/utils/clip_grad.py``):

1. one norm per gradient tensor (``torch._foreach_norm``, which on the CPU is
   ``torch.linalg.vector_norm`` per tensor; ``foreach=False`` calls that directly);
2. ``total_norm = vector_norm(stack(norms))``, in torch's parameter order;
3. ``clip_coef = max_norm / (total_norm + 1e-6)``, which ``Tensor.__rtruediv__``
   evaluates as ``reciprocal(total_norm + 1e-6) * max_norm``, clamped to 1.0;
4. every gradient multiplied by it.

Each step rounds in float32.  The 2-norm of a float32 tensor is computed by
torch's CPU kernel (``ReduceOpsKernel.cpp``, ``norm_two_reduce_step``) in
32-byte vectors: lane ``j`` accumulates ``acc_j + x*x`` (two roundings) over
elements ``j, j+8, j+16, ...``; the lanes are then summed left to right; the
last ``numel % 8`` elements are added by scalar code, which the wheel's
compiler turned into ``acc + x*x`` (rounded square) for the first 4 of them
when there are at least 4, and ``fma(x, x, acc)`` for the others (measured:
``tests/jax_impl_tests/test_clipping.py`` tries every tail length); the result is ``sqrt``.
:func:`torch_vector_norm` does the same, so the norms,
the coefficient and the clipped gradients are torch's bit for bit (pinned by
``tests/jax_impl_tests/test_clipping.py``).

``optax.clip_by_global_norm`` differs in three places: it sums all squares in
XLA's order, divides by the norm (no ``+ 1e-6``) and selects instead of clamping
a coefficient; the README gives the measured distance.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl._cpu_rounding import TORCH_CPU_VECTOR_BYTES

NORM_TYPES = (2.0, float("inf"))


class ClipGradNormState(NamedTuple):
    """State of :func:`clip_grad_norm`: the last total norm, what torch's ``clip_grad_norm_`` returns."""

    total_norm: jax.Array  # shape=(), float32 (the gradients' dtype)


def torch_vector_norm(x: jax.Array, norm_type: float = 2.0) -> jax.Array:
    """``torch.linalg.vector_norm(x, norm_type)`` with torch's CPU rounding (float32 and float64 ``x``)."""
    x = jnp.asarray(x).reshape(-1)
    if norm_type == float("inf"):
        return jnp.max(jnp.abs(x), initial=jnp.zeros([], x.dtype))  # a max rounds nothing: any order is torch's
    lanes = TORCH_CPU_VECTOR_BYTES // x.dtype.itemsize
    n = x.shape[0]
    body = n - n % lanes
    # -0.0 that XLA cannot fold: x*x + neg_zero is the rounded square, and the
    # lane sums below cannot fuse with it into an FMA (torch's vector loop has none).
    neg_zero = -jnp.minimum(jnp.abs(x), 0)
    squares = x * x + neg_zero
    # torch's vector loop: lane j adds its rows in order.  A scan keeps that
    # order (jnp.sum over the rows would let XLA reassociate; it does past ~10^4 rows).
    acc = jnp.zeros([lanes], x.dtype)
    if body:
        acc, _ = jax.lax.scan(lambda acc, row: (acc + row, None), acc, squares[:body].reshape(-1, lanes),
                              unroll=8)
    # The scalar tail as compiled in torch's wheel (measured): with 4 or more
    # float32 tail elements the first 4 squares are computed together and
    # rounded, then added in order; every later one is fma(x, x, acc).
    plain = 4 if x.dtype.itemsize == 4 and n - body >= 4 else 0
    if body:
        total = acc[0]
        for j in range(1, lanes):
            total = total + acc[j]
    elif n:
        # No vector rows: fma(x0, x0, 0.0) is the rounded square.  XLA folds
        # the zero away, and a bare product here would leave LLVM free to
        # contract it, instead of the next one, into the next add.
        total, body, plain = squares[0], 1, max(plain - 1, 0)
    else:
        return jnp.zeros([], x.dtype)
    for i in range(body, n):
        if i < body + plain:
            total = total + squares[i]  # a rounded square: nothing left to contract
        else:
            total = total + x[i] * x[i]  # fma(x, x, acc): LLVM contracts this into one
    return jnp.sqrt(total)


def _leaf_order(order: Any, count: int) -> list[int]:
    """Positions of the tree's leaves in torch's parameter order (``order[i]`` is leaf i's index in torch's list)."""
    if order is None:
        return list(range(count))
    positions = [int(i) for i in order]
    if sorted(positions) != list(range(count)):
        raise ValueError(f"clip_grad_norm: order must be a permutation of 0..{count - 1} "
                         f"(each leaf's index among torch's parameters), got {positions}")
    return positions


def total_norm(grads: optax.Updates, norm_type: float = 2.0, order: Any = None) -> jax.Array:
    """torch's ``total_norm`` of ``clip_grad_norm_``: the norm of the per-tensor norms, stacked in torch's order."""
    leaves = [jnp.asarray(g) for g in jax.tree.leaves(grads)]
    if not leaves:
        return jnp.zeros([], jnp.float32)
    positions = _leaf_order(order, len(leaves))
    norms = [None] * len(leaves)
    for leaf, position in zip(leaves, positions):
        norms[position] = torch_vector_norm(leaf, norm_type)
    dtypes = {n.dtype for n in norms}
    if len(dtypes) > 1:
        raise TypeError(f"clip_grad_norm: gradients of one dtype are supported, got {sorted(map(str, dtypes))}")
    # The barrier keeps XLA from simplifying sqrt(a) * sqrt(a) into a across the two norms.
    return torch_vector_norm(jax.lax.optimization_barrier(jnp.stack(norms)), norm_type)


def _check_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if norm_type not in NORM_TYPES:
        raise ValueError(f"clip_grad_norm: norm_type={norm_type} is not supported (choose from {NORM_TYPES})")
    return norm_type


def _raise_nonfinite(total, norm_type):
    if not np.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")


def clip_grad_norm(max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None, *, order: Any = None) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_`` as an optax transformation, bitwise with torch on float32 gradients.

    Args:
      max_norm: max norm of the gradients (torch's argument).
      norm_type: 2.0 or ``inf``.
      error_if_nonfinite: raise (at run time, through ``jax.debug.callback``:
        under ``jax.jit`` it surfaces when the step's result is read) if the
        total norm is NaN or infinite, with torch's message.
      foreach: accepted for torch's signature; on the CPU torch's foreach and
        for-loop norms are the same computation, so the result does not depend on it.
      order: ``order[i]`` is the index of the tree's leaf ``i`` in torch's
        parameter list (``model.parameters()``); None: the tree's leaf order.
        The per-tensor norms are summed in this order, so it decides the last bits.

    The state holds the last total norm (what torch's function returns).
    """
    if not max_norm >= 0:
        raise ValueError(f"clip_grad_norm: max_norm must be >= 0, got {max_norm}")
    norm_type = _check_norm_type(norm_type)
    del foreach

    def init_fn(params):
        del params
        return ClipGradNormState(total_norm=jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params, state
        norm = total_norm(updates, norm_type, order)
        if error_if_nonfinite:
            jax.debug.callback(_raise_nonfinite, norm, norm_type)
        dtype = norm.dtype
        # max_norm / (total + 1e-6) is Tensor.__rtruediv__: reciprocal(total + 1e-6) * max_norm.
        coef = (jnp.asarray(1, dtype) / (norm + jnp.asarray(1e-6, dtype))) * jnp.asarray(max_norm, dtype)
        coef = jnp.minimum(coef, jnp.asarray(1.0, dtype))  # torch.clamp(max=1.0); both propagate NaN
        # torch multiplies half-precision gradients in float32 (opmath) and rounds once.
        clipped = jax.tree.map(lambda g: (g * coef.astype(jnp.promote_types(g.dtype, jnp.float32))).astype(g.dtype),
                               updates)
        return clipped, ClipGradNormState(total_norm=norm.astype(jnp.float32))

    return optax.GradientTransformation(init_fn, update_fn)


def clip_grad_value(clip_value: float, foreach: bool | None = None) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_value_`` as an optax transformation: clamp to ``[-clip_value, clip_value]``.

    A clamp rounds nothing, so this is torch's bit for bit (NaN stays NaN, as in torch).
    """
    if not clip_value >= 0:
        raise ValueError(f"clip_grad_value: clip_value must be >= 0, got {clip_value}")
    del foreach

    def update_fn(updates, state, params=None):
        del params

        def clamp(g):
            bound = jnp.asarray(clip_value, g.dtype)
            return jnp.minimum(jnp.maximum(g, -bound), bound)

        return jax.tree.map(clamp, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
