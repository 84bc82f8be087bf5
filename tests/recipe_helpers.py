"""Shared gradients for the training-recipe tests: one stream of gradients, a torch run, and bitwise comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

# Leaves of sizes with and without torch's scalar tail; small values so that
# lr=1e-2 steps cross zero (where p + (p_new - p) loses bits).
SHAPES = {"w": (4, 9), "b": (9,), "head": (7,)}


def initial_params(seed: int = 0, scale: float = 0.02) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def gradients(t: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """The gradient stream both frameworks see: seeded by the step, float32, shaped like SHAPES."""
    rng = np.random.default_rng(10_000 + t)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def to_jax(tree) -> dict:
    return jax.tree.map(jnp.asarray, tree)


def torch_params(params: dict) -> dict[str, torch.nn.Parameter]:
    return {k: torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in params.items()}


def set_grads(tparams: dict, grads: dict) -> None:
    for k, p in tparams.items():
        p.grad = torch.from_numpy(np.array(grads[k]))


def add_grads(tparams: dict, grads: dict) -> None:
    """What another backward() does: ``.grad`` written the first time, added to after."""
    for k, p in tparams.items():
        g = torch.from_numpy(grads[k])
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)


def torch_state(optimizer: torch.optim.Optimizer, tparams: dict, key: str) -> dict:
    return {k: optimizer.state[p][key].numpy().copy() for k, p in tparams.items() if p in optimizer.state}


def mismatches(jax_tree, torch_tree: dict) -> dict[str, float]:
    """Leaf -> fraction of elements whose bits differ (NaN equal to NaN); empty when bitwise equal."""
    out = {}
    for k, t in torch_tree.items():
        j = np.asarray(jax_tree[k])
        t = t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        same = (j.view(np.uint32) == t.view(np.uint32)) | (np.isnan(j) & np.isnan(t))
        if not same.all():
            out[k] = float(1 - same.mean())
    return out
