"""Real third-party torch models (HF GPT-2, ViT and ResNet from ``transformers``, a nanoGPT-style GPT), tiny and
randomly initialized, each with a Flax port written the natural way, and the porting pitfalls a port of each
can plant (the GELU variant, a missing causal mask, a wrong attention scale, a LayerNorm epsilon, a Conv1D
weight converted as a Linear, linen BatchNorm momentum).

``case(model, pitfall)`` builds (torch model, Flax model, layer table, batch maker, batch options).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen, nnx

from crosscheck import convert
from crosscheck.convert.layers import default_flax_path

transformers = pytest.importorskip("transformers")
F = torch.nn.functional


# ---------------------------------------------------------------- a nanoGPT-style GPT (torch)
# Written after karpathy/nanoGPT's model.py (MIT): its own LayerNorm class (eps a literal 1e-5 inside
# forward), fused c_attn, F.scaled_dot_product_attention(is_causal=True), nn.GELU, a tied lm_head, and
# forward(idx, targets=None) -> (logits, loss).

class LayerNorm(torch.nn.Module):
    """LayerNorm but with an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(ndim))
        self.bias = torch.nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, n_embd, n_head, bias=True):
        super().__init__()
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = torch.nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = torch.nn.Dropout(0.0)
        self.resid_dropout = torch.nn.Dropout(0.0)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(torch.nn.Module):
    def __init__(self, n_embd, bias=True):
        super().__init__()
        self.c_fc = torch.nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = torch.nn.GELU()
        self.c_proj = torch.nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = torch.nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(torch.nn.Module):
    def __init__(self, n_embd, n_head, bias=True):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(torch.nn.Module):
    def __init__(self, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True):
        super().__init__()
        self.transformer = torch.nn.ModuleDict(dict(
            wte=torch.nn.Embedding(vocab_size, n_embd), wpe=torch.nn.Embedding(block_size, n_embd),
            drop=torch.nn.Dropout(0.0), h=torch.nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias=bias)))
        self.lm_head = torch.nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# ---------------------------------------------------------------- the GPT port (nnx), for HF GPT-2 and nanoGPT

@dataclass(frozen=True)
class Port:
    """How a port is written: what its author chose (and where a pitfall plants itself)."""

    gelu_approximate: bool = True  # jax.nn.gelu's default: tanh
    causal: bool = True
    prescale_queries: bool = False  # q / sqrt(d) before nnx.dot_product_attention, which scales again
    epsilon: float = 1e-5


