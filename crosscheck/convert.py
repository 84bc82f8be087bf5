"""Model weights and AdamW state between a torch ``state_dict`` and Flax.

Flax keeps a layer's arrays in channels-last layouts; torch keeps them
channels-first.  Every conversion here is a pure permutation of elements
(transposes and reshapes, never arithmetic), so round trips are exact:

============  =============================  ==================================
torch layer   torch key (layout)             Flax leaf (collection, layout)
============  =============================  ==================================
Conv{1,2,3}d  weight (O, I, *K), bias        kernel (*K, I, O), bias   (params)
Linear        weight (out, in), bias         kernel (in, out), bias    (params)
BatchNorm     weight, bias                   scale, bias               (params)
              running_mean, running_var      mean, var            (batch_stats)
LayerNorm,    weight, bias                   scale, bias               (params)
GroupNorm
Embedding     weight (num, features)         embedding (num, features) (params)
============  =============================  ==================================

A Linear fed by torch's NCHW flatten (``x.view(-1, C*H*W)`` after a conv
stack) sees its inputs in (C, H, W) order, while the Flax port flattens NHWC
in (H, W, C) order: give that layer ``flatten_from=(C, H, W)`` and its kernel
rows are permuted to match (without it the port's outputs are simply wrong).

BatchNorm's ``num_batches_tracked`` has no Flax counterpart; converting back,
it is taken from ``reference`` (the target's current ``state_dict()``) or set to 0.

The AdamW state converts with the same layouts: ``exp_avg``, ``exp_avg_sq`` and
``max_exp_avg_sq`` of a parameter move exactly as its weight does; torch's
per-parameter float32 ``step`` becomes ``jax_impl.AdamWState.count``; torch's
parameter indices (the optimizer's order) become pytree paths.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

import jax_impl
from crosscheck.implementations import DTYPES, to_torch
from crosscheck.metrics import as_numpy

Path = tuple[str | int, ...]


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
    """

    torch_name: str
    kind: str
    flax_path: Path
    flatten_from: tuple[int, ...] | None = None
    transpose_kernel: bool = False
    num_heads: int | None = None
    keys: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()

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
_OPTIONAL = {"bias", "in_proj_bias", "out_proj.bias", "num_batches_tracked"}
_FLAX_OPTIONAL = {"num_batches_tracked"}

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


def _default_flax_path(torch_name: str) -> Path:
    # nnx keeps list/Sequential children under integer keys, as torch's "0", "1".
    return tuple(int(part) if part.isdigit() else part for part in torch_name.split("."))


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


def layers_of(model: torch.nn.Module, *, rename: Mapping[str, Path | str] | None = None,
              flatten_from: Mapping[str, Sequence[int]] | None = None,
              transpose_kernel: bool | Mapping[str, bool] = False) -> list[Layer]:
    """The layer table of a torch model, read from its modules.

    By default a module's Flax path is its torch name split at dots (what an
    nnx port with the same attribute names has); ``rename`` maps torch names
    to other paths (``"fc1" -> "Dense_0"`` for linen's automatic names).
    ``transpose_kernel`` (one bool, or by torch name) is the convention of the
    port's ``ConvTranspose`` layers.  Bare ``nn.Parameter`` and persistent
    buffers of any module become ``param``/``buffer`` layers at their own
    path (on the model's own classes: a torch.nn layer of another kind is
    refused, not copied); a weight shared with an earlier parameter (tied) is recorded on its
    layer and has no Flax leaf of its own.  A module holding parameters of a
    kind not in the table, or a known kind in a configuration the converter
    cannot reproduce, raises.
    """
    rename = dict(rename or {})
    flatten_from = {k: tuple(v) for k, v in (flatten_from or {}).items()}
    kernels = dict(transpose_kernel) if isinstance(transpose_kernel, Mapping) else {}
    first_name: dict[int, str] = {}  # id(tensor) -> the first torch name holding it
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    layers = []
    covered: set[str] = set()  # module names whose whole subtree one layer converts

    def path_of(name: str) -> Path:
        path = rename.pop(name, None)
        return _default_flax_path(name) if path is None else (tuple(path.split("/")) if isinstance(path, str)
                                                              else tuple(path))

    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(f"{c}.") for c in covered):
            continue
        prefix = f"{name}." if name else ""
        own = dict(module.named_parameters(recurse=False, remove_duplicate=False))
        buffers = {n: b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set}
        kind = next((k for types, k in _MODULE_KINDS if isinstance(module, types)), None)
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
        if (own or buffers) and type(module).__module__.startswith("torch."):
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
            if buffers[key] is not None:
                layers.append(Layer(f"{prefix}{key}", "buffer", path_of(f"{prefix}{key}")))
    for unused, what in ((rename, "rename"), (flatten_from, "flatten_from"), (kernels, "transpose_kernel")):
        if unused:
            raise ConversionError(f"{what} names modules the model does not have: {sorted(unused)}")
    return layers


