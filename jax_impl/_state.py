"""What every AdamW path shares: the state, and the checks of hyperparameters, params, grads and mask.

The update paths (the torch-CPU and torch-CUDA rounding models, the CPU kernel,
:func:`jax_impl.apply_exact`) all read the tree through these, so a bad input
gets the same message whichever path runs.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


MaskOrFn = Any | Callable[[optax.Params], Any] | None


DECAY_ROUNDINGS = ("torch", "precise")


# Set by jax_impl.exact.apply_exact while it traces a wrapped transformation's
# update: each adamw update then reports its options and the params it saw.
exact_recorders: list[Callable[[dict, optax.Params], None]] = []


class AdamWState(NamedTuple):
    """The torch-named view of :func:`adamw`'s state (``torch.optim.AdamW``'s per-parameter names).

    :func:`adamw`'s own state is optax's tree (:func:`optax_tree`); :func:`torch_view`
    reads this view out of it and :func:`from_torch_view` writes one back.  Every
    array leaf mirrors a parameter, so it shards like it.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32: number of updates applied.
    exp_avg: optax.Updates  # first moment, shapes and dtypes of the params (optax's mu).
    exp_avg_sq: optax.Updates  # second moment, shapes and dtypes of the params (optax's nu).
    max_exp_avg_sq: optax.Updates | None  # running max of exp_avg_sq (amsgrad; optax's nu_max), else None.


# Where each torch-named field lives in optax's tree (for messages naming the optax path).
OPTAX_FIELDS = {"count": "[0].count", "exp_avg": "[0].mu", "exp_avg_sq": "[0].nu", "max_exp_avg_sq": "[0].nu_max"}
MOMENT_STATES = (optax.ScaleByAdamState, optax.ScaleByAmsgradState)


def optax_tree(view: AdamWState, *, schedule: bool, masked: bool) -> tuple:
    """``optax.adamw``'s state tree holding ``view``: ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.

    ``(ScaleByAdamState(count, mu, nu), EmptyState() | MaskedState(EmptyState()), EmptyState() | ScaleByScheduleState(count))``;
    with amsgrad the first is ``ScaleByAmsgradState(count, mu, nu, nu_max)`` (optax's ``scale_by_amsgrad``).
    The second is masked when a ``mask`` is given, the third a ``ScaleByScheduleState`` for a
    schedule (its count is kept equal to the moments' count).
    """
    if view.max_exp_avg_sq is None:
        moments = optax.ScaleByAdamState(count=view.count, mu=view.exp_avg, nu=view.exp_avg_sq)
    else:
        moments = optax.ScaleByAmsgradState(count=view.count, mu=view.exp_avg, nu=view.exp_avg_sq,
                                            nu_max=view.max_exp_avg_sq)
    decay = optax.MaskedState(inner_state=optax.EmptyState()) if masked else optax.EmptyState()
    lr = optax.ScaleByScheduleState(count=view.count) if schedule else optax.EmptyState()
    return (moments, decay, lr)


def is_adamw_tree(state) -> bool:
    """Whether ``state`` has the shape of :func:`optax_tree` (``optax.adamw``'s and :func:`adamw`'s state)."""
    return (isinstance(state, tuple) and not hasattr(state, "_fields") and len(state) == 3
            and isinstance(state[0], MOMENT_STATES)
            and isinstance(state[1], (optax.EmptyState, optax.MaskedState))
            and isinstance(state[2], (optax.EmptyState, optax.ScaleByScheduleState)))


def torch_view(state) -> AdamWState:
    """The torch-named :class:`AdamWState` of an :func:`adamw` (or ``optax.adamw``) state; an AdamWState as it is.

    ``exp_avg`` is optax's ``mu``, ``exp_avg_sq`` its ``nu``, ``max_exp_avg_sq`` its
    ``nu_max`` (amsgrad) or None.  Also accepts the moments' state alone
    (``ScaleByAdamState`` / ``ScaleByAmsgradState``).
    """
    if isinstance(state, AdamWState):
        return state
    moments = state[0] if is_adamw_tree(state) else state
    if not isinstance(moments, MOMENT_STATES):
        raise TypeError("expected the state of jax_impl.adamw or optax.adamw (a tuple (ScaleByAdamState | "
                        "ScaleByAmsgradState, EmptyState | MaskedState, EmptyState | ScaleByScheduleState)), "
                        f"got {type(state).__name__}")
    return AdamWState(moments.count, moments.mu, moments.nu, getattr(moments, "nu_max", None))


