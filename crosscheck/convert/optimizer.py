from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jax_impl
from crosscheck.common.metrics import as_numpy
from crosscheck.convert.layers import ConversionError, Layer
from crosscheck.convert.trees import nest
from crosscheck.convert.weights import (check_dtypes, check_keys, check_shapes,
                                        moment_tree, param_entries,
                                        params_to_flax_flat, params_to_torch)
from jax_impl.groups import leaves_by_path, refill

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
COUNT_MAX = 2 ** 31 - 1  # the state's count is int32, as optax's counts are


def _whole_count(value) -> int | None:
    """``value`` (a number, 0-d tensor or array) as an int in 0..COUNT_MAX, else None."""
    if torch.is_tensor(value) or isinstance(value, (np.ndarray, np.generic, jax.Array)):
        if np.ndim(value) != 0:
            return None
        value = as_numpy(value).item() if torch.is_tensor(value) else np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():  # also nan and inf
        return None
    return int(value) if 0 <= value <= COUNT_MAX else None


def _shown(value) -> str:
    if (torch.is_tensor(value) or isinstance(value, (np.ndarray, jax.Array))) and np.ndim(value) != 0:
        return f"a {'tensor' if torch.is_tensor(value) else 'array'} of shape {tuple(np.shape(value))}"
    return repr(as_numpy(value).item() if torch.is_tensor(value) else np.asarray(value).item()
                if isinstance(value, (np.ndarray, np.generic, jax.Array)) else value)


def _checked_count(count) -> int:
    """A state's count as the step torch will store, or an error: never truncated or wrapped."""
    from flax import nnx

    if isinstance(count, nnx.Variable):  # an nnx.Optimizer's state, or one restored into its templates
        count = count.get_value()
    value = _whole_count(count)
    if value is None:
        raise ConversionError(f"optimizer state count (state[0].count) {_shown(count)} is not a whole number in 0..{COUNT_MAX} "
                              "(the number of steps taken)")
    return value


def _jax_dtypes_kept(flat: Mapping, what: str, allow_dtype_change: bool) -> None:
    """Without a template: refuse what jnp.asarray would narrow (64-bit arrays without jax_enable_x64)."""
    template = {key: np.empty(0, jnp.asarray(np.empty(0, np.asarray(x).dtype)).dtype) for key, x in flat.items()}
    check_dtypes(flat, template, what, allow_dtype_change)


def torch_optimizer_to_jax(optimizer_state: Mapping, layers: Sequence[Layer], names: Sequence[str],
                           params: Mapping | None = None, *, allow_dtype_change: bool = False, like=None) -> tuple:
    """The ``jax_impl.adamw`` state (optax's tree) from a ``torch.optim.AdamW`` / ``torch_impl.AdamW`` ``state_dict()``.

    ``names`` are the torch parameter names in the optimizer's order
    (:func:`param_names`).  The moments come as nested dicts shaped like the
    Flax params (linen's ``variables["params"]``, or ``nnx.state(model, nnx.Param)``);
    with ``params`` given, paths, shapes and dtypes are checked against it
    (without, a moment JAX would narrow, float64 without ``jax_enable_x64``, is
    refused); ``allow_dtype_change=True`` casts instead.  Torch keeps one
    float32 ``step`` per parameter, JAX one int32 count: each step must be a
    whole number in 0..2**31 - 1, and all must agree.

    The result is the tree of ``jax_impl.adamw(lr)`` with a float ``lr`` and no
    ``mask`` (``optax.adamw``'s: ``(ScaleByAdamState(count, mu, nu), EmptyState(), EmptyState())``,
    ``ScaleByAmsgradState`` with amsgrad); ``like`` (the target's state, e.g.
    ``tx.init(params)``) gives that tree's layout instead (a schedule's count,
    a mask's ``MaskedState``).  ``jax_impl.torch_view`` reads it under torch's names.

    Parameters torch holds no state for while others have it (frozen ones,
    ``requires_grad=False``, which torch's ``step`` skips) are left out of the
    moments, as torch leaves them out of its state: the JAX params must leave
    them out too (as ``convert.torch_layout`` does), and converting back writes
    no state for them.
    """
    view = _torch_view_from_state_dict(optimizer_state, layers, names, params, allow_dtype_change)
    if like is None:
        return jax_impl.from_torch_view(jax_impl.adamw(amsgrad=view.max_exp_avg_sq is not None).init({}), view)
    try:
        return jax_impl.from_torch_view(like, view)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"optimizer state: {err}") from None


