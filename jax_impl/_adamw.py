"""AdamW for JAX with ``torch.optim.AdamW`` semantics and torch's CPU rounding.

The update is the one of torch's fused CPU kernel (``torch.optim.AdamW(fused=True)``),
operation by operation, so that on the CPU the jitted update reproduces torch's
parameters and moments bit for bit.  Three XLA:CPU habits stand in the way and
are each countered where they occur:

* LLVM contracts ``a * b + c`` into one FMA wherever it may.  torch's kernel
  has FMAs in some places (the ``lerp`` of the first moment, the second-moment
  update) and none in others (the weight-decay multiply).  Where a product
  must stay rounded on its own, a ``-0.0`` is added to it: ``fma(p, d, -0.0)``
  is the correctly rounded ``p * d`` whether or not LLVM contracts, and the
  following ``+ update`` can no longer fuse with the multiply.
* XLA rewrites division by a broadcast scalar into multiplication by its
  reciprocal.  torch divides, so the divisor is made elementwise by adding
  the same ``-0.0`` to it.
* torch's kernel processes each tensor in vectors of 32 bytes and finishes the
  last ``numel % width`` elements with scalar C++ whose FMA contraction differs
  (the second moment becomes ``fma(b2, v, (c * g) * g)`` instead of
  ``fma(c * g, g, b2 * v)``).  Those tail elements get the tail formula here.

The ``-0.0`` is ``-min(|g|, 0)``: exactly ``-0.0`` for every non-NaN gradient
(infinite ones included) and NaN only where torch's result is NaN too.

All of this is pinned by ``tests/test_jax_parity.py``, which fails if a
new XLA release contracts or rewrites differently.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from jax_impl import _cuda_rounding
from jax_impl import bias_correction as bc
from jax_impl import cpu_kernel
from jax_impl.schedules import TorchSchedule

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]
MaskOrFn = Any | Callable[[optax.Params], Any] | None

# torch's fused CPU kernel runs 32-byte vectors (measured on AVX2 and AVX512
# builds of torch 2.13); the remainder of each tensor takes the scalar path.
TORCH_CPU_VECTOR_BYTES = 32

DECAY_ROUNDINGS = ("torch", "precise")
KERNELS = ("auto", "xla", "cpu")

# Set by jax_impl.exact.apply_exact while it traces a wrapped transformation's
# update: each adamw update then reports its options and the params it saw.
_exact_recorders: list[Callable[[dict, optax.Params], None]] = []


class AdamWState(NamedTuple):
    """State of :func:`adamw`; every array leaf mirrors a parameter, so it shards like it."""

    count: jax.Array  # shape=(), dtype=jnp.int32: number of updates applied.
    exp_avg: optax.Updates  # first moment, shapes and dtypes of the params.
    exp_avg_sq: optax.Updates  # second moment, shapes and dtypes of the params.
    max_exp_avg_sq: optax.Updates | None  # running max of exp_avg_sq (amsgrad), else None.


class _StepScalars(NamedTuple):
    """Per-step scalars in the kernel's arithmetic dtype (float32, or float64 for float64 params)."""

    decay: jax.Array  # 1 - lr * weight_decay, rounded once as torch does
    lr_wd: jax.Array  # lr * weight_decay, for decay_rounding="precise"
    step_size_neg: jax.Array  # -lr / (1 - b1**t)
    bias_correction2_sqrt: jax.Array  # sqrt(1 - b2**t)
    # nesterov=True only (optax's formula, not torch's): -lr * b1 / (1 - b1**(t+1)) and -lr * (1 - b1) / (1 - b1**t).
    nesterov_m: jax.Array | None = None
    nesterov_g: jax.Array | None = None


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _concrete_hyperparameter(value):
    """A Python float for a concrete number or array (so the host computes torch's scalars); a tracer as it is.

    ``optax.inject_hyperparams`` passes its hyperparameters as arrays: concrete
    ones in ``init`` or outside ``jax.jit``, traced ones inside it.
    """
    if callable(value):
        return value
    if _is_traced(value):
        # inject_hyperparams gives complex hyperparameters for complex params; their value is real.
        return jnp.real(value) if jnp.issubdtype(value.dtype, jnp.complexfloating) else value
    return float(np.real(value))


