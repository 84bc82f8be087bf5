"""Persistent flat buffers: a model's many parameter arrays as a few 1-D buffers, for a faster optimizer step.

A jitted step over a pytree of hundreds of arrays pays JAX's per-array costs
(dispatch, donation, the custom call's operands) on every call; on a 2-core
CPU that is several milliseconds for 300 leaves, more than the update itself.
Keeping the parameters (and so the optimizer state) in one buffer per
(dtype, weight decay on/off) removes them, while the update stays exactly
torch's: each original tensor's scalar tail is passed as ``scalar_tail``.
Flattening inside every step would copy everything each time; here the
buffers *are* the parameters, and :meth:`FlatLayout.unflatten` gives the
model its arrays (slices) inside the jitted train step.

    layout = FlatLayout(params, mask=decay_mask)   # once, on the host
    flat = layout.flatten(params)
    tx = jax_impl.adamw(1e-3, **layout.adamw_options())
    state = tx.init(flat)
    ...
    flat, state = jax_impl.apply_exact(tx, layout.flatten(grads), state, flat)   # or grads of unflatten
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl._cpu_rounding import torch_cpu_vector_width
from jax_impl._state import resolve_mask


@dataclass(frozen=True)
class _Slot:
    group: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class FlatLayout:
    """Where each leaf of a parameter tree lives in the flat buffers (static, host-side)."""

    def __init__(self, params: optax.Params, mask=None):
        leaves, self.treedef = jax.tree.flatten(params)
        decay = resolve_mask(mask, params)
        self.slots: list[_Slot] = []
        sizes: dict[str, int] = {}
        self.dtypes: dict[str, jnp.dtype] = {}
        self.decay: dict[str, bool] = {}
        for leaf, decay_on in zip(leaves, decay):
            dtype = jnp.result_type(leaf)
            group = f"{dtype.name}" + ("" if decay_on else "/no_decay")
            self.dtypes[group], self.decay[group] = dtype, decay_on
            self.slots.append(_Slot(group, sizes.get(group, 0), tuple(jnp.shape(leaf))))
            sizes[group] = sizes.get(group, 0) + self.slots[-1].size
        self.sizes = sizes

    def flatten(self, tree: optax.Params) -> dict[str, jax.Array]:
        """The buffers of a tree shaped like the params (params, grads): one concatenation per group.

        Raises ``ValueError`` for a tree of another structure or a leaf of another shape (its
        elements would land in another leaf's slots).
        """
        treedef = jax.tree.structure(tree)
        if treedef != self.treedef:
            raise ValueError(f"FlatLayout.flatten: the tree does not match the layout's parameter tree:\n"
                             f"  layout: {self.treedef}\n  tree:   {treedef}")
        parts: dict[str, list] = {group: [] for group in self.sizes}
        for slot, (path, leaf) in zip(self.slots, jax.tree_util.tree_flatten_with_path(tree)[0]):
            if tuple(jnp.shape(leaf)) != slot.shape:
                raise ValueError(f"FlatLayout.flatten: leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
                                 f"{tuple(jnp.shape(leaf))}, the layout's is {slot.shape}")
            parts[slot.group].append(jnp.ravel(leaf))
        return {group: jnp.concatenate(chunks) if chunks else jnp.zeros(0, self.dtypes[group])
                for group, chunks in parts.items()}

    def unflatten(self, flat: dict[str, jax.Array]) -> optax.Params:
        """The tree back, as slices of the buffers (free inside jit).

        Raises ``ValueError`` unless ``flat`` has exactly the layout's buffers, each of its size.
        """
        if not isinstance(flat, Mapping):
            got = f"an array of shape {tuple(jnp.shape(flat))}" if hasattr(flat, "shape") else type(flat).__name__
            raise ValueError(f"FlatLayout.unflatten: expected a dict of buffers, got {got}")
        if set(flat) != set(self.sizes):
            raise ValueError(f"FlatLayout.unflatten: expected the buffers {sorted(self.sizes)}, got {sorted(flat)}")
        for group, size in self.sizes.items():
            if tuple(jnp.shape(flat[group])) != (size,):
                raise ValueError(f"FlatLayout.unflatten: buffer {group!r} has shape {tuple(jnp.shape(flat[group]))}, "
                                 f"the layout's is ({size},)")
        leaves = [jax.lax.slice(flat[slot.group], (slot.offset,), (slot.offset + slot.size,)).reshape(slot.shape)
                  for slot in self.slots]
        return self.treedef.unflatten(leaves)

    def scalar_tail(self) -> dict[str, np.ndarray]:
        """Per buffer, the positions of every original tensor's last ``numel % width`` elements."""
        tails: dict[str, list] = {group: [] for group in self.sizes}
        for slot in self.slots:
            tail = slot.size % torch_cpu_vector_width(self.dtypes[slot.group])
            tails[slot.group].append(np.arange(slot.offset + slot.size - tail, slot.offset + slot.size))
        return {group: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
                for group, parts in tails.items()}

    def adamw_options(self) -> dict:
        """``mask`` and ``scalar_tail`` for :func:`jax_impl.adamw` over these buffers."""
        return {"mask": dict(self.decay), "scalar_tail": self.scalar_tail()}
