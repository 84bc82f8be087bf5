"""The losses both frameworks compute the same way, and the Flax gradient of a model under one."""

from __future__ import annotations

import jax
import optax
import torch
from flax import nnx


def torch_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy for (N, C) logits, per-position (N, C, *spatial) logits with (N, *spatial)
    labels, and token logits (B, T, V) with (B, T) labels (class axis last)."""
    if logits.ndim > 2 and tuple(labels.shape) == tuple(logits.shape[:-1]):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return torch.nn.functional.cross_entropy(logits, labels)


def flax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The same mean in JAX (the Flax port's class axis is last in every case): optax's integer-label cross
    entropy, averaged like torch's."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def flax_loss_and_grads(model: nnx.Module, images: jax.Array, labels: jax.Array, loss=flax_cross_entropy):
    """(loss, logits) and the gradient with respect to the model's Params."""
    def loss_fn(m):
        logits = m(images)
        return loss(logits, labels), logits

    (value, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return value, logits, grads