def from_torch_view(like, view: AdamWState) -> tuple:
    """``like`` (an :func:`adamw` state, e.g. ``tx.init(params)``) holding ``view``'s count and moments.

    The schedule's count, if any, becomes ``view.count`` too.  ``view`` must agree with
    ``like`` on amsgrad (``max_exp_avg_sq`` None or not).
    """
    if not is_adamw_tree(like):
        torch_view(like)  # raises the TypeError naming what was expected
        raise TypeError(f"from_torch_view: like must be a whole adamw state, got {type(like).__name__}")
    if (view.max_exp_avg_sq is None) != isinstance(like[0], optax.ScaleByAdamState):
        raise ValueError("from_torch_view: amsgrad differs: one state has max_exp_avg_sq (nu_max) and the other has not")
    return optax_tree(view, schedule=isinstance(like[2], optax.ScaleByScheduleState),
                      masked=isinstance(like[1], optax.MaskedState))


def is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _not_a_real_number(name: str, value) -> TypeError:
    # torch's error for a complex or string lr (its `0.0 <= lr` check), plus our argument's name.
    return TypeError(f"'<=' not supported between instances of 'float' and '{type(value).__name__}' "
                     f"({name} must be a real number, got {value!r})")


def concrete_hyperparameter(value, name: str = "hyperparameter"):
    """A Python float for a concrete number or array (so the host computes torch's scalars); a tracer as it is.

    ``optax.inject_hyperparams`` passes its hyperparameters as arrays: concrete
    ones in ``init`` or outside ``jax.jit``, traced ones inside it; complex ones
    (imaginary part 0) for complex params.  A Python complex or a string is a
    ``TypeError``, as torch makes it; so is a complex array with an imaginary
    part, and an array of more than one element is a ``ValueError``.
    """
    if callable(value):
        return value
    if is_traced(value):
        # inject_hyperparams gives complex hyperparameters for complex params; their value is real.
        return jnp.real(value) if jnp.issubdtype(value.dtype, jnp.complexfloating) else value
    if isinstance(value, numbers.Real):  # bool, int, float, NumPy's real scalars
        return float(value)
    if type(value) is complex or not isinstance(value, (np.ndarray, np.generic, jax.Array)):
        raise _not_a_real_number(name, value)
    array = np.asarray(value)
    if array.dtype.kind not in "biufc" and not jnp.issubdtype(array.dtype, jnp.floating):  # bfloat16 is kind "V"
        raise _not_a_real_number(name, value)
    if array.size != 1:  # torch: "Tensor lr must be 1-element"
        raise ValueError(f"{name} must be a single number, got an array of shape {array.shape}")
    number = array.reshape(()).item()
    if isinstance(number, complex):
        if number.imag != 0:
            raise TypeError(f"{name} must be a real number, got {number!r}")
        number = number.real
    return float(number)


def validate_hyperparameters(learning_rate, b1, b2, eps, weight_decay, decay_rounding) -> None:
    # Same tests and wording as torch.optim.Adam, plus the name of our argument;
    # `not 0.0 <= x` also rejects NaN.  Traced values (injected hyperparameters
    # under jax.jit) cannot be tested without a host sync and are taken as they are.
    known = lambda x: not is_traced(x)  # noqa: E731
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