# Layout transforms, torch -> Flax and back.  Pure permutations: exact.

def _heads(layer: Layer, embed: int) -> tuple[int, int]:
    if embed % layer.num_heads:
        raise ConversionError(f"{layer.torch_name}: embed_dim {embed} is not a multiple of num_heads={layer.num_heads}")
    return layer.num_heads, embed // layer.num_heads


def _array_to_flax(layer: Layer, key: str, x: np.ndarray) -> list[np.ndarray]:
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


def _array_to_torch(layer: Layer, key: str, xs: Sequence[np.ndarray]) -> np.ndarray:
    """The inverse of :func:`_array_to_flax`."""
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


def _expected_torch_shape(layer: Layer, key: str, shape: tuple[int, ...]) -> None:
    """Raise when a torch array cannot be the ``key`` of ``layer``."""
    if key == "in_proj_weight" and (len(shape) != 2 or shape[0] != 3 * shape[1]):
        raise ConversionError(f"{layer.torch_name}.in_proj_weight has shape {tuple(shape)}, not a packed "
                              "(3 * embed_dim, embed_dim) projection")
    if key != "weight":
        return
    ndim = {"conv": (3, 4, 5), "conv_transpose": (3, 4, 5), "linear": (2,), "embedding": (2,)}.get(layer.kind)
    bad = ndim is not None and len(shape) not in ndim
    if not bad and layer.flatten_from is not None:
        bad = shape[1] != int(np.prod(layer.flatten_from))
    if bad:
        want = f"in_features = prod{layer.flatten_from}" if layer.flatten_from and ndim else f"{ndim}-d"
        raise ConversionError(f"{layer.torch_name}.weight has shape {tuple(shape)}, not a {layer.kind} weight "
                              f"({want})")


@dataclass(frozen=True)
class _Entry:
    torch_key: str
    layer: Layer
    key: str  # within the layer ("weight", "in_proj_weight"; "" for a bare parameter or buffer)
    flax_keys: tuple[Path, ...]  # (collection, *path, leaf), one per Flax leaf
    optional: bool  # may be missing on the torch side
    flax_optional: bool  # may be missing on the Flax side

    @property
    def param(self) -> bool:
        return self.flax_keys[0][0] == "params"


def _entries(layers: Iterable[Layer]) -> list[_Entry]:
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
            out.append(_Entry(f"{layer.torch_name}.{key}" if key else layer.torch_name, layer, key,
                              tuple((collection, *layer.flax_path, *part) for part in leaves),
                              optional=key in _OPTIONAL and not layer.keys, flax_optional=key in _FLAX_OPTIONAL))
    return out


def _ties(layers: Iterable[Layer]) -> list[tuple[str, str]]:
    return [(f"{layer.torch_name}.{key}", source) for layer in layers for key, source in layer.tied]