def _validate_hyperparameters(learning_rate, b1, b2, eps, weight_decay, decay_rounding) -> None:
    # Same tests and wording as torch.optim.Adam, plus the name of our argument;
    # `not 0.0 <= x` also rejects NaN.  Traced values (injected hyperparameters
    # under jax.jit) cannot be tested without a host sync and are taken as they are.
    known = lambda x: not _is_traced(x)  # noqa: E731
    if not callable(learning_rate) and known(learning_rate) and not 0.0 <= learning_rate:
        raise ValueError(f"Invalid learning rate: {learning_rate} (learning_rate must be >= 0)")
    if known(eps) and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (eps must be >= 0)")
    if known(b1) and not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {b1} (b1 must be in [0, 1))")
    if known(b2) and not 0.0 <= b2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {b2} (b2 must be in [0, 1))")
    if known(weight_decay) and not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (weight_decay must be >= 0)")
    if decay_rounding not in DECAY_ROUNDINGS:
        raise ValueError(f"Invalid decay_rounding: {decay_rounding!r} (expected one of {DECAY_ROUNDINGS})")


def _opmath_dtype(dtype) -> jnp.dtype:
    """torch's ``opmath_type``: half types compute in float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def torch_cpu_vector_width(dtype) -> int:
    """Elements per vector in torch's fused CPU kernel for params of ``dtype``."""
    return TORCH_CPU_VECTOR_BYTES // jnp.dtype(dtype).itemsize


def _dtype_of(leaf) -> jnp.dtype:
    # A jax.ShapeDtypeStruct (init under jax.eval_shape, abstract params) has a dtype but no array.
    return jnp.dtype(leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else jnp.result_type(leaf)


def _check_params(params: optax.Params, mu_dtype=None) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        where = jax.tree_util.keystr(path) or "<root>"
        dtype = _dtype_of(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"adamw: parameter {where} has dtype {dtype}; AdamW needs floating-point parameters "
                "(float16, bfloat16, float32, float64) or complex ones (complex64, complex128)"
            )
        if mu_dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(
                mu_dtype, jnp.complexfloating):
            # optax would cast the moment to a real dtype and drop its imaginary part.
            raise TypeError(
                f"adamw: mu_dtype={mu_dtype} cannot hold the first moment of complex parameter {where} ({dtype}): "
                "a complex parameter needs a complex mu_dtype (or None)"
            )


def _is_complex(leaf) -> bool:
    return jnp.issubdtype(_dtype_of(leaf), jnp.complexfloating)


def _real_view(x):
    """torch.view_as_real: a complex array as real pairs in a trailing axis of 2."""
    return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1) if x is not None and _is_complex(x) else x


def _from_real_view(x, dtype):
    return jax.lax.complex(x[..., 0], x[..., 1]).astype(dtype)


def _cast_grads(grads: optax.Updates, params: optax.Params) -> optax.Updates:
    """Gradients in the params' dtypes, as optax casts them (float32 grads for bfloat16 params, ...).

    Only floating to floating (or complex) casts: an integer gradient, or a
    complex one for a real parameter, is refused with the parameter's path.
    """
    if jax.tree.structure(grads) != jax.tree.structure(params):
        return grads  # _check_grads names both trees
    def cast(path, g, p):
        g_dtype, p_dtype = jnp.result_type(g), jnp.result_type(p)
        if g_dtype == p_dtype:
            return g
        if not jnp.issubdtype(g_dtype, jnp.inexact) or (
                jnp.issubdtype(g_dtype, jnp.complexfloating) and not jnp.issubdtype(p_dtype, jnp.complexfloating)):
            raise TypeError(
                f"adamw: gradient for parameter {jax.tree_util.keystr(path) or '<root>'} has dtype {g_dtype}, "
                f"which cannot be cast to the parameter's dtype {p_dtype}"
            )
        return jnp.asarray(g).astype(p_dtype)
    return jax.tree_util.tree_map_with_path(cast, grads, params)