class NnxAttention(nnx.Module):
    def __init__(self, e, heads, port: Port, rngs):
        self.c_attn = nnx.Linear(e, 3 * e, rngs=rngs)
        self.c_proj = nnx.Linear(e, e, rngs=rngs)
        self.heads, self.port = heads, port

    def __call__(self, x):
        b, t, e = x.shape
        q, k, v = (a.reshape(b, t, self.heads, e // self.heads) for a in jnp.split(self.c_attn(x), 3, -1))
        if self.port.prescale_queries:
            q = q / math.sqrt(e // self.heads)
        mask = nnx.make_causal_mask(jnp.ones((b, t))) if self.port.causal else None
        return self.c_proj(nnx.dot_product_attention(q, k, v, mask=mask).reshape(b, t, e))


class NnxMLP(nnx.Module):
    def __init__(self, e, port: Port, rngs):
        self.c_fc = nnx.Linear(e, 4 * e, rngs=rngs)
        self.c_proj = nnx.Linear(4 * e, e, rngs=rngs)
        self.port = port

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=self.port.gelu_approximate))


class NnxBlock(nnx.Module):
    def __init__(self, e, heads, port: Port, rngs):
        self.ln_1 = nnx.LayerNorm(e, epsilon=port.epsilon, rngs=rngs)
        self.attn = NnxAttention(e, heads, port, rngs)
        self.ln_2 = nnx.LayerNorm(e, epsilon=port.epsilon, rngs=rngs)
        self.mlp = NnxMLP(e, port, rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NnxTrunk(nnx.Module):
    def __init__(self, vocab, length, layers, heads, e, port: Port, rngs):
        self.wte = nnx.Embed(vocab, e, rngs=rngs)
        self.wpe = nnx.Embed(length, e, rngs=rngs)
        self.h = nnx.List([NnxBlock(e, heads, port, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(e, epsilon=port.epsilon, rngs=rngs)


class NnxGPT(nnx.Module):
    """GPT-2's architecture: returns the logits (the tied head is the embedding's attend)."""

    def __init__(self, vocab=64, length=16, layers=2, heads=2, e=16, port: Port = Port(), rngs=None):
        self.transformer = NnxTrunk(vocab, length, layers, heads, e, port, rngs or nnx.Rngs(0))

    def __call__(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(jnp.arange(idx.shape[1]))[None]
        for block in t.h:
            x = block(x)
        return t.wte.attend(t.ln_f(x))


# ---------------------------------------------------------------- ViT port (nnx)

class NnxViTAttention(nnx.Module):
    def __init__(self, e, heads, port: Port, rngs):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nnx.Linear(e, e, rngs=rngs) for _ in range(4))
        self.heads, self.port = heads, port

    def __call__(self, x):
        b, t, e = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, e // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.port.prescale_queries:
            q = q / math.sqrt(e // self.heads)
        return self.o_proj(nnx.dot_product_attention(q, k, v).reshape(b, t, e))


class NnxViTMLP(nnx.Module):
    def __init__(self, e, hidden, port: Port, rngs):
        self.fc1, self.fc2, self.port = nnx.Linear(e, hidden, rngs=rngs), nnx.Linear(hidden, e, rngs=rngs), port

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.port.gelu_approximate))


class NnxViTLayer(nnx.Module):
    def __init__(self, e, heads, hidden, port: Port, rngs):
        self.attention = NnxViTAttention(e, heads, port, rngs)
        self.layernorm_before = nnx.LayerNorm(e, epsilon=port.epsilon, rngs=rngs)
        self.layernorm_after = nnx.LayerNorm(e, epsilon=port.epsilon, rngs=rngs)
        self.mlp = NnxViTMLP(e, hidden, port, rngs)

    def __call__(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x))


class NnxPatches(nnx.Module):
    def __init__(self, channels, e, patch, rngs):
        self.projection = nnx.Conv(channels, e, (patch, patch), strides=patch, padding="VALID", rngs=rngs)

    def __call__(self, x):
        y = self.projection(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class NnxViTEmbeddings(nnx.Module):
    def __init__(self, channels, e, patch, tokens, rngs):
        self.patch_embeddings = NnxPatches(channels, e, patch, rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, e)))
        self.position_embeddings = nnx.Param(jnp.zeros((1, tokens, e)))

    def __call__(self, x):
        y = self.patch_embeddings(x)
        cls = jnp.broadcast_to(self.cls_token[...], (y.shape[0], 1, y.shape[-1]))
        return jnp.concatenate([cls, y], 1) + self.position_embeddings[...]


class NnxViTModel(nnx.Module):
    def __init__(self, channels, e, patch, tokens, layers, heads, hidden, port, rngs):
        self.embeddings = NnxViTEmbeddings(channels, e, patch, tokens, rngs)
        self.layers = nnx.List([NnxViTLayer(e, heads, hidden, port, rngs) for _ in range(layers)])
        self.layernorm = nnx.LayerNorm(e, epsilon=port.epsilon, rngs=rngs)

    def __call__(self, x):
        x = self.embeddings(x)
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x)


class NnxViT(nnx.Module):
    def __init__(self, size=8, patch=4, channels=3, e=16, layers=1, heads=2, hidden=32, classes=5,
                 port: Port = Port(gelu_approximate=False, epsilon=1e-12), rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.vit = NnxViTModel(channels, e, patch, (size // patch) ** 2 + 1, layers, heads, hidden, port, rngs)
        self.classifier = nnx.Linear(e, classes, rngs=rngs)

    def __call__(self, x):
        return self.classifier(self.vit(x)[:, 0])


# ---------------------------------------------------------------- ResNet port (linen, flaxmodels-style)

class ConvLayer(linen.Module):
    features: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True
    momentum: float = 0.9  # linen's convention: the weight of the old statistics
    train: bool = True

    @linen.compact
    def __call__(self, x):
        p = self.kernel // 2
        x = linen.Conv(self.features, (self.kernel,) * 2, strides=self.stride, padding=[(p, p)] * 2,
                       use_bias=False, name="convolution")(x)
        x = linen.BatchNorm(use_running_average=not self.train, momentum=self.momentum, epsilon=1e-5,
                            name="normalization")(x)
        return linen.relu(x) if self.relu else x


class BasicLayer(linen.Module):
    features: int
    stride: int = 1
    project: bool = False  # a 1x1 conv + BN on the shortcut
    momentum: float = 0.9

    def setup(self):
        if self.project:
            self.shortcut = ConvLayer(self.features, 1, self.stride, relu=False, momentum=self.momentum)
        self.layer = [ConvLayer(self.features, 3, self.stride, momentum=self.momentum),
                      ConvLayer(self.features, 3, 1, relu=False, momentum=self.momentum)]

    def __call__(self, x):
        residual = self.shortcut(x) if self.project else x
        y = x
        for conv in self.layer:
            y = conv(y)
        return linen.relu(y + residual)


class LinenResNet(linen.Module):
    """HF ResNet (basic layers) in linen, as a flaxmodels-style port writes it."""

    embedding: int = 8
    hidden: tuple = (8, 16)
    classes: int = 5
    momentum: float = 0.9

    def setup(self):
        self.embedder = ConvLayer(self.embedding, 7, 2, momentum=self.momentum)
        stages, width = [], self.embedding
        for i, features in enumerate(self.hidden):
            stride = 1 if i == 0 else 2
            stages.append(BasicLayer(features, stride, project=width != features or stride != 1,
                                     momentum=self.momentum))
            width = features
        self.stages = stages
        self.classifier = linen.Dense(self.classes)

    def __call__(self, x):
        x = self.embedder(x)
        x = linen.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x.mean((1, 2)))


# ---------------------------------------------------------------- layer tables

def _replace_params(layers, owner_kind: Callable[[str], dict | None]):
    """Bare-parameter layers of modules the converter does not know, renamed to the port's leaves:
    ``owner_kind(owner)`` returns {torch key: Flax leaf name} for that owner, or None to keep it."""
    out = []
    for layer in layers:
        owner, _, key = layer.torch_name.rpartition(".")
        rename = owner_kind(owner) if layer.kind == "param" else None
        if rename and key in rename:
            layer = dataclasses.replace(layer, flax_path=(*layer.flax_path[:-1], rename[key]))
        out.append(layer)
    return out


def hf_gpt2_layers(model, transpose_conv1d: str | None = None):
    """HF's Conv1D weight is stored (in, out): it *is* the Flax kernel (a bare param renamed to kernel).
    ``transpose_conv1d``: the pitfall, that Conv1D converted as a torch Linear (transposed)."""
    modules = dict(model.named_modules())
    conv1d = lambda owner: ({"weight": "kernel", "bias": "bias"}  # noqa: E731
                            if type(modules.get(owner)).__name__ == "Conv1D" else None)
    layers = _replace_params(convert.layers_of(model), conv1d)
    if transpose_conv1d:
        layers = [layer for layer in layers if not layer.torch_name.startswith(f"{transpose_conv1d}.")]
        layers.append(convert.Layer(transpose_conv1d, "linear", default_flax_path(transpose_conv1d)))
    return layers


def nanogpt_layers(model):
    """nanoGPT's own LayerNorm class holds weight/bias as bare params: nnx.LayerNorm's scale/bias."""
    modules = dict(model.named_modules())
    norm = lambda owner: ({"weight": "scale", "bias": "bias"}  # noqa: E731
                          if isinstance(modules.get(owner), LayerNorm) else None)
    return _replace_params(convert.layers_of(model), norm)


def linen_paths(layers):
    """linen names a list element ``stages_0`` where torch says ``stages.0``: join a digit to the name before."""
    def path(name):
        parts = name.split(".")
        out = []
        for part in parts:
            if part.isdigit() and out:
                out[-1] = f"{out[-1]}_{part}"
            else:
                out.append(part)
        return tuple(out)
    return [dataclasses.replace(layer, flax_path=path(layer.torch_name)) for layer in layers]


def hf_resnet_layers(model):
    """The linen port leaves out HF's wrapper levels (resnet., encoder., a stage's only layers.0) and names
    list elements linen's way (stages_0, layer_1)."""
    def torch_to_port(name):
        name = name.removeprefix("resnet.").replace("encoder.", "").replace(".layers.0", "")
        return name.replace("embedder.embedder", "embedder").replace("classifier.1", "classifier")
    layers = linen_paths(convert.layers_of(model))
    return [dataclasses.replace(layer, flax_path=linen_paths([dataclasses.replace(
        layer, torch_name=torch_to_port(layer.torch_name))])[0].flax_path) for layer in layers]


# ---------------------------------------------------------------- the cases

def _tokens(batch, length, vocab):
    def make(seed=0):
        rng = np.random.default_rng(seed)
        return rng.integers(0, vocab, (batch, length)), rng.integers(0, vocab, (batch, length))
    return make


def _images(shape, classes):
    def make(seed=0):
        rng = np.random.default_rng(seed)
        return rng.standard_normal(shape).astype(np.float32), rng.integers(0, classes, shape[0])
    return make


@dataclass
class Case:
    torch_model: torch.nn.Module
    flax_model: Any
    layers: list
    batch: Callable[[int], tuple]
    options: dict = field(default_factory=dict)

    def batches(self, seed=0):
        while True:
            yield self.batch(seed)
            seed += 1


# Weights drawn wider than the models' init (std 0.02), as training leaves them: pre-activations of order
# 1, where the GELU variants differ by up to 1e-3 (at init they are ~0.1, where they agree to 1e-7).
SPREAD = 0.3


def _spread(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, SPREAD)
    return model


def hf_gpt2(pitfall=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  initializer_range=SPREAD)
    model = transformers.GPT2LMHeadModel(cfg).train()
    port = {"gelu": Port(gelu_approximate=False), "causal_mask": Port(causal=False),
            "attention_scale": Port(prescale_queries=True), "epsilon": Port(epsilon=1e-6)}.get(pitfall, Port())
    layers = hf_gpt2_layers(model, "transformer.h.0.attn.c_proj" if pitfall == "layout" else None)
    return Case(model, NnxGPT(port=port), layers, _tokens(4, 8, 64))


def nanogpt(pitfall=None, seed=0):
    torch.manual_seed(seed)
    model = _spread(GPT())
    exact = Port(gelu_approximate=False)
    port = {"gelu": Port(gelu_approximate=True), "causal_mask": dataclasses.replace(exact, causal=False),
            "attention_scale": dataclasses.replace(exact, prescale_queries=True),
            "epsilon": dataclasses.replace(exact, epsilon=1e-6)}.get(pitfall, exact)
    return Case(model, NnxGPT(port=port), nanogpt_layers(model), _tokens(4, 8, 64))


def hf_vit(pitfall=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=5,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = _spread(transformers.ViTForImageClassification(cfg))
    with torch.no_grad():  # HF's init leaves the class token and positions tiny
        model.vit.embeddings.cls_token.normal_(0, SPREAD)
        model.vit.embeddings.position_embeddings.normal_(0, SPREAD)
    right = Port(gelu_approximate=False, epsilon=1e-12)
    port = {"gelu": dataclasses.replace(right, gelu_approximate=True),
            "attention_scale": dataclasses.replace(right, prescale_queries=True),
            "epsilon": dataclasses.replace(right, epsilon=1e-6)}.get(pitfall, right)
    return Case(model, NnxViT(port=port), convert.layers_of(model), _images((4, 3, 8, 8), 5))


def hf_resnet(pitfall=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=5)
    model = transformers.ResNetForImageClassification(cfg).train()
    momentum = 0.1 if pitfall == "momentum" else 0.9  # flaxmodels passes torch's 0.1 to linen's BatchNorm
    module = LinenResNet(momentum=momentum)
    flax_model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(flax_model, jnp.zeros((1, 16, 16, 3)))
    # linen's BatchNorm stores the biased batch variance (torch the unbiased): the running var is off by
    # 0.1 x var / (n - 1) after a step, up to 1/(n - 1) = 3.2% of its scale at n = 32 values per channel
    # (stage 1: batch 8 x 2 x 2; measured 0.73-1.1%); momentum of the other convention moves the running
    # mean by 8x its scale.
    return Case(model, flax_model, hf_resnet_layers(model), _images((8, 3, 16, 16), 5), {"stats_tol": 5e-2})


MODELS = {"hf_gpt2": hf_gpt2, "nanogpt": nanogpt, "hf_vit": hf_vit, "hf_resnet_linen": hf_resnet}
# model -> the pitfalls a port of it can plant, with the torch module the locator must name
PITFALLS = {
    "hf_gpt2": {"gelu": "transformer.h.0.mlp", "causal_mask": "transformer.h.0.attn",
                "attention_scale": "transformer.h.0.attn", "epsilon": "transformer.h.0.ln_1",
                "layout": "transformer.h.0.attn.c_proj"},
    "nanogpt": {"gelu": "transformer.h.0.mlp", "causal_mask": "transformer.h.0.attn",
                "attention_scale": "transformer.h.0.attn", "epsilon": "transformer.h.0.ln_1"},
    # (ViT's eps=1e-12 against nnx's default 1e-6 moves a LayerNorm of unit-variance inputs by 5e-7 relative:
    # inside the rounding band, and harmless; so ViT plants no epsilon)
    "hf_vit": {"gelu": "vit.layers.0.mlp", "attention_scale": "vit.layers.0.attention"},
    "hf_resnet_linen": {"momentum": "resnet.embedder.embedder.normalization"},
}


def case(model: str, pitfall: str | None = None, seed: int = 0) -> Case:
    return MODELS[model](pitfall, seed)
