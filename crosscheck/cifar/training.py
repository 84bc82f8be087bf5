"""Training runs of one model in PyTorch and in Flax NNX behind one small interface.

A run owns a model and its optimizer and takes NumPy batches in torch's NCHW
layout: ``train_step(x, y) -> loss``, ``evaluate(x, y) -> (loss, accuracy)``,
``params_torch()`` (the parameters by torch name, in torch's layout, for
divergence measurements).  Flax runs are jitted functional steps over the
model's Params (``nnx.split`` / ``nnx.merge``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import jax_impl
from crosscheck import convert
from crosscheck.cifar import models
from crosscheck.common import losses
from crosscheck.common.metrics import as_numpy

EVAL_BATCH = 500


class TorchRun:
    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.seconds = 0.0  # time spent in train_step

    def _forward_backward(self, x: np.ndarray, y: np.ndarray) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        loss = losses.torch_cross_entropy(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        return loss.item()

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        started = time.perf_counter()
        loss = self._forward_backward(x, y)
        self.optimizer.step()
        self.seconds += time.perf_counter() - started
        return loss

    def grads(self) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        return np.concatenate([as_numpy(self.model(torch.from_numpy(x[i:i + EVAL_BATCH])))
                               for i in range(0, len(x), EVAL_BATCH)])

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return _loss_and_accuracy(self.logits(x), y)

    def params_torch(self) -> dict[str, np.ndarray]:
        return {name: as_numpy(p) for name, p in self.model.named_parameters()}


class FlaxRun:
    """An NNX model trained by a jitted step: ``jax_impl.adamw`` (exact step) or any optax transformation."""

    def __init__(self, name: str, model: nnx.Module, tx: optax.GradientTransformation, layers: Sequence,
                 names: Sequence[str]):
        self.name, self.layers, self.names = name, list(layers), list(names)
        self.graphdef, state = nnx.split(model, nnx.Param)
        self.params = jax.tree.map(jnp.copy, nnx.as_pure(state))  # own buffers: the step donates them
        self.tx, self.opt_state = tx, tx.init(self.params)
        self.seconds = 0.0
        exact = getattr(tx.update, "exact_step", None) is not None

        def forward(params, x):
            return nnx.merge(self.graphdef, params)(x)

        def loss_fn(params, x, y):
            return losses.flax_cross_entropy(forward(params, x), y)

        def apply(grads, params, opt_state):
            if exact:
                return jax_impl.apply_exact(tx, grads, opt_state, params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def train_step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            params, opt_state = apply(grads, params, opt_state)
            return params, opt_state, loss

        self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self._apply = jax.jit(apply, donate_argnums=(1, 2))
        self._logits = jax.jit(forward)
        self._loss = jax.jit(loss_fn)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        started = time.perf_counter()
        self.params, self.opt_state, loss = self._train_step(self.params, self.opt_state,
                                                             jnp.asarray(models.nchw_to_nhwc(x)), jnp.asarray(y))
        loss = float(loss)  # waits for the step, so the time is the step's
        self.seconds += time.perf_counter() - started
        return loss

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self._loss(self.params, jnp.asarray(models.nchw_to_nhwc(x)), jnp.asarray(y)))

    def step_with(self, grads_torch: dict[str, torch.Tensor]) -> None:
        """One optimizer step on gradients computed elsewhere (torch's, in torch's layout)."""
        started = time.perf_counter()
        grads = nnx.State(jax.tree.map(jnp.asarray, convert.params_to_flax(grads_torch, self.layers)))
        self.params, self.opt_state = self._apply(grads, self.params, self.opt_state)
        jax.block_until_ready(self.params)
        self.seconds += time.perf_counter() - started

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(self._logits(self.params, jnp.asarray(models.nchw_to_nhwc(
            x[i:i + EVAL_BATCH])))) for i in range(0, len(x), EVAL_BATCH)])

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return _loss_and_accuracy(self.logits(x), y)

    def params_torch(self) -> dict[str, np.ndarray]:
        return {name: as_numpy(t) for name, t in convert.params_to_torch(self.params, self.layers,
                                                                         self.names).items()}


def _loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross entropy (float64, so both frameworks' logits are scored alike) and accuracy."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float((logits.argmax(axis=1) == labels).mean())
