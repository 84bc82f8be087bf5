"""Weight-decay masks from parameter names: the torch param-group recipe, as an optax mask."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import optax

NO_DECAY = ("bias", "scale", "embedding_bias")


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def decay_mask_by_name(exclude: Iterable[str] = NO_DECAY) -> Callable[[optax.Params], optax.Params]:
    """A mask callable for ``adamw(mask=...)``: decay every leaf except those whose own name is in ``exclude``.

    With the default, biases and norm scales are not decayed, as in the usual
    torch recipe (a param group with ``weight_decay=0`` for ``*.bias`` and the
    norm layers' ``weight``, which Flax calls ``scale``).
    """
    excluded = frozenset(exclude)

    def mask(params: optax.Params) -> optax.Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not (path and _key_name(path[-1]) in excluded), params)

    return mask
