from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crosscheck.convert.trees import Path


class ConversionError(ValueError):
    """A missing, extra or mis-shaped entry; the message names it."""


@dataclass(frozen=True)
class Layer:
    """One torch module (or bare parameter/buffer) and where its arrays live in Flax.

    ``torch_name`` is the module's prefix in the ``state_dict`` (``"features.0"``),
    ``kind`` one of :data:`KINDS`, ``flax_path`` the module's path in the Flax
    tree, and ``flatten_from`` the (C, *spatial) shape a Linear's input had
    before torch's channels-first flatten.  ``transpose_kernel`` says which
    Flax convention a ``conv_transpose`` port uses (``nnx.ConvTranspose(transpose_kernel=...)``),
    ``num_heads`` splits a ``mha`` layer's packed projections, ``keys`` lists
    the torch keys the module has (empty: every key of its kind, bias optional)
    and ``tied`` pairs a key with the torch key of the tensor it shares
    (an output projection tied to the embedding has no Flax leaf of its own).
    A ``buffer`` registered with ``persistent=False`` is in no ``state_dict``:
    ``persistent`` says so, and ``value`` reads it from the module's buffers
    (it converts to Flax when the port holds it, and never back into a ``state_dict``).
    """

    torch_name: str
    kind: str
    flax_path: Path
    flatten_from: tuple[int, ...] | None = None
    transpose_kernel: bool = False
    num_heads: int | None = None
    keys: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    persistent: bool = True
    value: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConversionError(f"layer {self.torch_name!r}: unknown kind {self.kind!r}; choose from {sorted(KINDS)}")
        if self.flatten_from is not None and self.kind != "linear":
            raise ConversionError(f"layer {self.torch_name!r}: flatten_from applies to a linear layer, "
                                  f"not {self.kind!r}")
        if self.kind == "mha" and not (isinstance(self.num_heads, int) and self.num_heads > 0):
            raise ConversionError(f"layer {self.torch_name!r}: a mha layer needs num_heads > 0, got {self.num_heads!r}")
        if self.kind in ("lstm", "gru") and not self.keys:
            raise ConversionError(f"layer {self.torch_name!r}: a {self.kind} layer needs its keys "
                                  "(weight_ih_l0, ...); build the table with layers_of")


# kind -> {torch key: (flax collection, flax leaf or leaves)}; "" is a bare parameter or buffer,
# whose Flax leaf is the layer's path itself.  lstm/gru keep torch's names and layouts
# (crosscheck.flax_layers.LSTM/GRU), their keys come from the module.
KINDS: dict[str, dict[str, tuple[str, Any]]] = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "conv_transpose": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "linear": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "linear_in_out": {"weight": ("params", "kernel"), "bias": ("params", "bias")},  # HF Conv1D: (in, out) already
    "batchnorm": {"weight": ("params", "scale"), "bias": ("params", "bias"),
                  "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
                  "num_batches_tracked": ("batch_stats", "num_batches_tracked")},
    "layernorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "groupnorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "rmsnorm": {"weight": ("params", "scale")},
    "embedding": {"weight": ("params", "embedding")},
    "mha": {"in_proj_weight": ("params", (("query", "kernel"), ("key", "kernel"), ("value", "kernel"))),
            "in_proj_bias": ("params", (("query", "bias"), ("key", "bias"), ("value", "bias"))),
            "out_proj.weight": ("params", "out/kernel"), "out_proj.bias": ("params", "out/bias")},
    "lstm": {}, "gru": {},
    "param": {"": ("params", None)},
    "buffer": {"": ("buffers", None)},
}


# Keys a layer may lack on the torch side (bias=False, affine=False) without naming them in Layer.keys,
# and on the Flax side (nnx.BatchNorm has no counter; crosscheck.flax_layers.BatchNorm has).
OPTIONAL = {"bias", "in_proj_bias", "out_proj.bias", "num_batches_tracked"}


FLAX_OPTIONAL = {"num_batches_tracked"}


@dataclass(frozen=True)
class Entry:
    torch_key: str
    layer: Layer
    key: str  # within the layer ("weight", "in_proj_weight"; "" for a bare parameter or buffer)
    flax_keys: tuple[Path, ...]  # (collection, *path, leaf), one per Flax leaf
    optional: bool  # may be missing on the torch side
    flax_optional: bool  # may be missing on the Flax side

    @property
    def param(self) -> bool:
        return self.flax_keys[0][0] == "params"


