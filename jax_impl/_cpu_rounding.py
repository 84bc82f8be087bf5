"""The rounding models of torch's CPU AdamW paths, as XLA operations.

The per-step scalars as torch computes them (in double, rounded once), the
per-element formula of the fused kernel's vector body and of its scalar tail,
which elements fall in the tail (torch's order, ``torch_layout``,
``scalar_tail``), and the op-by-op formula of the for-loop and foreach paths
(:func:`loop_leaf_step`).  :mod:`jax_impl._adamw`'s docstring says which XLA
habits the formulas counter and how.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl import bias_correction as bc
from jax_impl import cpu_kernel
from jax_impl._state import is_traced
from jax_impl._x64 import x64_scope
from jax_impl.schedules import TorchSchedule

# torch's fused CPU kernel runs 32-byte vectors (measured on AVX2 and AVX512
# builds of torch 2.13); the remainder of each tensor takes the scalar path.
TORCH_CPU_VECTOR_BYTES = 32

# torch's CPU paths (``torch.optim.AdamW(fused=True)``, ``foreach=True``, the default for-loop).
TORCH_PATHS = ("fused", "foreach", "for-loop")


class StepScalars(NamedTuple):
    """Per-step scalars in the kernel's arithmetic dtype (float32, or float64 for float64 params)."""

    decay: jax.Array  # 1 - lr * weight_decay, rounded once as torch does
    lr_wd: jax.Array  # lr * weight_decay, for decay_rounding="precise"
    step_size_neg: jax.Array  # -lr / (1 - b1**t)
    bias_correction2_sqrt: jax.Array  # sqrt(1 - b2**t)
    # nesterov=True only (optax's formula, not torch's): -lr * b1 / (1 - b1**(t+1)) and -lr * (1 - b1) / (1 - b1**t).
    nesterov_m: jax.Array | None = None
    nesterov_g: jax.Array | None = None


def opmath_dtype(dtype) -> jnp.dtype:
    """torch's ``opmath_type``: half types compute in float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def torch_cpu_vector_width(dtype) -> int:
    """Elements per vector in torch's fused CPU kernel for params of ``dtype``."""
    return TORCH_CPU_VECTOR_BYTES // jnp.dtype(dtype).itemsize