def _check_state(state: AdamWState, params: optax.Params, mu_dtype, amsgrad: bool) -> None:
    """Refuses a state whose moments do not mirror the params (XLA would broadcast them silently)."""
    if not isinstance(state, AdamWState):
        raise TypeError(f"adamw: state must be the AdamWState made by init, got {type(state).__name__}")
    treedef = jax.tree.structure(params)
    paths = [jax.tree_util.keystr(path) or "<root>" for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    fields = [("exp_avg", mu_dtype), ("exp_avg_sq", None)] + ([("max_exp_avg_sq", None)] if amsgrad else [])
    for field, field_dtype in fields:
        tree = getattr(state, field)
        try:
            leaves = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(f"adamw: state.{field} does not match the parameter tree: {err}") from None
        for where, leaf, p in zip(paths, leaves, jax.tree.leaves(params)):
            if leaf is None or jnp.shape(leaf) != jnp.shape(p):
                raise ValueError(f"adamw: state.{field} for parameter {where} has shape "
                                 f"{None if leaf is None else jnp.shape(leaf)}, the parameter has shape {jnp.shape(p)}")
            expected = jnp.dtype(field_dtype or jnp.result_type(p))
            if jnp.result_type(leaf) != expected:
                raise TypeError(f"adamw: state.{field} for parameter {where} has dtype {jnp.result_type(leaf)}, "
                                f"expected {expected}")


def _with_delta(delta, new_params, params):
    """``new_params``, or the optax updates ``delta(new, old)`` leaf by leaf when a ``delta`` is given."""
    return new_params if delta is None else jax.tree.map(delta, new_params, params)


def _conventions_step(grads, state: AdamWState, params, delta=None, **options):
    """:func:`_adamw_step` behind optax's conventions: grads cast to the params' dtypes, the state checked, an
    empty tree, complex params as torch treats them (``torch.view_as_real``: each real and imaginary part is a
    parameter of its own)."""
    if params is None:
        raise ValueError("adamw: update() needs params (decoupled weight decay reads them)")
    grads = _cast_grads(grads, params)
    _check_grads(grads, params)
    _check_state(state, params, options["mu_dtype"], options["amsgrad"])
    if not jax.tree.leaves(params):
        return params, state._replace(count=optax.safe_increment(state.count))
    mu_dtype = options["mu_dtype"]
    complex_mu = mu_dtype is not None and jnp.issubdtype(mu_dtype, jnp.complexfloating)
    if not complex_mu and not any(_is_complex(p) for p in jax.tree.leaves(params)):
        return _adamw_step(grads, state, params, delta=delta, **options)
    # The mask is resolved on the complex params (a callable may look at their ndim).
    mask = options["mask"]
    options = dict(options, mask=mask(params) if callable(mask) else mask,
                   mu_dtype=None if mu_dtype is None else jnp.finfo(mu_dtype).dtype)  # complex64 -> float32

    def to_real(x, p):  # a complex param's leaves as its real view; a real param's complex moment (mu_dtype) as its real part
        return None if x is None else _real_view(x) if _is_complex(p) else jnp.real(x)

    def back(new, old, p):
        return None if new is None else _from_real_view(new, old.dtype) if _is_complex(p) else new.astype(old.dtype)

    real = lambda tree: None if tree is None else jax.tree.map(to_real, tree, params)  # noqa: E731
    moments = [state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq]
    new_params, new_state = _adamw_step(real(grads), AdamWState(state.count, *map(real, moments)), real(params),
                                        **options)
    new_moments = [None if old is None else jax.tree.map(back, new, old, params)
                   for new, old in zip(new_state[1:], moments)]
    new_params = jax.tree.map(back, new_params, params, params)
    return _with_delta(delta, new_params, params), AdamWState(new_state.count, *new_moments)


def _check_grads(grads: optax.Updates, params: optax.Params) -> None:
    params_def = jax.tree.structure(params)
    grads_def = jax.tree.structure(grads)
    if params_def != grads_def:
        raise ValueError(
            f"adamw: the gradient tree does not match the parameter tree:\n"
            f"  params: {params_def}\n  grads:  {grads_def}"
        )
    for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(params)):
        where = jax.tree_util.keystr(path) or "<root>"
        if jnp.shape(g) != jnp.shape(p):
            raise ValueError(
                f"adamw: gradient for parameter {where} has shape {jnp.shape(g)}, "
                f"the parameter has shape {jnp.shape(p)}"
            )
        if jnp.result_type(g) != jnp.result_type(p):
            raise TypeError(
                f"adamw: gradient for parameter {where} has dtype {jnp.result_type(g)}, "
                f"the parameter has dtype {jnp.result_type(p)}"
            )


def _resolve_mask(mask: MaskOrFn, params: optax.Params) -> list[bool]:
    """One Python bool per parameter leaf: True where weight decay applies."""
    leaves = jax.tree.leaves(params)
    if mask is None:
        return [True] * len(leaves)
    mask_tree = mask(params) if callable(mask) else mask
    try:
        flags = jax.tree.structure(params).flatten_up_to(mask_tree)
    except (ValueError, TypeError) as err:
        raise ValueError(f"adamw: mask does not match the parameter tree: {err}") from None
    resolved = []
    for flag in flags:
        if isinstance(flag, jax.core.Tracer):
            raise TypeError("adamw: mask leaves must be Python bools (they choose code paths), got a traced array")
        resolved.append(bool(flag))
    return resolved


