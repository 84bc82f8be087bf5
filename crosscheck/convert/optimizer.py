from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jax_impl
from crosscheck.common.metrics import as_numpy
from crosscheck.convert.layers import ConversionError, Layer
from crosscheck.convert.trees import nest
from crosscheck.convert.weights import check_dtypes, check_keys, check_shapes, params_to_flax_flat, params_to_torch
from jax_impl.groups import leaves_by_path, refill
from crosscheck.convert.weights import moment_tree, param_entries


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def torch_optimizer_to_jax(optimizer_state: Mapping, layers: Sequence[Layer], names: Sequence[str],
                           params: Mapping | None = None) -> jax_impl.AdamWState:
    """A ``jax_impl.AdamWState`` from a ``torch.optim.AdamW`` / ``torch_impl.AdamW`` ``state_dict()``.

    ``names`` are the torch parameter names in the optimizer's order
    (:func:`param_names`).  The moments come as a nested dict shaped like the
    Flax params (linen's ``variables["params"]``, or ``nnx.state(model, nnx.Param)``);
    with ``params`` given, paths and shapes are checked against it.  Torch keeps
    one float32 ``step`` per parameter, JAX one integer count: they must agree.
    """
    state = optimizer_state.get("state", {})
    extra = set(state) - set(range(len(names)))
    if extra:
        raise ConversionError(f"optimizer state: extra parameter indices {sorted(extra)} "
                              f"(the optimizer has {len(names)} parameters)")
    entries = list(param_entries(layers, names))  # every name in the table, before anything else
    moments = {m: {} for m in _MOMENTS}
    count = 0  # a fresh optimizer: torch creates state at the first step
    if state:
        for index, name in enumerate(names):
            if index not in state:
                raise ConversionError(f"optimizer state: parameter {index} ({name!r}) has no AdamW state while "
                                      "others do; jax_impl.adamw keeps one step count for all parameters")
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment not in state[index]:
                    raise ConversionError(f"optimizer state: parameter {index} ({name!r}) has no {moment!r}")
        steps = {name: float(as_numpy(state[i]["step"])) for i, name in enumerate(names)}
        if len(set(steps.values())) != 1 or not float(next(iter(steps.values()))).is_integer():
            raise ConversionError(f"optimizer state: per-parameter steps {steps} are not one integer count")
        count = int(next(iter(steps.values())))
        has_max = {name for (i, name, *_) in entries if "max_exp_avg_sq" in state[i]}
        if has_max and len(has_max) != len(entries):
            raise ConversionError(f"optimizer state: max_exp_avg_sq (amsgrad) for {sorted(has_max)} only")
        present = _MOMENTS if has_max else _MOMENTS[:2]
        moments.update({m: params_to_flax_flat({name: state[i][m] for i, name in enumerate(names)}, layers)
                        for m in present})
    if params is not None and state:
        template = moment_tree(params)
        check_keys(moments["exp_avg"], template, "optimizer state")
        check_shapes(moments["exp_avg"], template, "optimizer state")
    tree = lambda flat: nest({p: jnp.asarray(x) for p, x in flat.items()})  # noqa: E731
    return jax_impl.AdamWState(jnp.asarray(count, jnp.int32), tree(moments["exp_avg"]),
                               tree(moments["exp_avg_sq"]),
                               tree(moments["max_exp_avg_sq"]) if moments["max_exp_avg_sq"] else None)


def jax_optimizer_to_torch(state: jax_impl.AdamWState, layers: Sequence[Layer], names: Sequence[str],
                           param_groups: Sequence[Mapping]) -> dict:
    """A ``state_dict`` for ``torch.optim.AdamW.load_state_dict`` from a ``jax_impl.AdamWState``.

    ``param_groups`` are the target optimizer's (``optimizer.state_dict()["param_groups"]``);
    the moments may be nested dicts or ``nnx.State``.
    """
    count = int(np.asarray(state.count))
    trees = {"exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq, "max_exp_avg_sq": state.max_exp_avg_sq}
    moments = {moment: params_to_torch(tree, layers, names) for moment, tree in trees.items() if tree is not None}
    torch_state = {index: {"step": torch.tensor(float(count), dtype=torch.float32),
                           **{moment: by_name[name] for moment, by_name in moments.items()}}
                   for index, name in enumerate(names)} if count > 0 else {}
    return {"state": torch_state, "param_groups": [dict(group) for group in param_groups]}


def load_nnx_optimizer_state(optimizer, state: jax_impl.AdamWState) -> None:
    """Put a converted ``jax_impl.AdamWState`` (moments as nested dicts) into an ``nnx.Optimizer``.

    Everything is checked before anything is written (a refused state leaves
    the optimizer as it was); the optimizer's ``step`` becomes the state's count.
    """
    from flax import nnx

    current = optimizer.opt_state
    if not isinstance(current, jax_impl.AdamWState):
        raise ConversionError(f"the nnx.Optimizer's state is a {type(current).__name__}, not a jax_impl.AdamWState "
                              "(build it with tx=jax_impl.adamw(...))")
    if (current.max_exp_avg_sq is None) != (state.max_exp_avg_sq is None):
        raise ConversionError("amsgrad differs: one state has max_exp_avg_sq and the other has not")
    writes = []
    for moment in _MOMENTS:
        target, source = getattr(current, moment), getattr(state, moment)
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
    current.count.set_value(jnp.asarray(state.count, current.count.get_value().dtype))
    step = getattr(optimizer, "step", None)
    if step is not None:
        step.set_value(jnp.asarray(state.count, step.get_value().dtype))


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
        state = torch_optimizer_to_jax(sub, layers, [names[i] for i in indices])
        target = inner[g].inner_state
        flat = {name: leaves_by_path(getattr(state, name)) for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
        if not sub["state"]:
            continue  # a fresh group (no step yet): the template's zeros are torch's absent state
        moments = {name: None if getattr(target, name) is None else
                   refill(getattr(target, name), flat[name], f"torch group {g}")
                   for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
        inner[g] = inner[g]._replace(inner_state=jax_impl.AdamWState(count=state.count, **moments))
    return template._replace(inner_states=inner)


def jax_optimizer_groups_to_torch(state, layers: Sequence, names: Sequence[str], torch_param_groups: Sequence[Mapping]) -> dict:
    """A grouped torch AdamW ``state_dict`` from a ``param_groups`` state; ``torch_param_groups`` are the target's."""
    torch_state = {}
    for g, torch_group in enumerate(torch_param_groups):
        indices = list(torch_group["params"])
        adamw_state = state.inner_states[g].inner_state
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
