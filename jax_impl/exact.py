"""The exact step through optax's wrappers: the params written by the last AdamW, not re-added.

``optax.apply_updates`` computes ``p + u`` with ``u = p_new - p`` rounded to
the param dtype; near a zero crossing (``|p_new| << |p|``) no float32 ``u``
gives ``p + u == p_new``.  A bare :func:`jax_impl.adamw` hands ``p_new`` over
directly.  Inside a wrapper (``optax.chain``, ``optax.MultiSteps``,
``optax.multi_transform`` / ``masked``, ``optax.inject_hyperparams``,
``optax.apply_if_finite``, :func:`jax_impl.accumulation.torch_accumulation`)
the update may run inside ``lax.cond``, so ``p_new`` cannot leave it through a
trace-time side channel.  What every wrapper does carry out faithfully is the
AdamW *state*: the new moments when the step was taken, the old ones when it
was skipped (a mid step of ``MultiSteps``, a non-finite step of
``apply_if_finite``).

The new param is a function of the old param and the new moments alone
(torch's kernel: ``p' = p*(1 - lr*wd)``, ``p_new = p' - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``,
with ``m`` and ``v`` exactly the float32/float64 values it stores).  So
:func:`apply_exact` runs ``tx.update``, finds each AdamW's old and new state in
the state trees, and writes ``p_new`` from them where the count advanced,
``p`` where it did not.  While tracing, each ``jax_impl.adamw`` reports its
options and the leaves it updates (Python values only: nothing traced leaves
a ``cond``); injected hyperparameters are read from the wrapper's new state.

Where this cannot be exact it refuses or says so:

* half-precision leaves: the kernel keeps its moments in float32 registers and
  stores them rounded, so they cannot be recomputed; their float32 ``u`` is
  exact, so ``p + u`` is used (what ``optax.apply_updates`` does);
* a leaf updated by two AdamWs: ``TypeError`` at trace time;
* leaves no AdamW updates (``optax.set_to_zero()`` for frozen leaves, another
  optimizer in ``multi_transform``) get ``p + u``, as ``optax.apply_updates``;
* a transformation *after* the AdamW that changes its updates
  (``optax.chain(adamw, optax.scale(0.5))``) would be silently dropped by
  writing ``p_new``; :func:`apply_exact` compares the updates it received with
  AdamW's own ``p_new - p`` and raises (at run time, through
  ``jax.debug.callback``) where they differ.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl import _cpu_rounding, _state
from jax_impl._state import AdamWState

# The arguments of jax_impl.adamw that optax.inject_hyperparams can inject.
_INJECTABLE = ("learning_rate", "b1", "b2", "eps", "weight_decay")
_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


class UpdatesChangedError(RuntimeError):
    """A transformation after ``jax_impl.adamw`` changed its updates: writing AdamW's params would drop that."""


def _leaf_keys(tree) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def _adamw_states(tree) -> list[tuple[AdamWState, dict | None]]:
    """The torch-named view of every AdamW moments state in an optimizer state (optax's ``ScaleByAdamState`` /
    ``ScaleByAmsgradState``, the first node of :func:`jax_impl.adamw`'s tree), in tree order, with the
    hyperparams injected around it (or None)."""
    found = []
    is_node = lambda x: isinstance(x, (*_state.MOMENT_STATES, *_INJECT_STATES))  # noqa: E731
    for node in jax.tree.leaves(tree, is_leaf=is_node):
        if isinstance(node, _state.MOMENT_STATES):
            found.append((_state.torch_view(node), None))
        elif isinstance(node, _INJECT_STATES):
            found += [(view, dict(node.hyperparams) if hyperparams is None else hyperparams)
                      for view, hyperparams in _adamw_states(node.inner_state)]
    return found


def _real_view(x):
    """torch.view_as_real: a complex array as real pairs in a trailing axis of 2."""
    return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)