def table_lookup(table: np.ndarray, saturated: bool, t: jax.Array, dtype,
                  beyond: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``table[t - 1]`` rounded to ``dtype``; ``beyond(t)`` past an unsaturated table."""
    value = jnp.asarray(table, dtype)[jnp.minimum(t, table.shape[0]) - 1]
    if saturated:
        return value
    return jnp.where(t <= table.shape[0], value, beyond(t).astype(dtype))


def _scalar_arithmetic_dtype() -> jnp.dtype:
    """float64 for the per-step scalars of traced hyperparameters, where the backend has it (not on TPU)."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "tpu" else jnp.dtype(jnp.float64)


def _traced_step_scalars(learning_rate, b1, b2, weight_decay, count, t, dtype, wide=None,
                         torch_path="fused") -> StepScalars:
    """The scalars of :func:`step_scalars` when a hyperparameter is traced (``optax.inject_hyperparams`` under jit).

    torch computes them in double from its Python floats and rounds once to
    ``dtype``; here the same double operations run in the graph, in a scoped
    ``jax.enable_x64`` (the traced values are float32 or narrower, so their
    double value is exact).  For a traced lr and weight decay with concrete
    betas this is bitwise torch's with ``lr=float(lr)``: the bias corrections
    come from the same host tables.  A traced beta's ``1 - beta**t`` uses XLA's
    double ``pow`` instead of libm's (equal after rounding to float32 unless
    the two differ across a float32 rounding boundary).  On a backend without
    float64 (``wide=float32``) the arithmetic is float32 and rounds twice
    (measured in ``tests/jax_impl_tests/test_optax_conventions.py``).  On the
    for-loop and foreach paths a traced b2's ``sqrt(1 - b2**t)`` is XLA's sqrt,
    where torch takes libm's ``pow(x, 0.5)`` (they differ in ~0.05% of steps).
    """
    wide = jnp.dtype(wide or _scalar_arithmetic_dtype())
    scope = x64_scope() if wide == jnp.float64 else contextlib.nullcontext()
    with scope:
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr).astype(wide)
        wd = jnp.asarray(weight_decay).astype(wide)
        # torch's step is a float32 tensor (stuck at 2**24), read back as a double.
        t_wide = jnp.minimum(t, bc.TORCH_STEP_LIMIT).astype(jnp.float32).astype(wide)

        def bias_correction(beta):
            if is_traced(beta):
                return 1 - jnp.asarray(beta).astype(wide) ** t_wide
            table = bc.bias_correction(beta)
            return table_lookup(table, bc.is_saturated(table), t, wide,
                                 lambda t: 1 - jnp.asarray(beta, wide) ** t_wide)

        # Each product and quotient is followed by + (-0.0) that XLA cannot fold,
        # so LLVM cannot contract it into the next add (torch's double
        # arithmetic has no FMA here): fma(a, b, -0.0) is the rounded a * b.
        neg_zero = -jnp.minimum(jnp.abs(lr), 0)
        lr_wd = lr * wd + neg_zero
        decay = 1 - lr_wd
        step_size_neg = -(lr / bias_correction(b1) + neg_zero)
        if torch_path != "fused" and not is_traced(b2):  # Python's bc2 ** 0.5, tabulated
            table = bias_correction2_pow_half(b2)
            bias_correction2_sqrt = table_lookup(table, bc.is_saturated(table), t, wide,
                                                 lambda t: jnp.sqrt(1 - jnp.asarray(b2, wide) ** t_wide))
        else:
            bias_correction2_sqrt = jnp.sqrt(bias_correction(b2))
        return StepScalars(decay.astype(dtype), lr_wd.astype(dtype), step_size_neg.astype(dtype),
                            bias_correction2_sqrt.astype(dtype))


def nesterov_scalars(scalars: StepScalars, b1, t, dtype) -> StepScalars:
    """Adds optax's Nesterov coefficients (``scale_by_adam(nesterov=True)``), in ``dtype`` arithmetic as optax's."""
    beta1, t = _as_scalar(b1, dtype), t.astype(dtype)
    ratio = (1 - beta1 ** t) / (1 - beta1 ** (t + 1))  # bias correction of step t over that of step t + 1
    return scalars._replace(nesterov_m=scalars.step_size_neg * beta1 * ratio,
                            nesterov_g=scalars.step_size_neg * (1 - beta1))


def _in_graph_double(fn: Callable[..., jax.Array], *args) -> jax.Array:
    """``fn(*args)`` traced with float64 enabled for this computation only (the caller's dtypes are untouched).

    Past the bias-correction tables (2**22 steps) torch still computes
    ``1 - beta**float32(step)`` and the step size in double; a float32
    fallback loses it for betas near 1 (``1 - 0.99999999**t`` is 0.0 or off by
    0.5% in float32).  XLA:CPU's float64 ``pow`` agreed bit for bit with libm's
    on 15,000 random counts in [2**22, 2**31) (tests/jax_impl_tests/test_jax_api.py).
    """
    with x64_scope():
        return fn(*args)


def _bias_correction_double(beta: float, t: jax.Array) -> jax.Array:
    """``1 - beta**step`` in float64 (call under :func:`_in_graph_double`), ``step`` torch's float32 step.

    torch's ``step`` is a float32 tensor incremented by 1: it stops at 2**24
    (2**24 + 1 rounds back to 2**24), so every later update uses step 2**24.
    """
    step = jnp.minimum(t, bc.TORCH_STEP_LIMIT).astype(jnp.float32)
    return 1.0 - jnp.asarray(beta, jnp.float64) ** step.astype(jnp.float64)