def _table_lookup(table: np.ndarray, saturated: bool, t: jax.Array, dtype,
                  beyond: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``table[t - 1]`` rounded to ``dtype``; ``beyond(t)`` past an unsaturated table."""
    value = jnp.asarray(table, dtype)[jnp.minimum(t, table.shape[0]) - 1]
    if saturated:
        return value
    return jnp.where(t <= table.shape[0], value, beyond(t).astype(dtype))


def _scalar_arithmetic_dtype() -> jnp.dtype:
    """float64 for the per-step scalars of traced hyperparameters, where the backend has it (not on TPU)."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "tpu" else jnp.dtype(jnp.float64)


def _traced_step_scalars(learning_rate, b1, b2, weight_decay, count, t, dtype, wide=None) -> _StepScalars:
    """The scalars of :func:`_step_scalars` when a hyperparameter is traced (``optax.inject_hyperparams`` under jit).

    torch computes them in double from its Python floats and rounds once to
    ``dtype``; here the same double operations run in the graph, in a scoped
    ``jax.enable_x64`` (the traced values are float32 or narrower, so their
    double value is exact).  For a traced lr and weight decay with concrete
    betas this is bitwise torch's with ``lr=float(lr)``: the bias corrections
    come from the same host tables.  A traced beta's ``1 - beta**t`` uses XLA's
    double ``pow`` instead of libm's (equal after rounding to float32 unless
    the two differ across a float32 rounding boundary).  On a backend without
    float64 (``wide=float32``) the arithmetic is float32 and rounds twice
    (measured in ``tests/test_optax_conventions.py``).
    """
    wide = jnp.dtype(wide or _scalar_arithmetic_dtype())
    scope = _cuda_rounding.x64_scope() if wide == jnp.float64 else contextlib.nullcontext()
    with scope:
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr).astype(wide)
        wd = jnp.asarray(weight_decay).astype(wide)
        # torch's step is a float32 tensor (stuck at 2**24), read back as a double.
        t_wide = jnp.minimum(t, bc.TORCH_STEP_LIMIT).astype(jnp.float32).astype(wide)

        def bias_correction(beta):
            if _is_traced(beta):
                return 1 - jnp.asarray(beta).astype(wide) ** t_wide
            table = bc.bias_correction(beta)
            return _table_lookup(table, bc.is_saturated(table), t, wide,
                                 lambda t: 1 - jnp.asarray(beta, wide) ** t_wide)

        # Each product and quotient is followed by + (-0.0) that XLA cannot fold,
        # so LLVM cannot contract it into the next add (torch's double
        # arithmetic has no FMA here): fma(a, b, -0.0) is the rounded a * b.
        neg_zero = -jnp.minimum(jnp.abs(lr), 0)
        lr_wd = lr * wd + neg_zero
        decay = 1 - lr_wd
        step_size_neg = -(lr / bias_correction(b1) + neg_zero)
        bias_correction2_sqrt = jnp.sqrt(bias_correction(b2))
        return _StepScalars(decay.astype(dtype), lr_wd.astype(dtype), step_size_neg.astype(dtype),
                            bias_correction2_sqrt.astype(dtype))


