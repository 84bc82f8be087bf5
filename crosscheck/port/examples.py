"""Small real models in PyTorch and their faithful Flax NNX ports, for port verification.

Each :class:`Example` has a torch factory, an nnx factory, the ``layers_of``
options the port needs and a batch maker (torch layouts; labels for the
default cross-entropy: (N,) classes, (N, H, W) per pixel or (B, T) tokens).
They are what ``tests/crosscheck_tests/port/test_ports.py`` checks and what the README's ``port``
example runs (``python -m crosscheck port --example resnet_block``, or
``--torch crosscheck.port_examples:ResNetBlock --flax crosscheck.port_examples:NnxResNetBlock``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from crosscheck import convert
from crosscheck.convert import flax_layers

F = torch.nn.functional


def _same(*pads: int) -> list[tuple[int, int]]:
    return [(p, p) for p in pads]


# ---------------------------------------------------------------- ResNet block with BatchNorm

class ResNetBlock(torch.nn.Module):
    """conv (its bias cancelled by the BatchNorm after it: zero gradient) -> BN -> ReLU -> conv -> BN, + 1x1 skip."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.skip = torch.nn.Conv2d(3, 8, 1, stride=2, bias=False)
        self.head = torch.nn.Linear(8, classes)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(y + self.skip(x)).mean((2, 3)))


class NnxResNetBlock(nnx.Module):
    def __init__(self, classes: int = 10, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=_same(1, 1), rngs=rngs)
        self.bn1 = flax_layers.BatchNorm(8)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, padding=_same(1, 1), rngs=rngs)
        self.bn2 = flax_layers.BatchNorm(8)
        self.skip = nnx.Conv(3, 8, (1, 1), strides=2, padding="VALID", use_bias=False, rngs=rngs)
        self.head = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x):
        y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        return self.head(nnx.relu(y + self.skip(x)).mean((1, 2)))


# ---------------------------------------------------------------- depthwise and dilated convolutions

class DepthwiseDilated(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.dilated = torch.nn.Conv2d(3, 12, 3, padding=2, dilation=2)
        self.depthwise = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pointwise = torch.nn.Conv2d(12, 16, 1)
        self.head = torch.nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.dilated(x)), 2)
        x = F.max_pool2d(torch.relu(self.pointwise(torch.relu(self.depthwise(x)))), 2)
        return self.head(x.flatten(1))


class NnxDepthwiseDilated(nnx.Module):
    def __init__(self, classes: int = 10, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.dilated = nnx.Conv(3, 12, (3, 3), padding=_same(2, 2), kernel_dilation=2, rngs=rngs)
        self.depthwise = nnx.Conv(12, 12, (3, 3), padding=_same(1, 1), feature_group_count=12, rngs=rngs)
        self.pointwise = nnx.Conv(12, 16, (1, 1), rngs=rngs)
        self.head = nnx.Linear(16 * 4 * 4, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.dilated(x)), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.pointwise(nnx.relu(self.depthwise(x)))), (2, 2), (2, 2))
        return self.head(x.reshape(x.shape[0], -1))


# ---------------------------------------------------------------- ConvTranspose2d decoder (per-pixel classes)

class Decoder(torch.nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8 * 4 * 4)
        self.up1 = torch.nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.up2 = torch.nn.ConvTranspose2d(8, classes, 3, stride=2, padding=1, output_padding=1)

    def forward(self, z):
        x = torch.relu(self.fc(z)).view(-1, 8, 4, 4)
        return self.up2(torch.relu(self.up1(x)))