def _same_bits_or_tiny(x, y):
    """x == y, NaN equal to NaN, values below the smallest normal taken as 0 (XLA:CPU may flush them)."""
    tiny = jnp.finfo(x.dtype).tiny
    flush = lambda a: jnp.where(jnp.abs(a) < tiny, jnp.zeros_like(a), a)  # noqa: E731
    x, y = flush(x), flush(y)
    return (x == y) | (jnp.isnan(x) & jnp.isnan(y))


def _raise_if_changed(changed, wheres):
    changed = np.asarray(changed)
    if changed.any():
        where = wheres[int(np.argmax(changed))]
        raise UpdatesChangedError(
            f"apply_exact: the updates of parameter {where} are not the ones jax_impl.adamw returned; a "
            "transformation after adamw changed them (e.g. optax.chain(adamw, optax.scale(...))), which writing "
            "AdamW's params would drop. Put such transformations before adamw, or use optax.apply_updates.")


# torch's names of the dtypes in its error for a .grad of another dtype: the gradient's C++ type, the tensor's ScalarType.
_TORCH_CPP_TYPES = {"float16": "c10::Half", "bfloat16": "c10::BFloat16", "float32": "float", "float64": "double",
                    "complex64": "c10::complex<float>", "complex128": "c10::complex<double>", "int8": "signed char",
                    "uint8": "unsigned char", "int16": "short int", "int32": "int", "int64": "long int", "bool": "bool"}
_TORCH_SCALAR_TYPES = {"float16": "Half", "bfloat16": "BFloat16", "float32": "Float", "float64": "Double",
                       "complex64": "ComplexFloat", "complex128": "ComplexDouble"}


def _check_gradient_dtypes(grads: optax.Updates, params: optax.Params) -> None:
    """torch's rule: a gradient has its parameter's dtype (``param.grad = g`` raises otherwise); no silent cast."""
    if jax.tree.structure(grads) != jax.tree.structure(params):
        return  # tx.update names both trees
    for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(params)):
        g_dtype, p_dtype = jnp.result_type(g), jnp.result_type(p)
        if g_dtype != p_dtype:
            torch_gradient = _TORCH_CPP_TYPES.get(g_dtype.name, g_dtype.name)
            torch_tensor = _TORCH_SCALAR_TYPES.get(p_dtype.name, p_dtype.name)
            raise RuntimeError(
                f"apply_exact: gradient for parameter {jax.tree_util.keystr(path) or '<root>'} has dtype {g_dtype}, "
                f"the parameter has dtype {p_dtype}, which torch refuses: attempting to assign a gradient with dtype "
                f"'{torch_gradient}' to a tensor with grad_dtype '{torch_tensor}'. The gradient must match the "
                "tensor's grad_dtype (defaults to the tensor's dtype). Cast the gradients to the params' dtypes "
                "(jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)), or use tx.update and "
                "optax.apply_updates, which cast them as optax accepts them.")


def apply_exact(tx: optax.GradientTransformation, grads: optax.Updates, state: optax.OptState,
                params: optax.Params, **extra_args: Any) -> tuple[optax.Params, optax.OptState]:
    """One step of ``tx`` returning the new params themselves, bitwise torch's for every AdamW leaf.

    ``tx`` is a :func:`jax_impl.adamw` or any optax wrapper around one or more
    (``chain`` with transformations before it, ``MultiSteps``,
    ``multi_transform``, ``masked``, ``inject_hyperparams``,
    ``apply_if_finite``, :func:`jax_impl.accumulation.torch_accumulation`).
    Leaves that no AdamW updates get ``p + u`` as with ``optax.apply_updates``.
    Jittable; donate ``params`` and ``state``.

    Gradients must have their params' dtypes, as torch requires of ``.grad``
    (``tx.update`` casts them, as optax accepts them).

    Raises:
      RuntimeError: a gradient's dtype is not its parameter's (torch's error for such a ``.grad``).
      TypeError: ``tx`` contains no ``jax_impl.adamw``, or two update one leaf.
      UpdatesChangedError: (at run time) a transformation after adamw changed its updates.
    """
    new_params, new_state, _ = _exact_step(tx, grads, state, params, extra_args, require_adamw=True,
                                           with_updates=False)
    return new_params, new_state


