"""Torch models and ports whose names differ the way real ports' do (used by tests/crosscheck_tests/convert/test_names.py).

Tiny configurations, random initialization: nothing is downloaded.
"""

from __future__ import annotations

import math

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

F = torch.nn.functional


def pad(*p: int) -> list[tuple[int, int]]:
    return [(v, v) for v in p]


# ---------------------------------------------------------------- HF GPT-2 (tiny) and a natural nnx port


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0,
                        eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


class NnxGPT2Block(nnx.Module):
    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.ln_1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.attn = nnx.Dict(c_attn=nnx.Linear(width, 3 * width, rngs=rngs), c_proj=nnx.Linear(width, width, rngs=rngs))
        self.ln_2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.mlp = nnx.Dict(c_fc=nnx.Linear(width, 4 * width, rngs=rngs), c_proj=nnx.Linear(4 * width, width, rngs=rngs))

    def __call__(self, x):
        b, t, e = x.shape
        q, k, v = jnp.split(self.attn["c_attn"](self.ln_1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, e // self.heads).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(e // self.heads)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
        y = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, e)
        x = x + self.attn["c_proj"](y)
        return x + self.mlp["c_proj"](jax.nn.gelu(self.mlp["c_fc"](self.ln_2(x)), approximate=True))


class NnxGPT2(nnx.Module):
    """GPT2LMHeadModel without its ``transformer.`` level; the head is the embedding (tied)."""

    def __init__(self, vocab: int = 32, width: int = 16, heads: int = 2, length: int = 8, layers: int = 2,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.wte = nnx.Embed(vocab, width, rngs=rngs)
        self.wpe = nnx.Embed(length, width, rngs=rngs)
        self.h = nnx.List([NnxGPT2Block(width, heads, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None]
        for block in self.h:
            x = block(x)
        return self.wte.attend(self.ln_f(x))


# ---------------------------------------------------------------- timm-style block: nn.Sequential downsample


class BasicBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.downsample = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1, stride=2, bias=False), torch.nn.BatchNorm2d(8))
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.relu(y + self.downsample(x)).mean((2, 3)))


class NnxBasicBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs | None = None):
        from crosscheck.convert import flax_layers

        rngs = rngs or nnx.Rngs(0)
        self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, padding=pad(1, 1), use_bias=False, rngs=rngs)
        self.bn1 = flax_layers.BatchNorm(8)
        self.conv2 = nnx.Conv(8, 8, (3, 3), padding=pad(1, 1), use_bias=False, rngs=rngs)
        self.bn2 = flax_layers.BatchNorm(8)
        self.downsample = nnx.Sequential(nnx.Conv(3, 8, (1, 1), strides=2, padding="VALID", use_bias=False, rngs=rngs),
                                         flax_layers.BatchNorm(8))
        self.fc = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        return self.fc(nnx.relu(y + self.downsample(x)).mean((1, 2)))


# ---------------------------------------------------------------- a model's own LayerNorm class (ConvNeXt style)


class OwnLayerNorm(torch.nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width))
        self.bias = torch.nn.Parameter(torch.randn(width))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class OwnNormMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 12)
        self.norm = OwnLayerNorm(12)
        self.fc2 = torch.nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class NnxOwnNormMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.fc1 = nnx.Linear(6, 12, rngs=rngs)
        self.norm = nnx.LayerNorm(12, epsilon=1e-6, rngs=rngs)
        self.fc2 = nnx.Linear(12, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.norm(self.fc1(x))))


# ---------------------------------------------------------------- linen's automatic names (Conv_0, BatchNorm_3)


class SmallResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(8)
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a_bn = torch.nn.BatchNorm2d(8)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b_bn = torch.nn.BatchNorm2d(8)
        self.up = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.up_bn = torch.nn.BatchNorm2d(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.b_bn(self.b(torch.relu(self.a_bn(self.a(x))))))
        return self.head(torch.relu(self.up_bn(self.up(x))).mean((2, 3)))


class LinenSmallResNet(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        def conv_bn(x, features, stride=1):
            x = linen.Conv(features, (3, 3), strides=stride, padding=pad(1, 1), use_bias=False)(x)
            return linen.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)

        x = linen.relu(conv_bn(x, 8))
        x = linen.relu(x + conv_bn(linen.relu(conv_bn(x, 8)), 8))
        return linen.Dense(10)(linen.relu(conv_bn(x, 16, 2)).mean((1, 2)))