def _torch_view_from_state_dict(optimizer_state: Mapping, layers: Sequence[Layer], names: Sequence[str],
                                params: Mapping | None, allow_dtype_change: bool) -> jax_impl.AdamWState:
    state = optimizer_state.get("state", {})
    extra = set(state) - set(range(len(names)))
    if extra:
        raise ConversionError(f"optimizer state: extra parameter indices {sorted(extra)} "
                              f"(the optimizer has {len(names)} parameters)")
    entries = list(param_entries(layers, names))  # every name in the table, before anything else
    moments = {m: {} for m in _MOMENTS}
    count = 0  # a fresh optimizer: torch creates state at the first step
    if state:
        # torch's step skips a parameter without a gradient (frozen: requires_grad=False) and creates no state
        # for it: such a parameter has no moments here either.
        stateful = [(index, name) for index, name in enumerate(names) if index in state]
        entries = [entry for entry in entries if entry[0] in state]
        for index, name in stateful:
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment not in state[index]:
                    raise ConversionError(f"optimizer state: parameter {index} ({name!r}) has no {moment!r}")
            if "step" not in state[index]:
                raise ConversionError(f"optimizer state: parameter {index} ({name!r}) has no 'step'")
        steps = {}
        for index, name in stateful:
            steps[name] = _whole_count(state[index]["step"])
            if steps[name] is None:
                raise ConversionError(f"optimizer state: parameter {index} ({name!r}): step "
                                      f"{_shown(state[index]['step'])} is not a whole number in 0..{COUNT_MAX} "
                                      "(the JAX state's count is int32)")
        if len(set(steps.values())) != 1:
            raise ConversionError(f"optimizer state: per-parameter steps {steps} are not one integer count")
        count = next(iter(steps.values()))
        has_max = {name for (i, name, *_) in entries if "max_exp_avg_sq" in state[i]}
        if has_max and len(has_max) != len(entries):
            raise ConversionError(f"optimizer state: max_exp_avg_sq (amsgrad) for {sorted(has_max)} only")
        present = _MOMENTS if has_max else _MOMENTS[:2]
        moments.update({m: params_to_flax_flat({name: state[i][m] for i, name in stateful}, layers)
                        for m in present})
    if params is not None and state:
        template = moment_tree(params)
        frozen = {name: paths for index, name, _, paths in param_entries(layers, names) if index not in state}
        if any(set(template).intersection(paths) for paths in frozen.values()):
            raise ConversionError(f"optimizer state: parameters {sorted(frozen)} have no AdamW state (frozen: torch's "
                                  "step skips them) but are in params: leave them out of params (the trainable "
                                  "subset, as convert.torch_layout lists it)")
        check_keys(moments["exp_avg"], template, "optimizer state")
        check_shapes(moments["exp_avg"], template, "optimizer state")
    for moment in _MOMENTS if state else ():
        if moments[moment]:
            if params is not None:
                check_dtypes(moments[moment], template, f"optimizer state {moment}", allow_dtype_change)
            else:
                _jax_dtypes_kept(moments[moment], f"optimizer state {moment}", allow_dtype_change)
    if allow_dtype_change and params is not None and state:
        moments = {m: {p: np.asarray(x).astype(np.asarray(template[p]).dtype) for p, x in flat.items()}
                   for m, flat in moments.items()}
    tree = lambda flat: nest({p: jnp.asarray(x) for p, x in flat.items()})  # noqa: E731
    return jax_impl.AdamWState(jnp.asarray(count, jnp.int32), tree(moments["exp_avg"]),
                               tree(moments["exp_avg_sq"]),
                               tree(moments["max_exp_avg_sq"]) if moments["max_exp_avg_sq"] else None)