@functools.lru_cache(maxsize=32)
def bias_correction2_pow_half(beta: float) -> np.ndarray:
    """``(1 - beta**t) ** 0.5`` as the for-loop and foreach paths compute it: Python's ``**``, libm's ``pow``.

    The fused kernel takes ``std::sqrt``; ``pow(x, 0.5)`` is not always
    correctly rounded and differs from it in 1,103 of the first 2,000,000 steps
    for beta=0.999 (NumPy's ``x ** 0.5`` is a ``sqrt``, hence the Python loop).
    """
    table = bc.bias_correction(beta)
    values = np.fromiter((x ** 0.5 for x in table.tolist()), np.float64, len(table))
    values.setflags(write=False)
    return values


def step_scalars(learning_rate, b1, b2, weight_decay, count, t, dtype, torch_path: str = "fused") -> StepScalars:
    """Scalars of step ``t`` computed as torch computes them: in double, then rounded to ``dtype``.

    ``torch_path`` (:data:`TORCH_PATHS`): the paths differ only in
    ``sqrt(1 - b2**t)``, ``std::sqrt`` (fused) or Python's ``** 0.5``.
    """
    if any(is_traced(x) for x in (learning_rate, b1, b2, weight_decay)):
        return _traced_step_scalars(learning_rate, b1, b2, weight_decay, count, t, dtype, torch_path=torch_path)
    bc1_table, bc2_table = bc.bias_correction(b1), bc.bias_correction(b2)
    bc1_saturated, bc2_saturated = bc.is_saturated(bc1_table), bc.is_saturated(bc2_table)
    if isinstance(learning_rate, TorchSchedule):
        # torch's lr of every step is a Python float, tabulated: derive the
        # step's scalars from it in double on the host, as torch's kernel does.
        # Past its table a schedule either holds its last lr (torch's) or has
        # none: NaN then, so the run fails visibly (nothing can raise under jit).
        lr_table = learning_rate.table
        holds = learning_rate.holds_beyond
        lr_last = float(lr_table[-1]) if holds else math.nan
        n = max(len(lr_table) + (0 if holds else 1), len(bc1_table))
        lr_ext = np.concatenate([lr_table, np.full(n - len(lr_table), lr_last)])
        if bc1_saturated or n == len(bc1_table):
            bc1_tail = np.full(n - len(bc1_table), bc1_table[-1])
        else:  # a long lr table past an unsaturated bias correction: torch's values, in libm's double pow
            bc1_tail = np.array([1.0 - math.pow(b1, bc.torch_step_value(t))
                                 for t in range(len(bc1_table) + 1, n + 1)], np.float64)
        bc1_ext = np.concatenate([bc1_table, bc1_tail])
        step_size_neg = table_lookup(-(lr_ext / bc1_ext), bc1_saturated, t, dtype, lambda t: _in_graph_double(
            lambda t: (-(lr_last / _bias_correction_double(b1, t))).astype(dtype), t))
        decay = table_lookup(1.0 - lr_ext * weight_decay, True, t, dtype, None)
        lr_wd = table_lookup(lr_ext * weight_decay, True, t, dtype, None)
    elif callable(learning_rate):
        # The schedule is traced: its dtype (float32, or float64 under
        # jax_enable_x64) is the precision of the lr arithmetic.
        lr = jnp.asarray(learning_rate(count))
        wide = lr.dtype
        bias_correction1 = table_lookup(bc1_table, bc1_saturated, t, wide, lambda t: _in_graph_double(
            lambda t: _bias_correction_double(b1, t).astype(wide), t))
        step_size_neg = (-(lr / bias_correction1)).astype(dtype)
        decay = (1 - lr * weight_decay).astype(dtype)
        lr_wd = (lr * weight_decay).astype(dtype)
    else:
        step_size_neg = table_lookup(-(learning_rate / bc1_table), bc1_saturated, t, dtype, lambda t: _in_graph_double(
            lambda t: (-(learning_rate / _bias_correction_double(b1, t))).astype(dtype), t))
        decay = jnp.asarray(1.0 - learning_rate * weight_decay, dtype)
        lr_wd = jnp.asarray(learning_rate * weight_decay, dtype)
    # Past the table (b2 within ~1e-6 of 1) the in-graph double takes a sqrt on every path.
    bc2_sqrt_table = np.sqrt(bc2_table) if torch_path == "fused" else bias_correction2_pow_half(b2)
    bias_correction2_sqrt = table_lookup(bc2_sqrt_table, bc2_saturated, t, dtype, lambda t: _in_graph_double(
        lambda t: jnp.sqrt(_bias_correction_double(b2, t)).astype(dtype), t))
    return StepScalars(decay, lr_wd, step_size_neg, bias_correction2_sqrt)