def linen_small_resnet_variables():
    """Zeros of init's shapes (no compile: matching reads shapes; the keys come back sorted, as tree maps sort them)."""
    shapes = jax.eval_shape(lambda: LinenSmallResNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ---------------------------------------------------------------- a persistent=False buffer (a position table)


class PositionalMLP(torch.nn.Module):
    def __init__(self, length: int = 6, width: int = 8):
        super().__init__()
        position = torch.arange(length)[:, None] / 10 ** (torch.arange(width)[None] / width)
        self.register_buffer("pe", torch.where(torch.arange(width) % 2 == 0, position.sin(), position.cos()),
                             persistent=False)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):  # x: (B, T, width)
        return self.proj(x + self.pe[: x.shape[1]])


class NnxPositionalMLP(nnx.Module):
    def __init__(self, length: int = 6, width: int = 8, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.pe = nnx.Variable(jnp.zeros((length, width)))
        self.proj = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        return self.proj(x + self.pe[: x.shape[1]])


# ---------------------------------------------------------------- ConvTranspose with transpose_kernel=True


class Upsampler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.up(x)


class NnxUpsampler(nnx.Module):
    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.up = nnx.ConvTranspose(4, 6, (3, 3), strides=2, padding=[(1, 2)] * 2, transpose_kernel=True, rngs=rngs)

    def __call__(self, x):
        return self.up(x)


# ---------------------------------------------------------------- names that say nothing: two same-shaped layers


class TwoSame(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.second = torch.nn.Linear(8, 8)  # defined first, called second
        self.first = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.second(torch.relu(self.first(x)))))


class NnxTwoSame(nnx.Module):
    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.dense_a = nnx.Linear(8, 8, rngs=rngs)
        self.dense_b = nnx.Linear(8, 8, rngs=rngs)
        self.logits = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.logits(nnx.relu(self.dense_b(nnx.relu(self.dense_a(x)))))


def make_nnx_two_same():
    return NnxTwoSame(nnx.Rngs(0))


def make_nnx_basic_block():
    return NnxBasicBlock(nnx.Rngs(0))


def numpy_batch(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


class NnxTwoSameSwapped(NnxTwoSame):
    """Defines dense_b before dense_a, calls dense_a first: definition order misleads, a mapping is needed."""

    def __init__(self, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.dense_b = nnx.Linear(8, 8, rngs=rngs)
        self.dense_a = nnx.Linear(8, 8, rngs=rngs)
        self.logits = nnx.Linear(8, 3, rngs=rngs)


def make_nnx_two_same_swapped():
    return NnxTwoSameSwapped(nnx.Rngs(0))


def abstract_nnx_basic_block():
    """Shapes only (nnx.eval_shape): enough for --print-mapping, which stops before running anything."""
    return nnx.eval_shape(make_nnx_basic_block)


# ---------------------------------------------------------------- torchvision's ResNet-18 names vs flaxmodels' linen one


class TorchvisionBasicBlock(torch.nn.Module):
    """torchvision.models.resnet.BasicBlock's names and layers (torchvision itself does not import beside CPU torch)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(planes)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                                  torch.nn.BatchNorm2d(planes))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet18(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        widths, inplanes = (64, 128, 256, 512), 64
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", torch.nn.Sequential(TorchvisionBasicBlock(inplanes, planes, stride),
                                                               TorchvisionBasicBlock(planes, planes)))
            inplanes = planes
        self.fc = torch.nn.Linear(512, classes)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def flaxmodels_resnet18_variables(init: bool = True):
    """flaxmodels' linen ResNet18 (random init, nothing downloaded): ``module.init``'s own dict (call order), or
    (``init=False``) zeros of its shapes, whose keys ``jax.eval_shape`` sorted."""
    import flaxmodels

    module = flaxmodels.ResNet18(output="logits", pretrained=None, num_classes=10)
    make = lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)  # noqa: E731
    with jax.numpy_rank_promotion("allow"):  # flaxmodels broadcasts (C,) against (N, H, W, C); the tests raise
        if init:
            return make()
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(make))
