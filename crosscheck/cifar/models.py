"""The seed tutorial's SimpleCNN, in PyTorch and in Flax NNX, and its converter table.

conv 3->32 (3x3, padding 1), ReLU, max-pool 2; conv 32->64 (3x3, padding 1),
ReLU, max-pool 2; flatten; linear 4096->128, ReLU; linear 128->10.  The
tutorial's ``forward`` forgets ``return x``; these return the logits.  Torch
flattens NCHW (``x.view(-1, 64*8*8)``), the NNX port NHWC: the converter
permutes fc1's kernel rows (``flatten_from=(64, 8, 8)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from crosscheck import convert


class TorchSimpleCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = torch.nn.MaxPool2d(2, 2)
        self.fc1 = torch.nn.Linear(64 * 8 * 8, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.view(-1, 64 * 8 * 8)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class NnxSimpleCNN(nnx.Module):
    """Takes NHWC images; its weights come from :class:`TorchSimpleCNN` via :func:`simple_cnn_layers`."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 32, kernel_size=(3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc1 = nnx.Linear(64 * 8 * 8, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        return self.fc2(x)


def simple_cnn_layers(model: torch.nn.Module | None = None) -> list[convert.Layer]:
    """The converter table of SimpleCNN: names as in torch, fc1 fed by an NCHW flatten of (64, 8, 8)."""
    return convert.layers_of(model or TorchSimpleCNN(), flatten_from={"fc1": (64, 8, 8)})


def simple_cnn_pair(seed: int = 0) -> tuple[TorchSimpleCNN, NnxSimpleCNN]:
    """Both models with identical weights: initialized by torch (its default init), converted to Flax."""
    torch.manual_seed(seed)
    torch_model = TorchSimpleCNN()
    flax_model = NnxSimpleCNN(nnx.Rngs(seed))
    nnx.update(flax_model, convert.torch_to_nnx(torch_model.state_dict(), simple_cnn_layers(torch_model),
                                                flax_model))
    return torch_model, flax_model


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1))) if np.ndim(x) == 4 else x


def flax_logits(model: nnx.Module, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(nchw_to_nhwc(images))))