def _as_scalar(value, dtype):
    """``dtype(value)``: a Python float rounded once, or a traced hyperparameter cast in the graph."""
    return jnp.asarray(value).astype(dtype) if is_traced(value) else dtype.type(value)


def _one_minus(beta, dtype):
    """``dtype(1 - beta)`` rounded once, as torch rounds its double: exact in ``dtype`` arithmetic too,
    since a traced beta is float32 or narrower and ``1 - beta`` is then exact before the one rounding."""
    return 1 - jnp.asarray(beta).astype(dtype) if is_traced(beta) else dtype.type(1 - beta)


def _leaf_formula(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars: StepScalars, *,
                  b1, b2, eps, decay, decay_rounding, amsgrad, maximize, tail, mu_dtype=None):
    """One kernel pass over a leaf; ``tail`` is False (vector formula), True (scalar) or a mask of the scalar's elements.

    Returns new (param, exp_avg, exp_avg_sq, max_exp_avg_sq).
    """
    dtype = param.dtype
    opmath = opmath_dtype(dtype)
    p, g, m, v = (x.astype(opmath) for x in (param, grad, exp_avg, exp_avg_sq))
    if maximize:
        g = -g
    # -0.0 that XLA cannot fold away (see the module docstring).
    neg_zero = -jnp.minimum(jnp.abs(g), 0)
    # The gradient rounded on its own: XLA fuses its producer into these passes
    # (a clipping or loss-scale factor, the last op of a backward pass), and
    # LLVM would contract that product into g - m.  fma(a, b, -0.0) is a*b rounded.
    g = g + neg_zero

    # exp_avg.lerp_(grad, 1 - b1), as torch's kernel writes it: one FMA.
    weight = _one_minus(b1, opmath)
    if is_traced(weight):  # an injected b1: both of lerp's branches, selected in the graph
        m = jnp.where(jnp.abs(weight) < 0.5, m + weight * (g - m), g + (weight - 1) * (g - m))
    elif abs(weight) < 0.5:
        m = m + weight * (g - m)
    else:
        m = g + (weight - 1) * (g - m)

    coefficient2 = _one_minus(b2, opmath)
    beta2 = _as_scalar(b2, opmath)
    # LLVM fuses whichever product it likes into the add; leaving only one bare
    # product in each sum picks the FMA torch has.
    def vector_v(g, v):
        return (beta2 * v + neg_zero) + (coefficient2 * g) * g  # fma(c*g, g, b2*v)

    def scalar_v(g, v):
        return beta2 * v + ((coefficient2 * g) * g + neg_zero)  # fma(b2, v, (c*g)*g)

    old_max = max_exp_avg_sq.astype(opmath) if amsgrad else None
    if tail is True:
        v = scalar_v(g, v)
    elif tail is False:
        v = vector_v(g, v)
    else:
        # Both formulas, then the tail's where the mask says.  The scalar
        # formula gets its own g and v (x + -0.0 is x, bit for bit), so XLA
        # cannot share a product between the two: LLVM would then fuse neither.
        g_tail, v_tail = g + neg_zero, v + neg_zero
        v_vector, v_scalar = vector_v(g, v), scalar_v(g_tail, v_tail)
        v = jnp.where(tail, v_scalar, v_vector)
    new_max = None
    if amsgrad:
        # vec::maximum propagates NaN; the tail's std::max keeps the old value.
        scalar_max, vector_max = jnp.where(old_max < v, v, old_max), jnp.maximum(old_max, v)
        new_max = scalar_max if tail is True else vector_max if tail is False else \
            jnp.where(tail, scalar_max, vector_max)
    p = new_param(p, m, v, new_max, scalars, eps=eps, decay=decay, decay_rounding=decay_rounding,
                   amsgrad=amsgrad, grad=g)

    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return cast(p), m.astype(mu_dtype or dtype), cast(v), cast(new_max)


