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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

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


def _validate_hyperparameters(learning_rate, b1, b2, eps, weight_decay, decay_rounding) -> None:
    # Same tests and wording as torch.optim.Adam, plus the name of our argument;
    # `not 0.0 <= x` also rejects NaN.
    if not callable(learning_rate) and not 0.0 <= learning_rate:
        raise ValueError(f"Invalid learning rate: {learning_rate} (learning_rate must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (eps must be >= 0)")
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {b1} (b1 must be in [0, 1))")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {b2} (b2 must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (weight_decay must be >= 0)")
    if decay_rounding not in DECAY_ROUNDINGS:
        raise ValueError(f"Invalid decay_rounding: {decay_rounding!r} (expected one of {DECAY_ROUNDINGS})")


def _opmath_dtype(dtype) -> jnp.dtype:
    """torch's ``opmath_type``: half types compute in float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def torch_cpu_vector_width(dtype) -> int:
    """Elements per vector in torch's fused CPU kernel for params of ``dtype``."""
    return TORCH_CPU_VECTOR_BYTES // jnp.dtype(dtype).itemsize


def _check_params(params: optax.Params) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"adamw: parameter {jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}; "
                "AdamW needs floating-point parameters (float16, bfloat16, float32, float64)"
            )


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


def _step_scalars(learning_rate, b1, b2, weight_decay, count, t, dtype) -> _StepScalars:
    """Scalars of step ``t`` computed as torch computes them: in double, then rounded to ``dtype``."""
    bc1_table, bc2_table = bc.bias_correction(b1), bc.bias_correction(b2)
    bc1_saturated, bc2_saturated = bc.is_saturated(bc1_table), bc.is_saturated(bc2_table)
    in_graph_bc = lambda beta, t, dt: 1 - jnp.asarray(beta, dt) ** t.astype(dt)  # noqa: E731
    if isinstance(learning_rate, TorchSchedule):
        # torch's lr of every step is a Python float, tabulated: derive the
        # step's scalars from it in double on the host, as torch's kernel does.
        lr_table = learning_rate.table
        n = max(len(lr_table), len(bc1_table))
        lr_ext = np.concatenate([lr_table, np.full(n - len(lr_table), lr_table[-1])])
        bc1_ext = np.concatenate([bc1_table, np.full(n - len(bc1_table), bc1_table[-1])])
        lr_last = float(lr_table[-1])
        step_size_neg = _table_lookup(-(lr_ext / bc1_ext), bc1_saturated, t, dtype,
                                      lambda t: -(lr_last / in_graph_bc(b1, t, dtype)))
        decay = _table_lookup(1.0 - lr_ext * weight_decay, True, t, dtype, None)
        lr_wd = _table_lookup(lr_ext * weight_decay, True, t, dtype, None)
    elif callable(learning_rate):
        # The schedule is traced: its dtype (float32, or float64 under
        # jax_enable_x64) is the precision of the lr arithmetic.
        lr = jnp.asarray(learning_rate(count))
        wide = lr.dtype
        bias_correction1 = _table_lookup(bc1_table, bc1_saturated, t, wide,
                                         lambda t: in_graph_bc(b1, t, wide))
        step_size_neg = (-(lr / bias_correction1)).astype(dtype)
        decay = (1 - lr * weight_decay).astype(dtype)
        lr_wd = (lr * weight_decay).astype(dtype)
    else:
        step_size_neg = _table_lookup(-(learning_rate / bc1_table), bc1_saturated, t, dtype,
                                      lambda t: -(learning_rate / in_graph_bc(b1, t, dtype)))
        decay = jnp.asarray(1.0 - learning_rate * weight_decay, dtype)
        lr_wd = jnp.asarray(learning_rate * weight_decay, dtype)
    bias_correction2_sqrt = _table_lookup(np.sqrt(bc2_table), bc2_saturated, t, dtype,
                                          lambda t: jnp.sqrt(in_graph_bc(b2, t, dtype)))
    return _StepScalars(decay, lr_wd, step_size_neg, bias_correction2_sqrt)