def jax_optimizer_to_torch(state, layers: Sequence[Layer], names: Sequence[str],
                           param_groups: Sequence[Mapping]) -> dict:
    """A ``state_dict`` for ``torch.optim.AdamW.load_state_dict`` from a ``jax_impl.adamw`` state.

    ``state`` is optax's tree (``tx.init``'s, an ``nnx.Optimizer``'s ``opt_state``
    made pure) or its torch-named ``jax_impl.AdamWState``.
    ``param_groups`` are the target optimizer's (``optimizer.state_dict()["param_groups"]``);
    the moments may be nested dicts or ``nnx.State``; the count must be a whole
    number in 0..2**31 - 1 (never truncated).  Parameters in ``names`` the moments
    do not hold (frozen ones, left out by :func:`torch_optimizer_to_jax`) get no
    state, as torch keeps none for them.
    """
    state = _view(state)
    count = _checked_count(state.count)
    indices = {name: index for index, name in enumerate(names)}
    held = set(moment_tree(state.exp_avg))
    if held:  # the parameters with state (frozen ones have none)
        names = [name for _, name, _, paths in param_entries(layers, names) if not held.isdisjoint(paths)]
    trees = {"exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq, "max_exp_avg_sq": state.max_exp_avg_sq}
    moments = {moment: params_to_torch(tree, layers, names) for moment, tree in trees.items() if tree is not None}
    torch_state = {indices[name]: {"step": torch.tensor(float(count), dtype=torch.float32),
                                   **{moment: by_name[name] for moment, by_name in moments.items()}}
                   for name in names} if count > 0 else {}
    return {"state": torch_state, "param_groups": [dict(group) for group in param_groups]}


def _view(state) -> jax_impl.AdamWState:
    try:
        return jax_impl.torch_view(state)
    except TypeError as err:
        raise ConversionError(f"optimizer state: {err}") from None


def load_nnx_optimizer_state(optimizer, state) -> None:
    """Put a converted ``jax_impl.adamw`` state (optax's tree, or its torch-named ``AdamWState``) into an ``nnx.Optimizer``.

    Everything is checked before anything is written (a refused state leaves
    the optimizer as it was); the optimizer's ``step``, and its schedule's count if
    its lr is a schedule, become the state's count (a whole number in 0..2**31 - 1).
    """
    from flax import nnx

    current = optimizer.opt_state
    try:
        target_view = jax_impl.torch_view(current)
    except TypeError:
        raise ConversionError(f"the nnx.Optimizer's state is a {type(current).__name__}, not a jax_impl.adamw state "
                              "(build it with tx=jax_impl.adamw(...))") from None
    state = _view(state)
    count = _checked_count(state.count)
    if (target_view.max_exp_avg_sq is None) != (state.max_exp_avg_sq is None):
        raise ConversionError("amsgrad differs: one state has max_exp_avg_sq and the other has not")
    writes = []
    for moment in _MOMENTS:
        target, source = getattr(target_view, moment), getattr(state, moment)
        if target is None:
            continue
        template = moment_tree(target)
        flat = moment_tree(source)
        check_keys(flat, template, f"optimizer state {moment}")
        check_shapes(flat, template, f"optimizer state {moment}")
        check_dtypes(flat, template, f"optimizer state {moment}", False)
        writes.append((target, nest(flat)))
    for target, values in writes:
        nnx.replace_by_pure_dict(target, values, lambda var, value: var.set_value(value) or var)
    counts = [target_view.count]
    if isinstance(current[2], optax.ScaleByScheduleState):  # the schedule reads its own count
        counts.append(current[2].count)
    for variable in counts:
        variable.set_value(jnp.asarray(count, variable.get_value().dtype))
    step = getattr(optimizer, "step", None)
    if step is not None:
        step.set_value(jnp.asarray(count, step.get_value().dtype))


def torch_optimizer_groups_to_jax(optimizer_state: Mapping, layers: Sequence, names: Sequence[str], tx, params) -> Any:
    """The ``jax_impl.param_groups`` state of ``tx`` from a grouped torch AdamW ``state_dict()``.

    Each torch group ``g`` fills group ``g`` of ``tx`` (labels must agree);
    ``names`` are the torch parameter names in the optimizer's order.
    """
    template = tx.init(params)
    torch_groups = optimizer_state["param_groups"]
    if len(torch_groups) != len(template.inner_states):
        raise ConversionError(f"torch has {len(torch_groups)} param groups, tx has {len(template.inner_states)}")
    inner = dict(template.inner_states)
    for g, torch_group in enumerate(torch_groups):
        indices = list(torch_group["params"])
        sub = {"state": {local: optimizer_state["state"][i] for local, i in enumerate(indices)
                         if i in optimizer_state.get("state", {})}}
        state = _torch_view_from_state_dict(sub, layers, [names[i] for i in indices], None, False)
        target = jax_impl.torch_view(inner[g].inner_state)
        flat = {name: leaves_by_path(getattr(state, name)) for name in _MOMENTS}
        if not sub["state"]:
            continue  # a fresh group (no step yet): the template's zeros are torch's absent state
        moments = {name: None if getattr(target, name) is None else
                   refill(getattr(target, name), flat[name], f"torch group {g}")
                   for name in _MOMENTS}
        view = jax_impl.AdamWState(count=state.count, **moments)
        inner[g] = inner[g]._replace(inner_state=jax_impl.from_torch_view(inner[g].inner_state, view))
    return template._replace(inner_states=inner)


def jax_optimizer_groups_to_torch(state, layers: Sequence, names: Sequence[str], torch_param_groups: Sequence[Mapping]) -> dict:
    """A grouped torch AdamW ``state_dict`` from a ``param_groups`` state; ``torch_param_groups`` are the target's."""
    torch_state = {}
    for g, torch_group in enumerate(torch_param_groups):
        indices = list(torch_group["params"])
        adamw_state = _view(state.inner_states[g].inner_state)
        plain = jax_impl.AdamWState(adamw_state.count, *(None if tree is None else _nested(tree) for tree in
                                                         (adamw_state.exp_avg, adamw_state.exp_avg_sq,
                                                          adamw_state.max_exp_avg_sq)))
        sub = jax_optimizer_to_torch(plain, layers, [names[i] for i in indices], [torch_group])
        torch_state.update({indices[local]: value for local, value in sub["state"].items()})
    return {"state": torch_state, "param_groups": [dict(group) for group in torch_param_groups]}


def _nested(tree) -> dict:
    """A masked moment tree (MaskedNode where another group's leaves are) as a plain nested dict of this group's."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return out