def _tail_positions(layout: np.ndarray | None, size: int, tail_size: int) -> np.ndarray:
    """Flat positions (in this leaf) of the elements torch's kernel leaves to its scalar tail.

    They are the last ``tail_size`` elements in torch's element order: the
    leaf's own row-major order, or the order ``layout`` gives.
    """
    if layout is None:
        return np.arange(size - tail_size, size)
    return np.flatnonzero(layout.reshape(-1) >= size - tail_size)


def _tail_mask(shape: tuple[int, ...], indices: np.ndarray) -> jax.Array:
    """A boolean array of ``shape``, True at ``indices``; built from iotas, so it shards like the leaf."""
    iotas = [jax.lax.broadcasted_iota(jnp.int32, shape, axis) for axis in range(len(shape))]
    mask = None
    for index in indices:
        hit = None
        for iota, i in zip(iotas, index):
            eq = iota == int(i)
            hit = eq if hit is None else hit & eq
        mask = hit if mask is None else mask | hit
    return mask


def leaf_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, *, tail_positions: np.ndarray,
               **options):
    """The fused kernel over one whole leaf, in XLA: vector formula, and the scalar tail's at ``tail_positions``.

    No reshapes or slices for a few tail positions: every operation is
    elementwise, so a sharded leaf is updated where it lives, without
    communication.  Many positions (a flat buffer of many tensors) are
    gathered, computed with the tail formula and scattered back.
    """
    size = param.size
    if size == 0:
        return param, exp_avg, exp_avg_sq, max_exp_avg_sq
    if len(tail_positions) == 0:
        return _leaf_formula(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, tail=False, **options)
    if len(tail_positions) == size:
        return _leaf_formula(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, tail=True, **options)
    if len(tail_positions) <= _MAX_MASK_POSITIONS:
        indices = np.stack(np.unravel_index(tail_positions, param.shape), axis=1)
        tail = _tail_mask(param.shape, indices)
        return _leaf_formula(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, tail=tail, **options)
    # The gathered operands are new values, so XLA cannot share the tail's
    # products with the vector formula's.
    flat = [None if x is None else x.reshape(-1) for x in (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)]
    head = _leaf_formula(*flat, scalars, tail=False, **options)
    tail = _leaf_formula(*[None if x is None else x[tail_positions] for x in flat], scalars, tail=True, **options)
    return tuple(None if h is None else h.at[tail_positions].set(t).reshape(param.shape) for h, t in zip(head, tail))


_MAX_MASK_POSITIONS = 64


def resolve_tails(torch_layout, scalar_tail, params: optax.Params) -> list[np.ndarray]:
    """Per leaf, the flat positions that get torch's scalar-tail formula.

    ``scalar_tail`` gives them explicitly; otherwise they are the last
    ``numel % width`` elements in torch's order (``torch_layout``, or the leaf's own).
    """
    leaves = jax.tree.leaves(params)
    layouts = _resolve_layout(torch_layout, params)
    explicit = [None] * len(leaves)
    if scalar_tail is not None:
        try:
            explicit = jax.tree.structure(params).flatten_up_to(scalar_tail)
        except (ValueError, TypeError) as err:
            raise ValueError(f"adamw: scalar_tail does not match the parameter tree: {err}") from None
    tails = []
    for leaf, layout, positions in zip(leaves, layouts, explicit):
        size = int(np.prod(jnp.shape(leaf)))
        if positions is not None:
            positions = np.asarray(positions, np.int64).reshape(-1)
            if positions.size and (positions.min() < 0 or positions.max() >= size):
                raise ValueError(f"adamw: scalar_tail positions must be in 0..{size - 1}")
            tails.append(np.unique(positions))
        else:
            tails.append(_tail_positions(layout, size, size % torch_cpu_vector_width(jnp.result_type(leaf))))
    return tails


