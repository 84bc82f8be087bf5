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
a new group, the other groups' state kept.  Converting a grouped optimizer's
state from and to torch is the converter's job:
``crosscheck.convert.torch_optimizer_groups_to_jax`` and ``jax_optimizer_groups_to_torch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_impl._adamw import adamw
from jax_impl._state import AdamWState, from_torch_view, torch_view

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


def leaves_by_path(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def refill(template, by_path: Mapping, what: str):
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
    old_adamw, new_adamw = torch_view(old.inner_state), torch_view(template.inner_state)
    moments = {}
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        tree = getattr(new_adamw, name)
        moments[name] = None if tree is None else refill(tree, leaves_by_path(getattr(old_adamw, name)),
                                                          "add_param_group")
    view = AdamWState(count=old_adamw.count, **moments)
    return template._replace(inner_state=from_torch_view(template.inner_state, view))


# Moved to the converter, which owns everything that reads torch's state_dict.
_MOVED = {"torch_state_to_jax": "crosscheck.convert.torch_optimizer_groups_to_jax",
          "jax_state_to_torch": "crosscheck.convert.jax_optimizer_groups_to_torch"}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(f"jax_impl.groups.{name} moved to {_MOVED[name]} (jax_impl does not read torch state)")
    raise AttributeError(f"module 'jax_impl.groups' has no attribute {name!r}")