def exact_step_with_updates(tx: optax.GradientTransformation, grads: optax.Updates, state: optax.OptState,
                            params: optax.Params, *, require_adamw: bool = True,
                            **extra_args: Any) -> tuple[optax.Params, optax.OptState, optax.Updates]:
    """:func:`apply_exact`, also returning the updates ``tx.update`` returns (what ``nnx.Optimizer.update`` returns).

    ``require_adamw=False``: a ``tx`` with no :func:`jax_impl.adamw` in it is not an
    error; every leaf then gets ``p + u``, as ``optax.apply_updates`` gives.
    """
    return _exact_step(tx, grads, state, params, extra_args, require_adamw=require_adamw, with_updates=True)


def _exact_step(tx, grads, state, params, extra_args: dict, *, require_adamw: bool, with_updates: bool):
    _check_gradient_dtypes(grads, params)
    step = getattr(tx.update, "exact_step", None)
    if step is not None and not extra_args:
        # A bare adamw: its own step, one pass (the CPU kernel when it applies).  Its updates are
        # optax_update(p_new, p), what tx.update returns, bit for bit.
        new_params, new_state = step(grads, state, params)
        updates = jax.tree.map(_state.optax_update, new_params, params) if with_updates else None
        return new_params, new_state, updates

    reported: dict[tuple[str, ...], dict] = {}
    thread = threading.get_ident()

    def record(options: dict, seen_params: optax.Params) -> None:
        if threading.get_ident() == thread:  # not another thread tracing its own step meanwhile
            reported.setdefault(_leaf_keys(seen_params), options)

    _state.exact_recorders.append(record)
    try:
        updates, new_state = tx.update(grads, state, params, **extra_args)
    finally:
        _state.exact_recorders.remove(record)
    if not reported and require_adamw:
        raise TypeError("apply_exact: tx must contain a transformation made by jax_impl.adamw "
                        f"(got {type(tx).__name__} whose update never called one)")

    param_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [jax.tree_util.keystr(path) for path, _ in param_paths]
    param_leaves = [leaf for _, leaf in param_paths]
    update_leaves = treedef.flatten_up_to(updates)
    index = {key: i for i, key in enumerate(keys)}
    new_leaves: list = [None] * len(param_leaves)
    checks = []

    olds, news = _adamw_states(state), _adamw_states(new_state)
    if len(olds) != len(news):
        raise TypeError("apply_exact: tx.update changed the number of AdamW states in the optimizer state")
    for (old, _), (new, hyperparams) in zip(olds, news):
        leaf_keys = _leaf_keys(new.exp_avg)
        if leaf_keys not in reported:
            continue  # another optimizer's Adam moments (optax.adam in a multi_transform): p + u below
        options = dict(reported[leaf_keys])
        if hyperparams is not None:
            # The values this step used (a schedule's, or what the user wrote into
            # state.hyperparams); concrete ones become Python floats, as adamw makes them.
            options.update({k: _state.concrete_hyperparameter(v, k) for k, v in hyperparams.items()
                            if k in _INJECTABLE})
        owned = [index[k] for k in leaf_keys]
        if any(new_leaves[i] is not None for i in owned):
            twice = [keys[i] for i in owned if new_leaves[i] is not None]
            raise TypeError(f"apply_exact: parameters {twice} are updated by two jax_impl.adamw transformations; "
                            "only one AdamW may write a parameter")
        _write_adamw_leaves(options, old, new, owned, param_leaves, update_leaves, keys, new_leaves, checks)

    for i, (p, u) in enumerate(zip(param_leaves, update_leaves)):
        if new_leaves[i] is None:  # not an AdamW leaf: what optax.apply_updates does
            new_leaves[i] = None if p is None else jnp.asarray(p + u).astype(jnp.asarray(p).dtype)
    if checks:  # one callback for all leaves: a host round trip per step, not per leaf
        wheres = [where for where, _ in checks]
        jax.debug.callback(functools.partial(_raise_if_changed, wheres=wheres),
                           jnp.stack([changed for _, changed in checks]))
    return treedef.unflatten(new_leaves), new_state, updates