def _resolve_layout(torch_layout, params: optax.Params) -> list[np.ndarray | None]:
    """One torch element order (or None) per parameter leaf, checked against the leaf's shape."""
    leaves = jax.tree.leaves(params)
    if torch_layout is None:
        return [None] * len(leaves)
    try:
        orders = jax.tree.structure(params).flatten_up_to(torch_layout)
    except (ValueError, TypeError) as err:
        raise ValueError(f"adamw: torch_layout does not match the parameter tree: {err}") from None
    paths = [jax.tree_util.keystr(path) or "<root>" for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for where, order, leaf in zip(paths, orders, leaves):
        if order is not None and np.shape(order) != jnp.shape(leaf):
            raise ValueError(f"adamw: torch_layout for parameter {where} has shape {np.shape(order)}, "
                             f"the parameter has shape {jnp.shape(leaf)}")
    return orders


def new_param(p, m, v, vmax, scalars, *, eps, decay, decay_rounding, amsgrad, grad=None):
    """``p_new`` from ``p`` and the new moments (``grad`` too for nesterov): torch's kernel, op for op.

    The -0.0 comes from the new exp_avg, not the gradient, so that XLA:CPU's
    pass computing the param reads p, m and v only (16 B/param, not 20); it is
    NaN where m is, and torch's p is NaN there too.
    """
    opmath = opmath_dtype(p.dtype)
    p, m, v = (x.astype(opmath) for x in (p, m, v))
    neg_zero = -jnp.minimum(jnp.abs(m), 0)  # -0.0 that XLA cannot fold (see the module docstring)
    if decay:
        # decay_rounding="precise": p - (lr*wd)*p rounds lr*wd instead of 1 - lr*wd, an error ~1e-5 times smaller.
        p = p * scalars.decay + neg_zero if decay_rounding == "torch" else p - scalars.lr_wd * p
    v_hat = vmax.astype(opmath) if amsgrad else v
    denom = jnp.sqrt(v_hat) / (scalars.bias_correction2_sqrt + neg_zero) + _as_scalar(eps, opmath)
    if scalars.nesterov_m is not None:  # optax's nesterov, not torch's AdamW
        return p + (scalars.nesterov_m * m + scalars.nesterov_g * grad.astype(opmath)) / denom
    return p + (scalars.step_size_neg * m) / denom


def validate_order(order) -> np.ndarray:
    order = np.asarray(order)
    if not np.issubdtype(order.dtype, np.integer) or not np.array_equal(np.sort(order, axis=None),
                                                                        np.arange(order.size)):
        raise ValueError(f"adamw: torch_layout leaves must be permutations of 0..numel-1, got {order!r}")
    return order


def _stored(x, dtype, opmath):
    """``x`` rounded to the tensor dtype, as every ATen op stores its result (bfloat16/float16); else ``x``."""
    return x.astype(dtype).astype(opmath) if jnp.dtype(dtype) != opmath else x


def loop_leaf_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars: StepScalars, *, b1, b2, eps, decay,
                   decay_rounding, amsgrad, maximize, torch_path, mu_dtype=None):
    r"""One step of torch's for-loop (``_single_tensor_adam``) or foreach path over a leaf, op by op.

    Each ATen op computes in ``opmath`` (float32 for half types) and stores its
    result in the tensor dtype; its scalar is the Python double rounded to
    ``opmath`` (``add_`` rounds it to the tensor dtype, and so do foreach's
    ``_foreach_mul_`` of the decay and of ``b2``).  Measured per op against
    torch 2.13 (``tests/jax_impl_tests/test_torch_paths.py``)::

      p  = R(p * decay)                     param.mul_(1 - lr*wd)
      m  = R(fma(w, g - m, m))              exp_avg.lerp_(grad, 1 - b1)   (w >= 0.5: fma(w - 1, g - m, g))
      v  = R(fma(c*g, g, R(v * b2)))        exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
      d  = R(R(R(sqrt(v)) / bc2_sqrt) + R(eps))
      p  = R(p + (-step_size * m) / d)      param.addcdiv_(exp_avg, denom, value=-step_size)

    The vector body and the scalar remainder of every op round alike, so
    there is no tail.  For float32 and float64 this is the fused kernel's
    vector formula, except for ``torch.sqrt``: MKL's ``vsSqrt``/``vdSqrt``
    (``VML_HA``), not correctly rounded, which ``cpu_kernel.vml_sqrt`` calls
    where MKL is found (``cpu_kernel.sqrt_source()``; docs/exactness.md).
    """
    dtype = param.dtype
    opmath = opmath_dtype(dtype)
    stored = functools.partial(_stored, dtype=dtype, opmath=opmath)
    g, m, v = (x.astype(opmath) for x in (grad, exp_avg, exp_avg_sq))
    if maximize:
        g = -g
    neg_zero = -jnp.minimum(jnp.abs(g), 0)  # -0.0 that XLA cannot fold (see _adamw's docstring)
    g = g + neg_zero  # rounded on its own: XLA may fuse the gradient's producer into this pass
    weight = _one_minus(b1, opmath)
    if is_traced(weight):
        m = jnp.where(jnp.abs(weight) < 0.5, m + weight * (g - m), g + (weight - 1) * (g - m))
    elif abs(weight) < 0.5:
        m = m + weight * (g - m)
    else:
        m = g + (weight - 1) * (g - m)
    m = stored(m)
    beta2 = _as_scalar(b2, opmath)
    if torch_path == "foreach":
        beta2 = stored(jnp.asarray(beta2))
    # One bare product in the sum: LLVM makes it fma(c*g, g, v*b2), addcmul's rounding (measured).
    v = stored(stored(beta2 * v + neg_zero) + (_one_minus(b2, opmath) * g) * g)
    new_max = jnp.maximum(max_exp_avg_sq.astype(opmath), v) if amsgrad else None  # torch.maximum propagates NaN
    p = loop_new_param(param, m, v, new_max, scalars, eps=eps, decay=decay, decay_rounding=decay_rounding,
                       amsgrad=amsgrad, torch_path=torch_path)
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return p, m.astype(mu_dtype or dtype), cast(v), cast(new_max)