def dtype_of(leaf) -> jnp.dtype:
    # A jax.ShapeDtypeStruct (init under jax.eval_shape, abstract params) has a dtype but no array.
    return jnp.dtype(leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else jnp.result_type(leaf)


def check_params(params: optax.Params, mu_dtype=None) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        where = jax.tree_util.keystr(path) or "<root>"
        dtype = dtype_of(leaf)
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


def check_state(state, params: optax.Params, mu_dtype, amsgrad: bool, *, schedule: bool, masked: bool) -> AdamWState:
    """The torch-named view of ``state`` (the tree ``init`` made), or an error naming optax's path of what is wrong.

    Refuses a state whose moments do not mirror the params (XLA would broadcast them silently).
    """
    expected = jax.tree.structure(optax_tree(AdamWState(0, None, None, 0 if amsgrad else None),
                                             schedule=schedule, masked=masked))
    if not is_adamw_tree(state) or isinstance(state[0], optax.ScaleByAmsgradState) != amsgrad or (
            isinstance(state[2], optax.ScaleByScheduleState) != schedule) or (
            isinstance(state[1], optax.MaskedState) != masked):
        shown = jax.tree.structure(state, is_leaf=lambda x: not isinstance(x, tuple))
        raise TypeError(f"adamw: state must be the tree made by init ({expected}, optax.adamw's layout), "
                        f"got {type(state).__name__}: {shown}")
    view = torch_view(state)
    check_count(view.count)
    treedef = jax.tree.structure(params)
    paths = [jax.tree_util.keystr(path) or "<root>" for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    fields = [("exp_avg", mu_dtype), ("exp_avg_sq", None)] + ([("max_exp_avg_sq", None)] if amsgrad else [])
    for field, field_dtype in fields:
        tree, name = getattr(view, field), OPTAX_FIELDS[field]
        try:
            leaves = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(f"adamw: state{name} does not match the parameter tree: {err}") from None
        for where, leaf, p in zip(paths, leaves, jax.tree.leaves(params)):
            if leaf is None or jnp.shape(leaf) != jnp.shape(p):
                raise ValueError(f"adamw: state{name} for parameter {where} has shape "
                                 f"{None if leaf is None else jnp.shape(leaf)}, the parameter has shape {jnp.shape(p)}")
            expected = jnp.dtype(field_dtype or jnp.result_type(p))
            if jnp.result_type(leaf) != expected:
                raise TypeError(f"adamw: state{name} for parameter {where} has dtype {jnp.result_type(leaf)}, "
                                f"expected {expected}")
    if schedule:
        check_count(state[2].count, "state[2].count")
    return view


def check_count(count, name: str = "state[0].count") -> None:
    """A state's count: a scalar integer >= 0 (the number of updates applied); a traced one's value is not known."""
    dtype = jnp.result_type(count)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"adamw: {name} has dtype {dtype}; it must be an integer (int32, as init makes it): "
                        "the number of updates applied")
    if jnp.shape(count) != ():
        raise ValueError(f"adamw: {name} has shape {jnp.shape(count)}; it must be a scalar "
                         "(the number of updates applied)")
    if not is_traced(count) and int(count) < 0:
        raise ValueError(f"adamw: {name} is {int(count)}; it must be >= 0 (the number of updates applied)")


def optax_update(new, old):
    """The optax update of a leaf, ``new - old``, and +0 where ``new == old``: bitwise ``new - old`` there too
    (``x - x`` is +0) except at an infinite param, whose update is then 0, not ``inf - inf = nan``, so that
    ``optax.apply_updates`` keeps it infinite as torch does.  The CPU kernel's update mode writes the same."""
    return jnp.where(new == old, jnp.zeros_like(new), new - old)


def check_grads(grads: optax.Updates, params: optax.Params) -> None:
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


def resolve_mask(mask: MaskOrFn, params: optax.Params) -> list[bool]:
    """One Python bool per parameter leaf: True where weight decay applies."""
    leaves = jax.tree.leaves(params)
    if mask is None:
        return [True] * len(leaves)
    mask_tree = mask(params) if callable(mask) else mask
    try:
        flags = jax.tree.structure(params).flatten_up_to(mask_tree)
    except (ValueError, TypeError) as err:
        raise ValueError(f"adamw: mask does not match the parameter tree: {err}") from None
    paths = [jax.tree_util.keystr(path) or "<root>" for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    resolved = []
    for where, flag in zip(paths, flags):
        if isinstance(flag, jax.core.Tracer):
            raise TypeError("adamw: mask leaves must be Python bools (they choose code paths), got a traced array")
        if not (isinstance(flag, (bool, np.bool_)) or (isinstance(flag, (np.ndarray, jax.Array))
                                                      and flag.shape == () and flag.dtype == np.bool_)):
            raise TypeError(f"adamw: mask leaf for parameter {where} is {flag!r} ({type(flag).__name__}); mask "
                            "leaves must be bools (True: weight decay applies)")
        resolved.append(bool(flag))
    return resolved