def _write_adamw_leaves(options, old: AdamWState, new: AdamWState, owned, param_leaves, update_leaves, keys,
                        new_leaves, checks) -> None:
    """``p_new`` for the leaves of one AdamW (in ``new_leaves``), and the consistency checks of their updates."""
    # The params this AdamW saw: its moments' tree (masked leaves are MaskedNodes) holding our leaves.
    seen = jax.tree.unflatten(jax.tree.structure(new.exp_avg), [param_leaves[i] for i in owned])
    decay_flags = _state.resolve_mask(options["mask"], seen)
    applied = new.count != old.count
    t = optax.safe_increment(old.count)
    exp_avg, exp_avg_sq = jax.tree.leaves(new.exp_avg), jax.tree.leaves(new.exp_avg_sq)
    maxes = jax.tree.leaves(new.max_exp_avg_sq) if options["amsgrad"] else [None] * len(owned)
    scalars_by_dtype: dict = {}
    torch_path = options.get("torch_path", "fused")
    # The for-loop and foreach paths store every moment in the param dtype: p_new follows from them.
    param_from_moments = _cpu_rounding.new_param if torch_path == "fused" else functools.partial(
        _cpu_rounding.loop_new_param, torch_path=torch_path)
    for j, i in enumerate(owned):
        p, u = param_leaves[i], update_leaves[i]
        if jnp.dtype(p.dtype).itemsize < 4 and torch_path == "fused":
            # The kernel's float32 moments were rounded when stored; its float32 update is exact instead.
            new_leaves[i] = (p.astype(jnp.float32) + u).astype(p.dtype)
            continue
        opmath = _cpu_rounding.opmath_dtype(jnp.finfo(p.dtype).dtype)  # complex128: float64
        if opmath not in scalars_by_dtype:
            scalars_by_dtype[opmath] = _cpu_rounding.step_scalars(options["learning_rate"], options["b1"], options["b2"],
                                                            options["weight_decay"], old.count, t, opmath,
                                                            torch_path=torch_path)
        weight_decay = options["weight_decay"]
        decay = decay_flags[j] and (_state.is_traced(weight_decay) or weight_decay != 0)
        complex_leaf = jnp.issubdtype(p.dtype, jnp.complexfloating)
        # A complex param is torch's view_as_real: its real and imaginary parts are params of their own.
        real = _real_view if complex_leaf else (lambda x: x)  # noqa: E731
        stepped = param_from_moments(real(p), real(exp_avg[j]), real(exp_avg_sq[j]),
                                     None if maxes[j] is None else real(maxes[j]), scalars_by_dtype[opmath],
                                     eps=options["eps"], decay=decay, decay_rounding=options["decay_rounding"],
                                     amsgrad=options["amsgrad"])
        stepped = jax.lax.complex(stepped[..., 0], stepped[..., 1]).astype(p.dtype) if complex_leaf else \
            stepped.astype(p.dtype)
        new_leaves[i] = jnp.where(applied, stepped, p)
        if jnp.result_type(u) != p.dtype:
            raise TypeError(f"apply_exact: the update of parameter {keys[i]} has dtype {jnp.result_type(u)}, "
                            f"jax_impl.adamw's has {p.dtype}: a transformation after adamw changed it")
        own_update = _state.optax_update(stepped, p)
        checks.append((keys[i], jnp.any(applied & ~_same_bits_or_tiny(u, own_update))))