def _nest(flat: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _show(key) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _check_keys(have: Iterable, want: Iterable, what: str) -> None:
    have, want = set(have), set(want)
    fmt = lambda keys: ", ".join(sorted(map(_show, keys)))  # noqa: E731
    if want - have:
        raise ConversionError(f"{what}: missing {fmt(want - have)}")
    if have - want:
        raise ConversionError(f"{what}: extra {fmt(have - want)} (no layer in the table converts it)")


def _check_shapes(converted: Mapping, template: Mapping, what: str) -> None:
    for key, value in converted.items():
        if tuple(np.shape(value)) != tuple(np.shape(template[key])):
            raise ConversionError(f"{what}: {_show(key)} converts to shape {tuple(np.shape(value))}, "
                                  f"the target holds {tuple(np.shape(template[key]))}")


def _is_counter(key) -> bool:
    return _show(key).endswith("num_batches_tracked")


def _check_dtypes(converted: Mapping, template: Mapping, what: str, allow_dtype_change: bool) -> None:
    """Refuse a silent dtype change (float64 rounded to float32, int64 to int32); counters may narrow."""
    if allow_dtype_change:
        return
    for key, value in converted.items():
        source, target = np.dtype(_dtype_name(value)), np.dtype(_dtype_name(template[key]))
        if source != target and not (_is_counter(key) and source.kind == target.kind == "i"):
            raise ConversionError(f"{what}: {_show(key)} is {source.name}, the target holds {target.name}; "
                                  "converting would round it (pass allow_dtype_change=True to cast)")


def _dtype_name(x) -> str:
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.asarray(x).dtype.name if dtype is None else np.dtype(dtype).name


def _tensor(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x)
    if x.dtype.name in DTYPES:
        return to_torch(x, x.dtype.name)
    return torch.from_numpy(np.array(x, copy=True))


def _jax_dtype_kept(flat: Mapping[Path, np.ndarray], what: str, allow_dtype_change: bool) -> None:
    """Without a template: refuse what jnp.asarray would narrow (64-bit arrays without jax_enable_x64)."""
    template = {key: np.empty(0, jnp.asarray(np.empty(0, x.dtype)).dtype) for key, x in flat.items()}
    _check_dtypes(flat, template, what, allow_dtype_change)


# ---------------------------------------------------------------- weights

def _torch_to_flat(state_dict: Mapping[str, Any], layers: Sequence[Layer]) -> dict[Path, np.ndarray]:
    entries = _entries(layers)
    ties = _ties(layers)
    required = {e.torch_key for e in entries if not e.optional}
    optional = {e.torch_key for e in entries if e.optional and e.torch_key in state_dict}
    _check_keys(set(state_dict) - {alias for alias, _ in ties}, required | optional, "torch state_dict")
    for alias, source in ties:
        if alias in state_dict and not torch.equal(torch.as_tensor(state_dict[alias]),
                                                   torch.as_tensor(state_dict[source])):
            raise ConversionError(f"torch state_dict: {alias} is tied to {source} in the model but holds other "
                                  "values")
    flat = {}
    for e in entries:
        if e.torch_key in state_dict:
            flat.update(zip(e.flax_keys, _to_flax(e.layer, e.key, state_dict[e.torch_key])))
    return flat


def _to_flax(layer: Layer, key: str, tensor) -> list[np.ndarray]:
    """One torch array in its Flax layout, after checking it can be the ``key`` of ``layer``."""
    if tensor is None:
        raise ConversionError(f"{layer.torch_name}{'.' if key else ''}{key} is None (a parameter without a gradient: "
                              "frozen with requires_grad=False, or unused in forward)")
    # A copy: on CPU, JAX may alias a NumPy buffer, and torch would then step the Flax weights in place.
    x = np.array(as_numpy(tensor), copy=True)
    _expected_torch_shape(layer, key, x.shape)
    return _array_to_flax(layer, key, x)


def _flat_to_torch(flat: Mapping[Path, Any], layers: Sequence[Layer],
                   reference: Mapping[str, torch.Tensor] | None,
                   allow_dtype_change: bool = False) -> OrderedDict[str, torch.Tensor]:
    entries = _entries(layers)
    needed = {k for e in entries if not (e.optional or e.flax_optional) for k in e.flax_keys}
    needed |= {k for e in entries if e.optional or e.flax_optional for k in e.flax_keys if k in flat}
    _check_keys(flat, needed, "Flax variables")
    state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
    for e in entries:
        if all(k in flat for k in e.flax_keys):
            arrays = [np.asarray(flat[k]) for k in e.flax_keys]
            state_dict[e.torch_key] = (torch.tensor(int(arrays[0]), dtype=torch.long) if _is_counter(e.torch_key)
                                       else _tensor(_array_to_torch(e.layer, e.key, arrays)))
        elif e.flax_optional and (not e.layer.keys or e.key in e.layer.keys):
            # nnx.BatchNorm keeps no counter: take it from the reference, or start at 0.
            state_dict[e.torch_key] = (reference[e.torch_key].clone() if reference is not None
                                       and e.torch_key in reference else torch.tensor(0, dtype=torch.long))
    for alias, source in _ties(layers):
        state_dict[alias] = state_dict[source]
    if reference is not None:
        _check_keys(state_dict, reference, "torch state_dict")
        _check_shapes(state_dict, reference, "torch state_dict")
        _check_dtypes(state_dict, reference, "torch state_dict", allow_dtype_change)
        state_dict = OrderedDict((name, state_dict[name].to(reference[name].dtype)) for name in reference)
    return state_dict


def torch_to_linen(state_dict: Mapping[str, Any], layers: Sequence[Layer], template: Mapping | None = None, *,
                   allow_dtype_change: bool = False) -> dict:
    """A linen variables dict ``{"params": ..., "batch_stats": ...}`` from a torch ``state_dict``.

    With ``template`` (e.g. ``module.init(...)``'s variables) every leaf of the
    template must be produced, with its shape and dtype, and nothing else.  A
    dtype change (float64 into float32, int64 into int32) raises unless
    ``allow_dtype_change``.
    """
    flat = _torch_to_flat(state_dict, layers)
    if template is not None:
        template_flat = _flatten(template)
        flat = {k: x for k, x in flat.items() if k in template_flat or not _is_counter(k)}
        _check_keys(flat, template_flat, "Flax variables")
        _check_shapes(flat, template_flat, "Flax variables")
        _check_dtypes(flat, template_flat, "Flax variables", allow_dtype_change)
        return _nest({k: jnp.asarray(x, dtype=template_flat[k].dtype) for k, x in flat.items()})
    flat = {k: x for k, x in flat.items() if not _is_counter(k)}
    _jax_dtype_kept(flat, "Flax variables", allow_dtype_change)
    return _nest({k: jnp.asarray(x) for k, x in flat.items()})


def linen_to_torch(variables: Mapping, layers: Sequence[Layer],
                   reference: Mapping[str, torch.Tensor] | None = None, *,
                   allow_dtype_change: bool = False) -> OrderedDict[str, torch.Tensor]:
    """A torch ``state_dict`` from linen variables; the inverse of :func:`torch_to_linen`.

    ``reference`` (the target model's ``state_dict()``) fixes the key order,
    checks every key, shape and dtype, and supplies ``num_batches_tracked``.
    """
    return _flat_to_torch(_flatten(variables), layers, reference, allow_dtype_change)


def _nnx_state(model):
    from flax import nnx

    return model if isinstance(model, nnx.State) else nnx.state(model, nnx.Not(nnx.RngState))


def _module_at(model, path: Path):
    node = model
    for part in path:
        try:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return node


def _check_modules(layers: Sequence[Layer], model) -> None:
    """Refuse a Flax layer known to compute something else than the torch layer it receives."""
    from flax import nnx

    from crosscheck import flax_layers

    expected = {
        "conv": (nnx.Conv,), "conv_transpose": (nnx.ConvTranspose,), "linear": (nnx.Linear,),
        "batchnorm": (nnx.BatchNorm, flax_layers.BatchNorm), "layernorm": (nnx.LayerNorm,),
        "groupnorm": (nnx.GroupNorm,), "rmsnorm": (nnx.RMSNorm,), "embedding": (nnx.Embed,),
        "mha": (nnx.MultiHeadAttention,), "lstm": (flax_layers.LSTM,), "gru": (flax_layers.GRU,),
    }
    known = tuple({cls for classes in expected.values() for cls in classes}
                  | {nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell, nnx.SimpleCell, nnx.RNN, nnx.LinearGeneral})
    for layer in layers:
        if layer.kind not in expected:
            continue
        module = _module_at(model, layer.flax_path)
        if isinstance(module, known) and not isinstance(module, expected[layer.kind]):
            hint = {"lstm": ": Flax's cells keep one bias per gate and their own gate order; use "
                            "crosscheck.flax_layers.LSTM (torch's two biases, gate order i, f, g, o)",
                    "gru": ": Flax's GRUCell keeps one bias on the hidden path; use crosscheck.flax_layers.GRU",
                    "conv": " (a ConvTranspose needs kind 'conv_transpose')" if isinstance(module, nnx.ConvTranspose)
                    else ""}.get(layer.kind, "")
            raise ConversionError(f"layer {layer.torch_name!r} is a torch {layer.kind}, but the Flax model holds "
                                  f"an {type(module).__name__} at {_show(layer.flax_path)}{hint}")
        if layer.kind == "conv_transpose" and isinstance(module, nnx.ConvTranspose) \
                and bool(module.transpose_kernel) != layer.transpose_kernel:
            raise ConversionError(f"layer {layer.torch_name!r}: the Flax ConvTranspose at {_show(layer.flax_path)} "
                                  f"has transpose_kernel={module.transpose_kernel}, the table "
                                  f"{layer.transpose_kernel} (layers_of(..., transpose_kernel=...))")


def torch_to_nnx(state_dict: Mapping[str, Any], layers: Sequence[Layer], model, *,
                 allow_dtype_change: bool = False) -> Any:
    """An ``nnx.State`` for ``model`` (an ``nnx.Module`` or its state) holding the torch weights.

    Every Param, BatchStat and other Variable of the model (random-number
    streams aside) must be produced, with its shape and dtype, and nothing
    else; apply it with ``nnx.update(model, state)``.  A Flax layer known to
    differ from its torch layer (a ``ConvTranspose`` of the other kernel
    convention, Flax's LSTM cell) is refused.
    """
    from flax import nnx

    if isinstance(model, nnx.Module):
        _check_modules(layers, model)
    flat = {key[1:]: x for key, x in _torch_to_flat(state_dict, layers).items()}
    state = _nnx_state(model)
    template = _flatten(nnx.to_pure_dict(state))
    flat = {k: x for k, x in flat.items() if k in template or not _is_counter(k)}
    _check_keys(flat, template, "nnx state")
    _check_shapes(flat, template, "nnx state")
    _check_dtypes(flat, template, "nnx state", allow_dtype_change)
    nnx.replace_by_pure_dict(state, _nest({k: jnp.asarray(x, dtype=template[k].dtype) for k, x in flat.items()}))
    return state  # the Variables of this State were replaced, not the model's


def nnx_to_torch(model, layers: Sequence[Layer], reference: Mapping[str, torch.Tensor] | None = None, *,
                 allow_dtype_change: bool = False) -> OrderedDict[str, torch.Tensor]:
    """A torch ``state_dict`` from an ``nnx.Module``, its ``nnx.State`` or pure dict; see :func:`linen_to_torch`."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        model = _nnx_state(model)
    flat = _flatten(nnx.to_pure_dict(model) if isinstance(model, nnx.State) else model)
    entries = _entries(layers)
    keys = {k[1:]: k for e in entries for k in e.flax_keys}
    _check_keys(flat, {k[1:] for e in entries for k in e.flax_keys
                       if not (e.optional or e.flax_optional) or k[1:] in flat}, "nnx state")
    return _flat_to_torch({keys[path]: x for path, x in flat.items()}, layers, reference, allow_dtype_change)


# ---------------------------------------------------------------- AdamW state

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The torch names of ``optimizer``'s parameters, in its index order (state dict keys 0, 1, ...)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ConversionError(f"optimizer parameter {len(names)} (shape {tuple(p.shape)}) is not a "
                                      "parameter of the model")
            names.append(by_id[id(p)])
    return names


def _param_entries(layers: Sequence[Layer], names: Sequence[str]):
    """(index, torch name, entry, paths in the params tree) in optimizer order."""
    by_name = {e.torch_key: e for e in _entries(layers) if e.param}
    tied = dict(_ties(layers))
    for index, name in enumerate(names):
        if name not in by_name:
            why = f" (it is tied to {tied[name]!r})" if name in tied else ""
            raise ConversionError(f"optimizer parameter {index} ({name!r}) is in no layer of the table{why}")
        entry = by_name[name]
        yield index, name, entry, tuple(k[1:] for k in entry.flax_keys)


def params_to_flax(named: Mapping[str, Any], layers: Sequence[Layer]) -> dict:
    """Parameter-shaped torch tensors (weights, gradients, moments) by torch name -> the Flax params tree."""
    return _nest(_params_to_flax_flat(named, layers))


def _params_to_flax_flat(named: Mapping[str, Any], layers: Sequence[Layer]) -> dict[Path, np.ndarray]:
    flat = {}
    for _, name, entry, paths in _param_entries(layers, list(named)):
        flat.update(zip(paths, _to_flax(entry.layer, entry.key, named[name])))
    return flat


def torch_layout(model: torch.nn.Module, layers: Sequence[Layer], like=None):
    """For ``jax_impl.adamw(torch_layout=...)``: each Flax param element's flat index in its torch tensor.

    torch's fused CPU kernel rounds the last ``numel % 8`` elements of each
    float32 tensor (its scalar tail) differently; in a transposed Flax kernel
    those are other elements, and this tells jax_impl which.  A nested dict by
    default; with ``like`` (the ``nnx.Module``, or the ``nnx.State`` the
    optimizer is built on) an ``nnx.State`` of the same structure, as
    ``nnx.Optimizer`` and ``jax_impl.ExactOptimizer`` need.  Only trainable
    torch parameters are listed (torch's optimizer never sees frozen ones);
    with ``like``, the params must match its ``nnx.Param`` leaves.
    """
    named = {name: np.arange(p.numel()).reshape(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    # A packed torch tensor (MultiheadAttention's in_proj_weight) splits into q/k/v leaves: each leaf gets
    # its elements' ranks, so the last ones of the tensor stay the last of the value leaf.  That is the
    # tail exactly when the tensor's and the leaf's numel % 8 agree (always for an even embed_dim).
    rank = lambda x: np.argsort(np.argsort(x.ravel(), kind="stable"), kind="stable").reshape(x.shape)  # noqa: E731
    tree = _nest({path: rank(x) for path, x in _params_to_flax_flat(named, layers).items()})
    if like is None:
        return tree
    from flax import nnx

    state = nnx.clone(nnx.state(like, nnx.Param) if isinstance(like, nnx.Module) else like)
    template = _flatten(nnx.to_pure_dict(state))
    flat = {k: jnp.asarray(x, jnp.int32) for k, x in _flatten(tree).items()}
    _check_keys(flat, template, "torch_layout")
    _check_shapes(flat, template, "torch_layout")
    nnx.replace_by_pure_dict(state, _nest(flat))
    return state


def params_to_torch(tree, layers: Sequence[Layer], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`params_to_flax`, for the torch parameters ``names``."""
    flat = _moment_tree(tree)
    entries = list(_param_entries(layers, names))
    _check_keys(flat, {path for *_, paths in entries for path in paths}, "Flax params")
    return {name: _tensor(_array_to_torch(entry.layer, entry.key, [np.asarray(flat[p]) for p in paths]))
            for _, name, entry, paths in entries}


def _moment_tree(tree) -> dict[Path, Any]:
    from flax import nnx

    return _flatten(nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)


def torch_optimizer_to_jax(optimizer_state: Mapping, layers: Sequence[Layer], names: Sequence[str],
                           params: Mapping | None = None) -> jax_impl.AdamWState:
    """A ``jax_impl.AdamWState`` from a ``torch.optim.AdamW`` / ``torch_impl.AdamW`` ``state_dict()``.

    ``names`` are the torch parameter names in the optimizer's order
    (:func:`param_names`).  The moments come as a nested dict shaped like the
    Flax params (linen's ``variables["params"]``, or ``nnx.state(model, nnx.Param)``);
    with ``params`` given, paths and shapes are checked against it.  Torch keeps
    one float32 ``step`` per parameter, JAX one integer count: they must agree.
    """
    state = optimizer_state.get("state", {})
    extra = set(state) - set(range(len(names)))
    if extra:
        raise ConversionError(f"optimizer state: extra parameter indices {sorted(extra)} "
                              f"(the optimizer has {len(names)} parameters)")
    entries = list(_param_entries(layers, names))  # every name in the table, before anything else
    moments = {m: {} for m in _MOMENTS}
    count = 0  # a fresh optimizer: torch creates state at the first step
    if state:
        for index, name in enumerate(names):
            if index not in state:
                raise ConversionError(f"optimizer state: parameter {index} ({name!r}) has no AdamW state while "
                                      "others do; jax_impl.adamw keeps one step count for all parameters")
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment not in state[index]:
                    raise ConversionError(f"optimizer state: parameter {index} ({name!r}) has no {moment!r}")
        steps = {name: float(as_numpy(state[i]["step"])) for i, name in enumerate(names)}
        if len(set(steps.values())) != 1 or not float(next(iter(steps.values()))).is_integer():
            raise ConversionError(f"optimizer state: per-parameter steps {steps} are not one integer count")
        count = int(next(iter(steps.values())))
        has_max = {name for (i, name, *_) in entries if "max_exp_avg_sq" in state[i]}
        if has_max and len(has_max) != len(entries):
            raise ConversionError(f"optimizer state: max_exp_avg_sq (amsgrad) for {sorted(has_max)} only")
        present = _MOMENTS if has_max else _MOMENTS[:2]
        moments.update({m: _params_to_flax_flat({name: state[i][m] for i, name in enumerate(names)}, layers)
                        for m in present})
    if params is not None and state:
        template = _moment_tree(params)
        _check_keys(moments["exp_avg"], template, "optimizer state")
        _check_shapes(moments["exp_avg"], template, "optimizer state")
    tree = lambda flat: _nest({p: jnp.asarray(x) for p, x in flat.items()})  # noqa: E731
    return jax_impl.AdamWState(jnp.asarray(count, jnp.int32), tree(moments["exp_avg"]),
                               tree(moments["exp_avg_sq"]),
                               tree(moments["max_exp_avg_sq"]) if moments["max_exp_avg_sq"] else None)


def jax_optimizer_to_torch(state: jax_impl.AdamWState, layers: Sequence[Layer], names: Sequence[str],
                           param_groups: Sequence[Mapping]) -> dict:
    """A ``state_dict`` for ``torch.optim.AdamW.load_state_dict`` from a ``jax_impl.AdamWState``.

    ``param_groups`` are the target optimizer's (``optimizer.state_dict()["param_groups"]``);
    the moments may be nested dicts or ``nnx.State``.
    """
    count = int(np.asarray(state.count))
    trees = {"exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq, "max_exp_avg_sq": state.max_exp_avg_sq}
    moments = {moment: params_to_torch(tree, layers, names) for moment, tree in trees.items() if tree is not None}
    torch_state = {index: {"step": torch.tensor(float(count), dtype=torch.float32),
                           **{moment: by_name[name] for moment, by_name in moments.items()}}
                   for index, name in enumerate(names)} if count > 0 else {}
    return {"state": torch_state, "param_groups": [dict(group) for group in param_groups]}


def load_nnx_optimizer_state(optimizer, state: jax_impl.AdamWState) -> None:
    """Put a converted ``jax_impl.AdamWState`` (moments as nested dicts) into an ``nnx.Optimizer``.

    Everything is checked before anything is written (a refused state leaves
    the optimizer as it was); the optimizer's ``step`` becomes the state's count.
    """
    from flax import nnx

    current = optimizer.opt_state
    if not isinstance(current, jax_impl.AdamWState):
        raise ConversionError(f"the nnx.Optimizer's state is a {type(current).__name__}, not a jax_impl.AdamWState "
                              "(build it with tx=jax_impl.adamw(...))")
    if (current.max_exp_avg_sq is None) != (state.max_exp_avg_sq is None):
        raise ConversionError("amsgrad differs: one state has max_exp_avg_sq and the other has not")
    writes = []
    for moment in _MOMENTS:
        target, source = getattr(current, moment), getattr(state, moment)
        if target is None:
            continue
        template = _moment_tree(target)
        flat = _moment_tree(source)
        _check_keys(flat, template, f"optimizer state {moment}")
        _check_shapes(flat, template, f"optimizer state {moment}")
        _check_dtypes(flat, template, f"optimizer state {moment}", False)
        writes.append((target, _nest(flat)))
    for target, values in writes:
        nnx.replace_by_pure_dict(target, values, lambda var, value: var.set_value(value) or var)
    current.count.set_value(jnp.asarray(state.count, current.count.get_value().dtype))
    step = getattr(optimizer, "step", None)
    if step is not None:
        step.set_value(jnp.asarray(state.count, step.get_value().dtype))


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
