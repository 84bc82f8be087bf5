"""torch's param groups for :func:`jax_impl.adamw`: one AdamW per group, each with its own hyperparameters.

torch::

    torch.optim.AdamW([{"params": body, "weight_decay": 0.1},
                       {"params": biases, "weight_decay": 0.0},
                       {"params": head, "lr": 3e-3, "betas": (0.8, 0.99), "amsgrad": True}],
                      lr=1e-3)

JAX::

    tx = jax_impl.param_groups([{"weight_decay": 0.1}, {"weight_decay": 0.0},
                                {"lr": 3e-3, "betas": (0.8, 0.99), "amsgrad": True}],
                               labels, lr=1e-3)

``labels`` is a pytree like the params holding each leaf's group index (or a
callable returning one).  Group keys are torch's (``lr``, ``betas``, ``eps``,
``weight_decay``, ``amsgrad``, ``maximize``); ``lr`` may be a schedule
(``jax_impl.schedules``) per group.  It is ``optax.multi_transform`` of one
:func:`jax_impl.adamw` per group, so :func:`jax_impl.apply_exact` writes every
group's params bitwise as torch's ``fused=True`` step does (torch updates each
group with its own hyperparameters, the same kernel per group).

:func:`add_param_group` is torch's ``optimizer.add_param_group``: new leaves in
a new group, the other groups' state kept.  :func:`torch_state_to_jax` and
:func:`jax_state_to_torch` convert the optimizer state of grouped optimizers
(``crosscheck.convert`` handles one AdamW state; these split and join it by group).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_impl._adamw import AdamWState, adamw

# torch.optim.AdamW's defaults, under torch's names.
TORCH_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
                  "maximize": False}


def _adamw_kwargs(group: Mapping, defaults: Mapping, index: int) -> dict:
    unknown = set(group) - set(TORCH_DEFAULTS) - {"params"}
    if unknown:
        raise ValueError(f"param_groups: group {index} has unknown keys {sorted(unknown)} "
                         f"(expected torch's {sorted(TORCH_DEFAULTS)})")
    merged = {**TORCH_DEFAULTS, **defaults, **{k: v for k, v in group.items() if k != "params"}}
    betas = tuple(merged["betas"])
    if len(betas) != 2:
        raise ValueError(f"param_groups: group {index} betas must be a pair, got {merged['betas']!r}")
    return dict(learning_rate=merged["lr"], b1=betas[0], b2=betas[1], eps=merged["eps"],
                weight_decay=merged["weight_decay"], amsgrad=merged["amsgrad"], maximize=merged["maximize"])


def param_groups(groups: Sequence[Mapping[str, Any]], labels: Any | Callable[[optax.Params], Any],
                 **defaults: Any) -> optax.GradientTransformation:
    """One :func:`jax_impl.adamw` per torch param group; ``labels[leaf]`` is the leaf's group index.

    Args:
      groups: one dict per group with torch's keys (``lr``, ``betas``, ``eps``,
        ``weight_decay``, ``amsgrad``, ``maximize``); missing keys take ``defaults``.
      labels: a pytree like the params of group indices (0 .. len(groups) - 1),
        or a callable mapping the params to one.
      **defaults: torch's constructor arguments (``lr=``, ``betas=``, ...),
        themselves defaulting to ``torch.optim.AdamW``'s.
    """
    unknown = set(defaults) - set(TORCH_DEFAULTS)
    if unknown:
        raise ValueError(f"param_groups: unknown defaults {sorted(unknown)} (expected {sorted(TORCH_DEFAULTS)})")
    if not groups:
        raise ValueError("param_groups: groups is empty")
    transforms = {i: adamw(**_adamw_kwargs(group, defaults, i)) for i, group in enumerate(groups)}

    def checked_labels(params):
        tree = labels(params) if callable(labels) else labels
        for label in jax.tree.leaves(tree):
            if label not in transforms:
                raise ValueError(f"param_groups: label {label!r} names no group (there are {len(groups)})")
        return tree

    return optax.multi_transform(transforms, checked_labels)


def add_param_group(groups: Sequence[Mapping[str, Any]], labels: Any, state: optax.OptState, params: optax.Params,
                    group: Mapping[str, Any], **defaults: Any) -> tuple[optax.GradientTransformation, optax.OptState]:
    """torch's ``optimizer.add_param_group(group)``: the transformation and state for ``groups + [group]``.

    ``params`` and ``labels`` are the new trees (the old leaves plus the new
    group's, labelled ``len(groups)``); ``state`` is the old optimizer state,
    whose groups keep their counts and moments.  The new group starts fresh,
    as torch creates its state at its first step.
    """
    tx = param_groups([*groups, group], labels, **defaults)
    new_state = tx.init(params)
    inner = dict(new_state.inner_states)
    for label, old in state.inner_states.items():
        inner[label] = _transplant(old, inner[label])
    return tx, new_state._replace(inner_states=inner)


def _leaves_by_path(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _refill(template, by_path: Mapping, what: str):
    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        if key not in by_path:
            raise ValueError(f"{what}: no value for {key}")
        value = jnp.asarray(by_path[key])
        if value.shape != jnp.shape(leaf):
            raise ValueError(f"{what}: {key} has shape {value.shape}, expected {jnp.shape(leaf)}")
        return value.astype(jnp.result_type(leaf))

    return jax.tree_util.tree_map_with_path(pick, template)


def _transplant(old, template):
    """``template`` (a group's masked AdamW state over the new params) with ``old``'s count and moments."""
    old_adamw, new_adamw = old.inner_state, template.inner_state
    moments = {}
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        tree = getattr(new_adamw, name)
        moments[name] = None if tree is None else _refill(tree, _leaves_by_path(getattr(old_adamw, name)),
                                                          "add_param_group")
    return template._replace(inner_state=AdamWState(count=old_adamw.count, **moments))


def torch_state_to_jax(optimizer_state: Mapping, layers: Sequence, names: Sequence[str], tx, params) -> Any:
    """The ``param_groups`` state of ``tx`` from a grouped torch AdamW ``state_dict()`` (see ``crosscheck.convert``).

    Each torch group ``g`` fills group ``g`` of ``tx`` (labels must agree);
    ``names`` are the torch parameter names in the optimizer's order.
    """
    from crosscheck import convert

    template = tx.init(params)
    torch_groups = optimizer_state["param_groups"]
    if len(torch_groups) != len(template.inner_states):
        raise convert.ConversionError(f"torch has {len(torch_groups)} param groups, tx has "
                                      f"{len(template.inner_states)}")
    inner = dict(template.inner_states)
    for g, torch_group in enumerate(torch_groups):
        indices = list(torch_group["params"])
        sub = {"state": {local: optimizer_state["state"][i] for local, i in enumerate(indices)
                         if i in optimizer_state.get("state", {})}}
        state = convert.torch_optimizer_to_jax(sub, layers, [names[i] for i in indices])
        target = inner[g].inner_state
        flat = {name: _leaves_by_path(getattr(state, name)) for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
        if not sub["state"]:
            continue  # a fresh group (no step yet): the template's zeros are torch's absent state
        moments = {name: None if getattr(target, name) is None else
                   _refill(getattr(target, name), flat[name], f"torch group {g}")
                   for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
        inner[g] = inner[g]._replace(inner_state=AdamWState(count=state.count, **moments))
    return template._replace(inner_states=inner)


def jax_state_to_torch(state, layers: Sequence, names: Sequence[str], torch_param_groups: Sequence[Mapping]) -> dict:
    """A grouped torch AdamW ``state_dict`` from a ``param_groups`` state; ``torch_param_groups`` are the target's."""
    from crosscheck import convert

    torch_state = {}
    for g, torch_group in enumerate(torch_param_groups):
        indices = list(torch_group["params"])
        adamw_state = state.inner_states[g].inner_state
        plain = AdamWState(adamw_state.count, *(None if tree is None else _nested(tree) for tree in
                                                (adamw_state.exp_avg, adamw_state.exp_avg_sq,
                                                 adamw_state.max_exp_avg_sq)))
        sub = convert.jax_optimizer_to_torch(plain, layers, [names[i] for i in indices], [torch_group])
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