def _leaf_formula(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars: _StepScalars, *,
                  b1, b2, eps, decay, decay_rounding, amsgrad, maximize, tail):
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

    if decay:
        if decay_rounding == "torch":
            p = p * scalars.decay + neg_zero
        else:
            # p - (lr*wd)*p: lr*wd is rounded instead of 1 - lr*wd, an error ~1e-5 times smaller.
            p = p - scalars.lr_wd * p

    # exp_avg.lerp_(grad, 1 - b1), as torch's kernel writes it: one FMA.
    weight = opmath.type(1 - b1)
    if abs(weight) < 0.5:
        m = m + weight * (g - m)
    else:
        m = g + (weight - 1) * (g - m)

    coefficient2 = opmath.type(1 - b2)
    beta2 = opmath.type(b2)
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
    v_for_denom = v
    new_max = None
    if amsgrad:
        # vec::maximum propagates NaN; the tail's std::max keeps the old value.
        scalar_max, vector_max = jnp.where(old_max < v, v, old_max), jnp.maximum(old_max, v)
        new_max = scalar_max if tail is True else vector_max if tail is False else \
            jnp.where(tail, scalar_max, vector_max)
        v_for_denom = new_max
    denom = jnp.sqrt(v_for_denom) / (scalars.bias_correction2_sqrt + neg_zero) + opmath.type(eps)
    p = p + (scalars.step_size_neg * m) / denom

    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return cast(p), cast(m), cast(v), cast(new_max)


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
                amsgrad, maximize, mask, decay_rounding, torch_layout, scalar_tail, kernel, delta=None):
    """New (params, state): the whole update, shared by ``update`` and :func:`apply_exact`.

    With ``delta`` (``delta(new_param, param)``, the optax update of a leaf),
    (updates, state) instead; the CPU kernel then writes float32 leaves'
    updates itself, reading the params without overwriting them, so XLA copies
    nothing to keep them for the caller.
    """
    if params is None:
        raise ValueError("adamw: update() needs params (decoupled weight decay reads them)")
    _check_grads(grads, params)
    decay_flags = _resolve_mask(mask, params)
    tails = _resolve_tails(torch_layout, scalar_tail, params)
    use_kernel = _use_kernel(kernel)
    count = state.count
    t = optax.safe_increment(count)
    param_leaves, treedef = jax.tree.flatten(params)
    grad_leaves = treedef.flatten_up_to(grads)
    exp_avg_leaves = treedef.flatten_up_to(state.exp_avg)
    exp_avg_sq_leaves = treedef.flatten_up_to(state.exp_avg_sq)
    max_leaves = treedef.flatten_up_to(state.max_exp_avg_sq) if amsgrad else [None] * len(param_leaves)

    scalars_by_dtype: dict = {}
    results: list = [None] * len(param_leaves)
    kernel_groups: dict[bool, list[int]] = {}  # decay flag -> leaves for the one-pass CPU kernel
    for i, (p, g, m, v, vmax, decay_on, tail_positions) in enumerate(zip(
            param_leaves, grad_leaves, exp_avg_leaves, exp_avg_sq_leaves, max_leaves, decay_flags, tails)):
        opmath = _opmath_dtype(p.dtype)
        if opmath not in scalars_by_dtype:
            scalars_by_dtype[opmath] = _step_scalars(learning_rate, b1, b2, weight_decay, count, t, opmath)
        decay = decay_on and weight_decay != 0
        if use_kernel and p.dtype == jnp.float32 and decay_rounding == "torch":
            if p.size:
                kernel_groups.setdefault(decay, []).append(i)
            else:
                results[i] = (p, m, v, vmax)
            continue
        results[i] = _leaf_step(p, g, m, v, vmax, scalars_by_dtype[opmath], b1=b1, b2=b2, eps=eps, decay=decay,
                                decay_rounding=decay_rounding, amsgrad=amsgrad, maximize=maximize,
                                tail_positions=tail_positions)
    for decay, indices in kernel_groups.items():
        scalars = scalars_by_dtype[jnp.dtype(jnp.float32)]
        leaves = [(param_leaves[i], grad_leaves[i], exp_avg_leaves[i], exp_avg_sq_leaves[i], max_leaves[i])
                  for i in indices]
        out = cpu_kernel.step(leaves, jnp.stack([scalars.decay, scalars.step_size_neg, scalars.bias_correction2_sqrt]),
                              [tails[i] for i in indices], b1=b1, b2=b2, eps=eps, maximize=maximize, decay=decay,
                              amsgrad=amsgrad, write_update=delta is not None)
        for i, leaf_out in zip(indices, out):
            results[i] = leaf_out
    if delta is not None:
        # The kernel's leaves hold their updates already (float32, as delta gives
        # float32 params); the others get theirs here.
        kernel_leaves = {i for indices in kernel_groups.values() for i in indices}
        results = [r if i in kernel_leaves else (delta(r[0], param_leaves[i]), *r[1:])
                   for i, r in enumerate(results)]

    new_params, new_m, new_v, new_max = (treedef.unflatten(list(column)) for column in zip(*results))
    new_state = AdamWState(count=t, exp_avg=new_m, exp_avg_sq=new_v,
                           max_exp_avg_sq=new_max if amsgrad else None)
    return new_params, new_state


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
    # Half-precision params get float32 updates: p + (p_new - p) is then exact in
    # float32, so optax.apply_updates lands on p_new bit for bit.
    return _opmath_dtype(dtype) if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


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
) -> optax.GradientTransformation:
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
        a single-device CPU backend when it builds, else XLA.  The two agree
        bit for bit.

    Returns:
      An ``optax.GradientTransformation``.  ``optax.apply_updates`` recovers
      torch's parameters exactly wherever ``p_new - p`` is exact in the param
      dtype (always for bfloat16/float16 params, whose updates are float32; for
      float32 whenever ``p_new`` and ``p`` are within a factor 2, i.e. not for
      a parameter that crosses or nears zero).  :func:`apply_exact` returns the
      new params themselves and is exact everywhere.

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015.
    """
    _validate_hyperparameters(learning_rate, b1, b2, eps, weight_decay, decay_rounding)
    if kernel not in KERNELS:
        raise ValueError(f"Invalid kernel: {kernel!r} (choose from {KERNELS})")
    if torch_layout is not None:
        torch_layout = jax.tree.map(_validate_order, torch_layout)
    options = dict(learning_rate=learning_rate, b1=float(b1), b2=float(b2), eps=float(eps),
                   weight_decay=float(weight_decay), amsgrad=bool(amsgrad), maximize=bool(maximize),
                   mask=mask, decay_rounding=decay_rounding, torch_layout=torch_layout, scalar_tail=scalar_tail,
                   kernel=kernel)

    def init_fn(params: optax.Params) -> AdamWState:
        _check_params(params)
        # shard_alike: each moment takes its parameter's sharding, also when
        # init runs under jax.jit (plain zeros_like would land on one device).
        zeros = lambda: jax.tree.map(lambda p: shard_alike(jnp.zeros_like(p), p)[0], params)  # noqa: E731
        return AdamWState(count=jnp.zeros([], jnp.int32), exp_avg=zeros(), exp_avg_sq=zeros(),
                          max_exp_avg_sq=zeros() if amsgrad else None)

    def step_fn(grads, state, params):
        return _adamw_step(grads, state, params, **options)

    def update_fn(updates, state, params=None):
        def delta(new, old):
            dtype = _update_dtype(old.dtype)
            return new.astype(dtype) - old.astype(dtype)

        # The step computes each leaf's delta itself (the CPU kernel writes it directly).
        return _adamw_step(updates, state, params, delta=delta, **options)

    update_fn.exact_step = step_fn
    return optax.GradientTransformation(init_fn, update_fn)


def apply_exact(tx: optax.GradientTransformation, grads: optax.Updates, state: AdamWState,
                params: optax.Params) -> tuple[optax.Params, AdamWState]:
    """One step of a :func:`adamw` transformation returning the new params themselves.

    Unlike ``optax.apply_updates(params, updates)``, which adds the update back
    and can lose low bits where a parameter crosses zero, this is torch's
    result bit for bit everywhere.  Jittable; donate ``params`` and ``state``.
    """
    step = getattr(tx.update, "exact_step", None)
    if step is None:
        raise TypeError("apply_exact: tx must be a transformation made by jax_impl.adamw")
    return step(grads, state, params)