def _nesterov_scalars(scalars: _StepScalars, b1, t, dtype) -> _StepScalars:
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
    on 15,000 random counts in [2**22, 2**31) (tests/test_jax_api.py).
    """
    with _cuda_rounding.x64_scope():
        return fn(*args)


def _bias_correction_double(beta: float, t: jax.Array) -> jax.Array:
    """``1 - beta**step`` in float64 (call under :func:`_in_graph_double`), ``step`` torch's float32 step.

    torch's ``step`` is a float32 tensor incremented by 1: it stops at 2**24
    (2**24 + 1 rounds back to 2**24), so every later update uses step 2**24.
    """
    step = jnp.minimum(t, bc.TORCH_STEP_LIMIT).astype(jnp.float32)
    return 1.0 - jnp.asarray(beta, jnp.float64) ** step.astype(jnp.float64)


def _step_scalars(learning_rate, b1, b2, weight_decay, count, t, dtype) -> _StepScalars:
    """Scalars of step ``t`` computed as torch computes them: in double, then rounded to ``dtype``."""
    if any(_is_traced(x) for x in (learning_rate, b1, b2, weight_decay)):
        return _traced_step_scalars(learning_rate, b1, b2, weight_decay, count, t, dtype)
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
        step_size_neg = _table_lookup(-(lr_ext / bc1_ext), bc1_saturated, t, dtype, lambda t: _in_graph_double(
            lambda t: (-(lr_last / _bias_correction_double(b1, t))).astype(dtype), t))
        decay = _table_lookup(1.0 - lr_ext * weight_decay, True, t, dtype, None)
        lr_wd = _table_lookup(lr_ext * weight_decay, True, t, dtype, None)
    elif callable(learning_rate):
        # The schedule is traced: its dtype (float32, or float64 under
        # jax_enable_x64) is the precision of the lr arithmetic.
        lr = jnp.asarray(learning_rate(count))
        wide = lr.dtype
        bias_correction1 = _table_lookup(bc1_table, bc1_saturated, t, wide, lambda t: _in_graph_double(
            lambda t: _bias_correction_double(b1, t).astype(wide), t))
        step_size_neg = (-(lr / bias_correction1)).astype(dtype)
        decay = (1 - lr * weight_decay).astype(dtype)
        lr_wd = (lr * weight_decay).astype(dtype)
    else:
        step_size_neg = _table_lookup(-(learning_rate / bc1_table), bc1_saturated, t, dtype, lambda t: _in_graph_double(
            lambda t: (-(learning_rate / _bias_correction_double(b1, t))).astype(dtype), t))
        decay = jnp.asarray(1.0 - learning_rate * weight_decay, dtype)
        lr_wd = jnp.asarray(learning_rate * weight_decay, dtype)
    bias_correction2_sqrt = _table_lookup(np.sqrt(bc2_table), bc2_saturated, t, dtype, lambda t: _in_graph_double(
        lambda t: jnp.sqrt(_bias_correction_double(b2, t)).astype(dtype), t))
    return _StepScalars(decay, lr_wd, step_size_neg, bias_correction2_sqrt)


def _as_scalar(value, dtype):
    """``dtype(value)``: a Python float rounded once, or a traced hyperparameter cast in the graph."""
    return jnp.asarray(value).astype(dtype) if _is_traced(value) else dtype.type(value)


def _one_minus(beta, dtype):
    """``dtype(1 - beta)`` rounded once, as torch rounds its double: exact in ``dtype`` arithmetic too,
    since a traced beta is float32 or narrower and ``1 - beta`` is then exact before the one rounding."""
    return 1 - jnp.asarray(beta).astype(dtype) if _is_traced(beta) else dtype.type(1 - beta)


def _leaf_formula(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars: _StepScalars, *,
                  b1, b2, eps, decay, decay_rounding, amsgrad, maximize, tail, mu_dtype=None):
    """One kernel pass over a leaf; ``tail`` is False (vector formula), True (scalar) or a mask of the scalar's elements.

    Returns new (param, exp_avg, exp_avg_sq, max_exp_avg_sq).
    """
    dtype = param.dtype
    opmath = _opmath_dtype(dtype)
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
    if _is_traced(weight):  # an injected b1: both of lerp's branches, selected in the graph
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
    p = _new_param(p, m, v, new_max, scalars, eps=eps, decay=decay, decay_rounding=decay_rounding,
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


def _leaf_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, *, tail_positions: np.ndarray,
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


def _resolve_tails(torch_layout, scalar_tail, params: optax.Params) -> list[np.ndarray]:
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


def _adamw_step(grads, state: AdamWState, params, *, learning_rate, b1, b2, eps, weight_decay,
                amsgrad, maximize, mask, decay_rounding, torch_layout, scalar_tail, kernel, mu_dtype=None,
                nesterov=False, rounding="torch-cpu", delta=None):
    """New (params, state): the whole update, shared by ``update`` and :func:`apply_exact`.

    With ``delta`` (``delta(new_param, param)``, the optax update of a leaf),
    (updates, state) instead; the CPU kernel then writes float32 leaves'
    updates itself, reading the params without overwriting them, so XLA copies
    nothing to keep them for the caller.
    """
    contraction = _cuda_rounding.resolve(rounding)
    if contraction is not None and (nesterov or mu_dtype is not None):
        if rounding != "auto":
            raise ValueError(f"adamw: rounding={rounding!r} follows torch's CUDA kernel, which has no nesterov "
                             "or mu_dtype; use rounding='torch-cpu' (or 'auto') with them")
        contraction = None
    if contraction is not None:  # torch's CUDA kernel's rounding: its own module
        new_params, new_state = _cuda_rounding.adamw_step(
            grads, state, params, contraction, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, mask=mask, kernel=kernel)
        return _with_delta(delta, new_params, params), new_state
    if params is None:
        raise ValueError("adamw: update() needs params (decoupled weight decay reads them)")
    _check_grads(grads, params)
    decay_flags = _resolve_mask(mask, params)
    tails = _resolve_tails(torch_layout, scalar_tail, params)
    # The kernel takes b1, b2 and eps as compile-time attributes: injected
    # (traced) ones go through the XLA path, which agrees with it bit for bit.
    use_kernel = _use_kernel(kernel) and not any(_is_traced(x) for x in (b1, b2, eps))
    count = state.count
    t = optax.safe_increment(count)
    param_leaves, treedef = jax.tree.flatten(params)
    grad_leaves = treedef.flatten_up_to(grads)
    exp_avg_leaves = treedef.flatten_up_to(state.exp_avg)
    exp_avg_sq_leaves = treedef.flatten_up_to(state.exp_avg_sq)
    max_leaves = treedef.flatten_up_to(state.max_exp_avg_sq) if amsgrad else [None] * len(param_leaves)

    scalars_by_dtype: dict = {}
    results: list = [None] * len(param_leaves)
    kernel_groups: dict[tuple[bool, str], list[int]] = {}  # (decay flag, kernel mode) -> leaves for the CPU kernel
    for i, (p, g, m, v, vmax, decay_on, tail_positions) in enumerate(zip(
            param_leaves, grad_leaves, exp_avg_leaves, exp_avg_sq_leaves, max_leaves, decay_flags, tails)):
        opmath = _opmath_dtype(p.dtype)
        if opmath not in scalars_by_dtype:
            scalars_by_dtype[opmath] = _step_scalars(learning_rate, b1, b2, weight_decay, count, t, opmath)
            if nesterov:
                scalars_by_dtype[opmath] = _nesterov_scalars(scalars_by_dtype[opmath], b1, t, opmath)
        decay = decay_on and (_is_traced(weight_decay) or weight_decay != 0)
        if (use_kernel and p.dtype == jnp.float32 and decay_rounding == "torch" and not nesterov
                and m.dtype == jnp.float32):
            if p.size:
                kernel_groups.setdefault((decay, _kernel_mode(delta is not None, p.size)), []).append(i)
            else:
                results[i] = (p, m, v, vmax)
            continue
        results[i] = _leaf_step(p, g, m, v, vmax, scalars_by_dtype[opmath], b1=b1, b2=b2, eps=eps, decay=decay,
                                decay_rounding=decay_rounding, amsgrad=amsgrad, maximize=maximize,
                                tail_positions=tail_positions, mu_dtype=mu_dtype)
    scalars = scalars_by_dtype.get(jnp.dtype(jnp.float32))
    for (decay, mode), indices in kernel_groups.items():
        leaves = [(param_leaves[i], grad_leaves[i], exp_avg_leaves[i], exp_avg_sq_leaves[i], max_leaves[i])
                  for i in indices]
        out = cpu_kernel.step(leaves, jnp.stack([scalars.decay, scalars.step_size_neg, scalars.bias_correction2_sqrt]),
                              [tails[i] for i in indices], b1=b1, b2=b2, eps=eps, maximize=maximize, decay=decay,
                              amsgrad=amsgrad, mode=mode)
        for i, (new_p, *moments) in zip(indices, out):
            if mode == "moments":  # the param from the new moments, in XLA's pass with the caller's apply_updates
                new_p = _new_param(param_leaves[i], *moments, scalars, eps=eps, decay=decay,
                                   decay_rounding=decay_rounding, amsgrad=amsgrad)
            results[i] = (new_p, *moments)
    if delta is not None:
        # The kernel's "update" leaves hold their updates already (float32, as
        # delta gives float32 params); the others get theirs here.
        written = {i for (_, mode), indices in kernel_groups.items() if mode == "update" for i in indices}
        results = [r if i in written else (delta(r[0], param_leaves[i]), *r[1:]) for i, r in enumerate(results)]

    new_params, new_m, new_v, new_max = (treedef.unflatten(list(column)) for column in zip(*results))
    new_state = AdamWState(count=t, exp_avg=new_m, exp_avg_sq=new_v,
                           max_exp_avg_sq=new_max if amsgrad else None)
    return new_params, new_state


# In optax's update the kernel writes the update of leaves up to this many
# elements; of larger ones only the moments, in place, and XLA computes the
# param in one pass with apply_updates' add.  The kernel's update needs a
# buffer of its own, which XLA:CPU allocates per call, from fresh pages once it
# is large; small leaves save XLA a program each.  Measured: benchmarks/step_time.py.
_UPDATE_KERNEL_MAX_SIZE = 1 << 16


def _kernel_mode(optax_update: bool, size: int) -> str:
    if not optax_update:
        return "in_place"
    return "update" if size <= _UPDATE_KERNEL_MAX_SIZE else "moments"


def _new_param(p, m, v, vmax, scalars, *, eps, decay, decay_rounding, amsgrad, grad=None):
    """``p_new`` from ``p`` and the new moments (``grad`` too for nesterov): torch's kernel, op for op.

    The -0.0 comes from the new exp_avg, not the gradient, so that XLA:CPU's
    pass computing the param reads p, m and v only (16 B/param, not 20); it is
    NaN where m is, and torch's p is NaN there too.
    """
    opmath = _opmath_dtype(p.dtype)
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


def _use_kernel(kernel: str) -> bool:
    if kernel == "xla":
        return False
    if kernel == "cpu":
        if not cpu_kernel.available():
            raise RuntimeError("adamw: kernel='cpu' asked for, but the CPU kernel could not be built")
        return True
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and cpu_kernel.available()


def _validate_order(order) -> np.ndarray:
    order = np.asarray(order)
    if not np.issubdtype(order.dtype, np.integer) or not np.array_equal(np.sort(order, axis=None),
                                                                        np.arange(order.size)):
        raise ValueError(f"adamw: torch_layout leaves must be permutations of 0..numel-1, got {order!r}")
    return order


def _update_dtype(dtype) -> jnp.dtype:
    # optax's convention: updates have the params' dtype (lax.cond around
    # tx.update and optax's dtype checks rely on it).  For bfloat16/float16
    # params p + (p_new - p) then rounds twice; apply_exact is exact.
    return jnp.dtype(dtype)


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    mask: MaskOrFn = None,
    decay_rounding: str = "torch",
    torch_layout: Any | None = None,
    scalar_tail: Any | None = None,
    kernel: str = "auto",
    mu_dtype: Any | None = None,
    nesterov: bool = False,
    rounding: str | _cuda_rounding.CudaRounding = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW with decoupled weight decay, following ``torch.optim.AdamW``.

    Defaults are torch's (``weight_decay=1e-2``; optax's ``adamw`` uses 1e-4).
    With :math:`g_t` the gradient (negated when ``maximize``), :math:`\gamma_t`
    the learning rate and :math:`\lambda` the weight decay, step :math:`t` is

    .. math::

      \begin{aligned}
        \theta' &\leftarrow \theta_{t-1} (1 - \gamma_t \lambda) \\
        m_t &\leftarrow m_{t-1} + (1 - \beta_1)(g_t - m_{t-1}) \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
        \theta_t &\leftarrow \theta' - \frac{\gamma_t}{1 - \beta_1^t}\,
                   \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
      \end{aligned}

    evaluated with the rounding of torch's fused CPU kernel, so that on the CPU
    it equals ``torch.optim.AdamW(fused=True)`` bit for bit (see the module
    docstring).  A schedule is called with the update count before this update
    (0, 1, ...), which is the lr torch uses when an ``lr_scheduler`` is stepped
    after each ``optimizer.step()``.

    Args:
      learning_rate: a float, or a schedule mapping the update count to the lr.
      b1, b2: the exponential decay rates of the moments (torch's ``betas``).
      eps: added to the denominator, after the bias correction (as in torch).
      weight_decay: decoupled weight decay :math:`\lambda`.
      amsgrad: use the running maximum of :math:`v_t` (Reddi et al., 2018).
      maximize: maximize the objective (the gradient is negated).
      mask: a pytree of bools like the params, or a callable returning one;
        weight decay applies where True (as in ``optax.adamw``), like a torch
        param group with ``weight_decay=0`` where False.
      decay_rounding: ``"torch"`` multiplies by ``1 - lr*wd`` rounded to float32,
        as torch does (pytorch/pytorch#64475: at lr=1e-3, wd=1e-2 that factor
        is off by -1.36e-8, a bias toward zero); ``"precise"`` computes
        ``p - (lr*wd)*p`` instead, whose rounding error is ~1e5 times smaller.
      torch_layout: for bit parity with torch when the params are the torch
        tensors in another layout (Flax kernels are transposed): a pytree like
        the params whose leaves are None (same element order as torch) or an
        int array of the leaf's shape holding each element's flat index in the
        torch tensor (``crosscheck.convert.torch_layout`` builds it).  It picks
        the elements that get the rounding of torch's scalar tail (the last
        ``numel % width`` in torch's order); the math is the same either way.
      scalar_tail: the same choice made explicitly: a pytree like the params
        of int arrays, the flat positions that get the tail's rounding (e.g.
        each tensor's tail inside a flat buffer: ``jax_impl.flat``).
      kernel: ``"xla"`` computes the step with XLA ops (any backend, shards
        without communication); ``"cpu"`` sends float32 leaves to a one-pass
        C++ kernel through ``jax.ffi`` (built on first use; ~3x less memory
        traffic than XLA:CPU's fusions); ``"auto"`` (default) uses the kernel on
        a single-device CPU backend when it builds, else XLA.  In optax's
        ``update`` the kernel writes the update of leaves up to 65,536
        elements, and only the moments of larger ones, whose param XLA
        computes in one pass with ``optax.apply_updates``' add (their update
        would need a fresh buffer per call).  The two agree bit for bit.
        Injected (traced) b1, b2 or eps, ``nesterov`` and a ``mu_dtype`` other
        than float32 take the XLA path.
      mu_dtype: the dtype the first moment is stored in (optax's memory saver,
        e.g. ``jnp.bfloat16``); None: the params' dtype.  The step computes in
        float32 (float64 for float64 params) either way.
      nesterov: optax's Nesterov momentum (``optax.adamw(nesterov=True)``);
        torch's AdamW has none, so this is not torch-exact.
      rounding: whose rounding to reproduce: ``"torch-cpu"`` (torch's fused CPU
        kernel, as above), ``"torch-cuda"`` (torch's fused CUDA kernel: moments
        and decay in double, rounded once; ``jax_impl._cuda_rounding`` has the
        model; computed with float64 scoped to the update, dtypes unchanged),
        or ``"auto"`` (default): torch-cuda on a GPU backend, else torch-cpu.
        A ``jax_impl.CudaRounding`` picks nvcc's FMA contractions explicitly.
        ``nesterov`` and ``mu_dtype`` are optax's, with no CUDA-kernel twin:
        ``"auto"`` then takes the CPU rounding.

    Hyperparameters may be arrays, as ``optax.inject_hyperparams`` passes
    them: concrete ones are validated and used as Python floats; traced ones
    (under ``jax.jit``) are not validated and the per-step scalars are computed
    in the graph in float64 (scoped ``jax.enable_x64``; float32 on TPU), which
    is bitwise torch's given the same floats (``tests/test_optax_conventions.py``).

    Complex params are treated as torch treats them (``torch.view_as_real``:
    real and imaginary parts are separate parameters); the moments are
    complex arrays like the params, their real views torch's moments.
    ``torch_layout`` and ``scalar_tail`` of a complex leaf refer to its real view.
    Gradients of another floating dtype are cast to the params' dtypes.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra ``update`` arguments
      are accepted and ignored).  Updates have the params' dtypes (optax's
      convention); ``optax.apply_updates`` recovers torch's parameters exactly
      wherever ``p_new - p`` is exact in that dtype (for float32 whenever
      ``p_new`` and ``p`` are within a factor 2, i.e. not for a parameter that
      crosses or nears zero; for bfloat16/float16 rarely).  :func:`apply_exact`
      returns the new params themselves and is exact everywhere.

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015.
    """
    learning_rate, b1, b2, eps, weight_decay = (_concrete_hyperparameter(x)
                                                for x in (learning_rate, b1, b2, eps, weight_decay))
    _validate_hyperparameters(learning_rate, b1, b2, eps, weight_decay, decay_rounding)
    if kernel not in KERNELS:
        raise ValueError(f"Invalid kernel: {kernel!r} (choose from {KERNELS})")
    _cuda_rounding.check_rounding(rounding)
    if torch_layout is not None:
        torch_layout = jax.tree.map(_validate_order, torch_layout)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    if mu_dtype is not None and not jnp.issubdtype(mu_dtype, jnp.inexact):
        raise ValueError(f"Invalid mu_dtype: {mu_dtype} (mu_dtype must be a floating or complex dtype)")
    options = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                   mu_dtype=mu_dtype, nesterov=bool(nesterov), amsgrad=bool(amsgrad), maximize=bool(maximize),
                   mask=mask, decay_rounding=decay_rounding, torch_layout=torch_layout, scalar_tail=scalar_tail,
                   kernel=kernel, rounding=rounding)

    def zeros_like(p, dtype=None):
        if isinstance(p, jax.ShapeDtypeStruct):  # as optax's init accepts it
            return jnp.zeros(p.shape, dtype or p.dtype, device=p.sharding)
        # shard_alike: each moment takes its parameter's sharding, also when
        # init runs under jax.jit (plain zeros_like would land on one device).
        return shard_alike(jnp.zeros_like(p, dtype), p)[0]

    def init_fn(params: optax.Params) -> AdamWState:
        _check_params(params, mu_dtype)
        zeros = lambda dtype=None: jax.tree.map(lambda p: zeros_like(p, dtype), params)  # noqa: E731
        return AdamWState(count=jnp.zeros([], jnp.int32), exp_avg=zeros(mu_dtype), exp_avg_sq=zeros(),
                          max_exp_avg_sq=zeros() if amsgrad else None)

    def step_fn(grads, state, params):
        return _conventions_step(grads, state, params, **options)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # optax.GradientTransformationExtraArgs: extra arguments are for other transformations
        for record in _exact_recorders:
            record(options, params)
        def delta(new, old):
            dtype = _update_dtype(old.dtype)
            return new.astype(dtype) - old.astype(dtype)

        # The step computes each leaf's delta itself (the CPU kernel writes it directly).
        return _conventions_step(updates, state, params, delta=delta, **options)

    update_fn.exact_step = step_fn
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# This module's annotations are strings (``from __future__ import annotations``);
# code that inspects ``learning_rate``'s annotation for optax's
# ``ScalarOrSchedule`` (optax's contrib tests do) finds optax's own object.
adamw.__annotations__["learning_rate"] = optax.ScalarOrSchedule


def apply_exact(tx: optax.GradientTransformation, grads: optax.Updates, state: optax.OptState,
                params: optax.Params, **extra_args) -> tuple[optax.Params, optax.OptState]:
    """One step of ``tx`` returning the new params themselves (see :func:`jax_impl.exact.apply_exact`)."""
    from jax_impl import exact

    return exact.apply_exact(tx, grads, state, params, **extra_args)