def loop_new_param(param, m, v, vmax, scalars: StepScalars, *, eps, decay, decay_rounding, amsgrad, torch_path):
    """``p_new`` of the for-loop / foreach path from ``p`` and the stored new moments (see :func:`loop_leaf_step`)."""
    dtype = param.dtype
    opmath = opmath_dtype(dtype)
    stored = functools.partial(_stored, dtype=dtype, opmath=opmath)
    p, m, v = (x.astype(opmath) for x in (param, m, v))
    neg_zero = -jnp.minimum(jnp.abs(m), 0)
    if decay:
        if decay_rounding == "torch":
            factor = stored(scalars.decay) if torch_path == "foreach" else scalars.decay
            p = stored(p * factor + neg_zero)
        else:
            p = stored(p - scalars.lr_wd * p)
    v_hat = vmax.astype(opmath) if amsgrad else v
    # torch's float32/float64 Tensor.sqrt is MKL's (cpu_kernel.vml_sqrt); half types round a correct float32 one.
    root = cpu_kernel.vml_sqrt(v_hat) if jnp.dtype(dtype) == opmath else jnp.sqrt(v_hat)
    denom = stored(stored(root) / (scalars.bias_correction2_sqrt + neg_zero))
    denom = stored(denom + stored(jnp.asarray(_as_scalar(eps, opmath))))
    return stored(p + (scalars.step_size_neg * m) / denom).astype(dtype)