def layer_entries(layers: Iterable[Layer]) -> list[Entry]:
    """Every convertible array of the table (tied keys excluded: they have no leaf of their own)."""
    out = []
    for layer in layers:
        table = KINDS[layer.kind]
        if layer.kind in ("lstm", "gru"):
            table = {key: ("params", key) for key in layer.keys}
        tied = dict(layer.tied)
        for key, (collection, leaf) in table.items():
            if key in tied or (layer.keys and key not in layer.keys):
                continue
            leaves = [()] if leaf is None else [tuple(leaf.split("/"))] if isinstance(leaf, str) else list(leaf)
            out.append(Entry(f"{layer.torch_name}.{key}" if key else layer.torch_name, layer, key,
                              tuple((collection, *layer.flax_path, *part) for part in leaves),
                              optional=(key in OPTIONAL and not layer.keys) or not layer.persistent,
                              flax_optional=key in FLAX_OPTIONAL or not layer.persistent))
    return out


def tied_keys(layers: Iterable[Layer]) -> list[tuple[str, str]]:
    return [(f"{layer.torch_name}.{key}", source) for layer in layers for key, source in layer.tied]


_MODULE_KINDS = (
    ((torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d), "conv"),
    ((torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d), "conv_transpose"),
    ((torch.nn.Linear,), "linear"),
    ((torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d), "batchnorm"),
    ((torch.nn.LayerNorm,), "layernorm"),
    ((torch.nn.GroupNorm,), "groupnorm"),
    ((torch.nn.RMSNorm,), "rmsnorm"),
    ((torch.nn.Embedding,), "embedding"),
    ((torch.nn.MultiheadAttention,), "mha"),
    ((torch.nn.LSTM,), "lstm"),
    ((torch.nn.GRU,), "gru"),
)


def module_kind(module: torch.nn.Module) -> str | None:
    """The kind of a torch module the converter knows (None: a module of the model's own)."""
    if _is_hf_conv1d(module):
        return "linear_in_out"
    return next((k for types, k in _MODULE_KINDS if isinstance(module, types)), None)


def default_flax_path(torch_name: str) -> Path:
    # nnx keeps list/Sequential children under integer keys, as torch's "0", "1".
    return tuple(int(part) if part.isdigit() else part for part in torch_name.split(".") if part != "")


def parse_path(path: Path | str) -> Path:
    """``"layers/0"`` -> ``("layers", 0)``: a string path splits at ``/``, and its digits are list indices."""
    if isinstance(path, str):
        return tuple(int(p) if p.isdigit() else p for p in path.split("/") if p != "")
    return tuple(path)


def _is_hf_conv1d(module: torch.nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out), ``x @ weight + bias``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2
            and weight.shape[1] == getattr(module, "nf", None))


def _refusal(name: str, module: torch.nn.Module, kind: str) -> str | None:
    """Why a module of a known kind still cannot be converted faithfully (None: it can)."""
    if kind == "conv_transpose" and module.groups != 1:
        return f"groups={module.groups} (Flax's ConvTranspose has no feature groups)"
    if kind == "conv" and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (Flax pads with zeros or 'CIRCULAR' of its own)"
    if kind == "mha":
        if not module._qkv_same_embed_dim:
            return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
        if module.bias_k is not None:
            return "add_bias_kv=True (nnx.MultiHeadAttention has no extra key/value bias rows)"
    if kind in ("lstm", "gru") and getattr(module, "proj_size", 0):
        return f"proj_size={module.proj_size}"
    return None