class NnxDecoder(nnx.Module):
    def __init__(self, classes: int = 5, rngs: nnx.Rngs | None = None, transpose_kernel: bool = False):
        rngs = rngs or nnx.Rngs(0)
        self.fc = nnx.Linear(16, 8 * 4 * 4, rngs=rngs)
        self.up1 = nnx.ConvTranspose(8, 8, (4, 4), strides=2, padding=[(2, 2)] * 2, transpose_kernel=transpose_kernel,
                                     rngs=rngs)
        self.up2 = nnx.ConvTranspose(8, classes, (3, 3), strides=2, padding=[(1, 2)] * 2,
                                     transpose_kernel=transpose_kernel, rngs=rngs)

    def __call__(self, z):
        # torch's view(-1, 8, 4, 4) is channels-first: reshape so, then go channels-last
        x = nnx.relu(self.fc(z)).reshape(-1, 8, 4, 4).transpose(0, 2, 3, 1)
        return self.up2(nnx.relu(self.up1(x)))


# ---------------------------------------------------------------- small transformer (tied head, buffers, bare params)

class Transformer(torch.nn.Module):
    """Token embedding + learned positions (bare nn.Parameter), a pre-norm block with nn.MultiheadAttention
    under a causal mask (a registered buffer), GELU MLP, and a head tied to the embedding."""

    def __init__(self, vocab: int = 32, width: int = 16, heads: int = 2, length: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.randn(1, length, width) * 0.02)
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1))
        self.norm1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 4 * width)
        self.fc2 = torch.nn.Linear(4 * width, width)
        self.norm3 = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[:, :tokens.shape[1]]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm3(x))


class NnxTransformer(nnx.Module):
    def __init__(self, vocab: int = 32, width: int = 16, heads: int = 2, length: int = 8,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((1, length, width)))
        self.mask = nnx.Variable(jnp.triu(jnp.ones((length, length), bool), 1))  # a buffer: not trained
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
        self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)
        self.norm3 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[:, :tokens.shape[1]]
        h = self.norm1(x)
        t = tokens.shape[1]
        x = x + self.attn(h, mask=~self.mask[:t, :t])  # torch masks True, Flax attends where True
        x = x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))  # torch's GELU is exact
        return self.embed.attend(self.norm3(x))


# ---------------------------------------------------------------- Conv1d / GroupNorm / Conv3d

class Seq1d(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(4, 8, 5, padding=2)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.conv2 = torch.nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.gn(self.conv1(x))))).mean(2))


class NnxSeq1d(nnx.Module):
    def __init__(self, classes: int = 10, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.conv1 = nnx.Conv(4, 8, (5,), padding=_same(2), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=2, epsilon=1e-5, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3,), strides=2, padding=_same(1), rngs=rngs)
        self.head = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv2(nnx.relu(self.gn(self.conv1(x))))).mean(1))


class Volume3d(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 6, 3, padding=1)
        self.gn = torch.nn.GroupNorm(3, 6)
        self.head = torch.nn.Linear(6, classes)

    def forward(self, x):
        return self.head(torch.relu(self.gn(self.conv(x))).mean((2, 3, 4)))


class NnxVolume3d(nnx.Module):
    def __init__(self, classes: int = 10, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.conv = nnx.Conv(2, 6, (3, 3, 3), padding=_same(1, 1, 1), rngs=rngs)
        self.gn = nnx.GroupNorm(6, num_groups=3, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(6, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.gn(self.conv(x))).mean((1, 2, 3)))


# ---------------------------------------------------------------- LSTM / GRU language model with RMSNorm

class Recurrent(torch.nn.Module):
    def __init__(self, vocab: int = 24, width: int = 12):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.lstm = torch.nn.LSTM(width, width, batch_first=True)
        self.gru = torch.nn.GRU(width, width, batch_first=True)
        self.norm = torch.nn.RMSNorm(width, eps=1e-6)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        x, _ = self.lstm(self.embed(tokens))
        x, _ = self.gru(x)
        return self.head(self.norm(x))


class NnxRecurrent(nnx.Module):
    def __init__(self, vocab: int = 24, width: int = 12, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.lstm = flax_layers.LSTM(width, width, batch_first=True, rngs=rngs)
        self.gru = flax_layers.GRU(width, width, batch_first=True, rngs=rngs)
        self.norm = nnx.RMSNorm(width, epsilon=1e-6, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
        x, _ = self.lstm(self.embed(tokens))
        x, _ = self.gru(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------- frozen layer, layer scale, fixed buffer

class FrozenMLP(torch.nn.Module):
    """A frozen (requires_grad=False) input layer, a layer scale (bare parameter), a fixed centre (buffer)."""

    def __init__(self, features: int = 20, classes: int = 10):
        super().__init__()
        self.register_buffer("center", torch.linspace(-0.5, 0.5, features))
        self.frozen = torch.nn.Linear(features, 32)
        self.frozen.requires_grad_(False)
        self.gamma = torch.nn.Parameter(torch.full((32,), 0.5))
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.gamma * torch.relu(self.frozen(x - self.center)))


class NnxFrozenMLP(nnx.Module):
    def __init__(self, features: int = 20, classes: int = 10, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.center = nnx.Variable(jnp.zeros(features))
        self.frozen = nnx.Linear(features, 32, rngs=rngs)
        self.gamma = nnx.Param(jnp.zeros(32))
        self.head = nnx.Linear(32, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.gamma[None] * nnx.relu(self.frozen(x - self.center[None])))


# ---------------------------------------------------------------- the table

def _images(shape: tuple[int, ...], classes: int = 10, per_pixel: bool = False):
    def make(seed: int = 0):
        rng = np.random.default_rng(seed)
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        labels = (rng.integers(0, classes, (shape[0], *shape[2:])) if per_pixel
                  else rng.integers(0, classes, shape[0]))
        return x, labels
    return make


def _tokens(batch: int, length: int, vocab: int):
    def make(seed: int = 0):
        rng = np.random.default_rng(seed)
        return rng.integers(0, vocab, (batch, length)), rng.integers(0, vocab, (batch, length))
    return make


def _latents(batch: int, features: int, classes: int, size: int = 16):
    def make(seed: int = 0):
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((batch, features)).astype(np.float32),
                rng.integers(0, classes, (batch, size, size)))
    return make


@dataclass(frozen=True)
class Example:
    torch_model: Callable[[], torch.nn.Module]
    flax_model: Callable[[], nnx.Module]
    batch: Callable[[int], tuple[np.ndarray, np.ndarray]]
    layers_options: dict[str, Any] = field(default_factory=dict)

    def layers(self, model: torch.nn.Module) -> list[convert.Layer]:
        return convert.layers_of(model, **self.layers_options)

    def pair(self, seed: int = 0) -> tuple[torch.nn.Module, nnx.Module]:
        torch.manual_seed(seed)
        return self.torch_model(), self.flax_model()


EXAMPLES: dict[str, Example] = {
    "resnet_block": Example(ResNetBlock, NnxResNetBlock, _images((16, 3, 16, 16))),
    "depthwise_dilated": Example(DepthwiseDilated, NnxDepthwiseDilated, _images((16, 3, 16, 16)),
                                 {"flatten_from": {"head": (16, 4, 4)}}),
    "decoder": Example(Decoder, NnxDecoder, _latents(8, 16, 5)),
    "transformer": Example(Transformer, NnxTransformer, _tokens(8, 8, 32)),
    "conv1d_groupnorm": Example(Seq1d, NnxSeq1d, _images((16, 4, 32))),
    "conv3d_groupnorm": Example(Volume3d, NnxVolume3d, _images((8, 2, 6, 6, 6))),
    "lstm_gru_rmsnorm": Example(Recurrent, NnxRecurrent, _tokens(8, 10, 24)),
    "frozen_buffers": Example(FrozenMLP, NnxFrozenMLP, _images((16, 20))),
}


def batches(example: Example, seed: int = 0):
    """An endless stream of fresh batches for ``example``."""
    while True:
        yield example.batch(seed)
        seed += 1