def read_layers(model: torch.nn.Module, *, rename: Mapping[str, Path | str] | None = None,
                flatten_from: Mapping[str, Sequence[int]] | None = None,
                transpose_kernel: bool | Mapping[str, bool] = False) -> list[Layer]:
    """The layer table of a torch model, read from its modules alone (``convert.layers_of`` also reads the port).

    By default a module's Flax path is its torch name split at dots (what an
    nnx port with the same attribute names has); ``rename`` maps torch names,
    or prefixes of them, to other paths (``"fc1" -> "Dense_0"``, ``"transformer" -> ""``,
    ``"downsample" -> "downsample/layers"``; a string path splits at ``/``, digits are indices).
    ``transpose_kernel`` (one bool, or by torch name) is the convention of the
    port's ``ConvTranspose`` layers.  Bare ``nn.Parameter`` and persistent
    buffers of any module become ``param``/``buffer`` layers at their own
    path (on the model's own classes: a torch.nn layer of another kind is
    refused, not copied); a weight shared with an earlier parameter (tied) is recorded on its
    layer and has no Flax leaf of its own.  A module holding parameters of a
    kind not in the table, or a known kind in a configuration the converter
    cannot reproduce, raises.
    """
    rename = {k.rstrip("."): v for k, v in (rename or {}).items()}
    used: set[str] = set()
    flatten_from = {k: tuple(v) for k, v in (flatten_from or {}).items()}
    kernels = dict(transpose_kernel) if isinstance(transpose_kernel, Mapping) else {}
    first_name: dict[int, str] = {}  # id(tensor) -> the first torch name holding it
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    layers = []
    covered: set[str] = set()  # module names whose whole subtree one layer converts

    def path_of(name: str) -> Path:
        # the longest renamed prefix (a whole name, or a module above it) wins
        parts = name.split(".")
        for cut in range(len(parts), -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in rename:
                used.add(prefix)
                return (*parse_path(rename[prefix]), *default_flax_path(".".join(parts[cut:])))
        return default_flax_path(name)

    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(f"{c}.") for c in covered):
            continue
        prefix = f"{name}." if name else ""
        own = dict(module.named_parameters(recurse=False, remove_duplicate=False))
        buffers = dict(module.named_buffers(recurse=False))
        kind = module_kind(module)
        if kind is not None:
            why = _refusal(name, module, kind)
            if why:
                raise ConversionError(f"module {name!r} ({type(module).__name__}): {why} is not supported; "
                                      "pass your own Layer table with a Flax module of your own")
            covered.add(name)
            state = module.state_dict()
            tied = tuple((key, first_name[id(p)]) for key, p in module.named_parameters(remove_duplicate=False)
                         if first_name[id(p)] != f"{prefix}{key}")
            layers.append(Layer(name, kind, path_of(name), flatten_from.pop(name, None),
                                transpose_kernel=kernels.pop(name, transpose_kernel is True) if kind == "conv_transpose"
                                else False,
                                num_heads=module.num_heads if kind == "mha" else None,
                                keys=tuple(k for k in state if state[k] is not None), tied=tied))
            continue
        persistent = {n for n in buffers if n not in module._non_persistent_buffers_set}
        if (own or persistent) and type(module).__module__.startswith("torch."):
            raise ConversionError(f"module {name!r} ({type(module).__name__}) holds parameters {sorted(own)} or "
                                  f"buffers {sorted(buffers)} of a kind the converter does not know; pass your own "
                                  "Layer table")
        for key, p in own.items():
            full = f"{prefix}{key}"
            if first_name[id(p)] != full:
                raise ConversionError(f"parameter {full!r} is tied to {first_name[id(p)]!r} outside a known layer; "
                                      "pass your own Layer table")
            layers.append(Layer(full, "param", path_of(full)))
        for key in buffers:
            if buffers[key] is not None and (key in persistent or not type(module).__module__.startswith("torch.")):
                layers.append(Layer(f"{prefix}{key}", "buffer", path_of(f"{prefix}{key}"), persistent=key in persistent,
                                    value=None if key in persistent else
                                    (lambda module=module, key=key: module.get_buffer(key))))
    rename = {k: v for k, v in rename.items() if k not in used}
    for unused, what in ((rename, "rename"), (flatten_from, "flatten_from"), (kernels, "transpose_kernel")):
        if unused:
            raise ConversionError(f"{what} names modules the model does not have: {sorted(unused)}")
    return layers


def _heads(layer: Layer, embed: int) -> tuple[int, int]:
    if embed % layer.num_heads:
        raise ConversionError(f"{layer.torch_name}: embed_dim {embed} is not a multiple of num_heads={layer.num_heads}")
    return layer.num_heads, embed // layer.num_heads


def array_to_flax(layer: Layer, key: str, x: np.ndarray) -> list[np.ndarray]:
    """The Flax leaves (one, or q/k/v for a packed projection) of one torch array."""
    if layer.kind == "mha":
        if key.startswith("in_proj"):
            heads, dim = _heads(layer, x.shape[-1] if key == "in_proj_weight" else x.shape[0] // 3)
            return [(part.T.reshape(-1, heads, dim) if part.ndim == 2 else part.reshape(heads, dim))
                    for part in np.split(x, 3, axis=0)]
        if key == "out_proj.weight":
            heads, dim = _heads(layer, x.shape[1])
            return [x.T.reshape(heads, dim, x.shape[0])]
        return [x]
    if key != "weight" or layer.kind not in ("conv", "conv_transpose", "linear"):
        return [x]
    spatial = tuple(range(2, x.ndim))
    if layer.kind == "conv":
        return [np.transpose(x, (*spatial, 1, 0))]
    if layer.kind == "conv_transpose":
        # torch's transposed conv is the gradient of a conv with weight (I, O, *K): lax.conv_transpose
        # takes it spatially flipped as (*K, I, O), or with transpose_kernel=True unflipped as (*K, O, I).
        if layer.transpose_kernel:
            return [np.transpose(x, (*spatial, 1, 0))]
        return [np.ascontiguousarray(np.flip(np.transpose(x, (*spatial, 0, 1)), tuple(range(x.ndim - 2))))]
    if layer.flatten_from is None:
        return [x.T]
    out = x.shape[0]
    x = x.reshape(out, *layer.flatten_from)
    return [np.transpose(x, (*range(2, x.ndim), 1, 0)).reshape(-1, out)]


def array_to_torch(layer: Layer, key: str, xs: Sequence[np.ndarray]) -> np.ndarray:
    """The inverse of :func:`array_to_flax`."""
    if layer.kind == "mha":
        if key.startswith("in_proj"):
            return np.concatenate([(x.reshape(x.shape[0], -1).T if x.ndim == 3 else x.reshape(-1)) for x in xs])
        if key == "out_proj.weight":
            return xs[0].reshape(-1, xs[0].shape[-1]).T
        return xs[0]
    x = xs[0]
    if key != "weight" or layer.kind not in ("conv", "conv_transpose", "linear"):
        return x
    back = (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))
    if layer.kind == "conv" or (layer.kind == "conv_transpose" and layer.transpose_kernel):
        return np.transpose(x, back)
    if layer.kind == "conv_transpose":
        return np.ascontiguousarray(np.transpose(np.flip(x, tuple(range(x.ndim - 2))),
                                                 (x.ndim - 2, x.ndim - 1, *range(x.ndim - 2))))
    if layer.flatten_from is None:
        return x.T
    out, (channels, *spatial) = x.shape[-1], layer.flatten_from
    x = x.reshape(*spatial, channels, out)
    return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))).reshape(out, -1)


def expected_torch_shape(layer: Layer, key: str, shape: tuple[int, ...]) -> None:
    """Raise when a torch array cannot be the ``key`` of ``layer``."""
    if key == "in_proj_weight" and (len(shape) != 2 or shape[0] != 3 * shape[1]):
        raise ConversionError(f"{layer.torch_name}.in_proj_weight has shape {tuple(shape)}, not a packed "
                              "(3 * embed_dim, embed_dim) projection")
    if key != "weight":
        return
    ndim = {"conv": (3, 4, 5), "conv_transpose": (3, 4, 5), "linear": (2,), "linear_in_out": (2,),
            "embedding": (2,)}.get(layer.kind)
    bad = ndim is not None and len(shape) not in ndim
    if not bad and layer.flatten_from is not None:
        bad = shape[1] != int(np.prod(layer.flatten_from))
    if bad:
        want = f"in_features = prod{layer.flatten_from}" if layer.flatten_from and ndim else f"{ndim}-d"
        raise ConversionError(f"{layer.torch_name}.weight has shape {tuple(shape)}, not a {layer.kind} weight "
                              f"({want})")


def conv_transpose_padding(module: torch.nn.Module) -> list[tuple[int, int]]:
    """The explicit ``padding=`` of ``nnx.ConvTranspose`` that computes what ``module`` (a torch ConvTranspose) does.

    torch's ``padding`` p crops the full transposed convolution, ``output_padding``
    extends one side; ``lax.conv_transpose`` pads the dilated input instead:
    (d * (k - 1) - p, d * (k - 1) - p + output_padding) per spatial dimension.
    """
    dims = len(module.kernel_size)
    if isinstance(module.padding, str):
        raise ConversionError(f"padding={module.padding!r} of {type(module).__name__} is not supported")
    return [(d * (k - 1) - p, d * (k - 1) - p + op) for k, p, op, d in
            zip(module.kernel_size, module.padding, module.output_padding, module.dilation)][:dims]
