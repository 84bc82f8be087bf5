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
    """One torch module and where its arrays live in Flax.

    ``torch_name`` is the module's prefix in the ``state_dict`` (``"features.0"``),
    ``kind`` one of :data:`KINDS`, ``flax_path`` the module's path in the Flax
    tree, and ``flatten_from`` the (C, *spatial) shape a Linear's input had
    before torch's channels-first flatten.
    """

    torch_name: str
    kind: str
    flax_path: Path
    flatten_from: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConversionError(f"layer {self.torch_name!r}: unknown kind {self.kind!r}; choose from {sorted(KINDS)}")
        if self.flatten_from is not None and self.kind != "linear":
            raise ConversionError(f"layer {self.torch_name!r}: flatten_from applies to a linear layer, "
                                  f"not {self.kind!r}")


# kind -> {torch key: (flax collection, flax leaf)}
KINDS: dict[str, dict[str, tuple[str, str]]] = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "linear": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "batchnorm": {"weight": ("params", "scale"), "bias": ("params", "bias"),
                  "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")},
    "layernorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "groupnorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "embedding": {"weight": ("params", "embedding")},
}
# torch keys that exist only on the torch side
_TORCH_ONLY = {"batchnorm": ("num_batches_tracked",)}

_MODULE_KINDS = (
    ((torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d), "conv"),
    ((torch.nn.Linear,), "linear"),
    ((torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d), "batchnorm"),
    ((torch.nn.LayerNorm,), "layernorm"),
    ((torch.nn.GroupNorm,), "groupnorm"),
    ((torch.nn.Embedding,), "embedding"),
)


def _default_flax_path(torch_name: str) -> Path:
    # nnx keeps list/Sequential children under integer keys, as torch's "0", "1".
    return tuple(int(part) if part.isdigit() else part for part in torch_name.split("."))


def layers_of(model: torch.nn.Module, *, rename: Mapping[str, Path | str] | None = None,
              flatten_from: Mapping[str, Sequence[int]] | None = None) -> list[Layer]:
    """The layer table of a torch model, read from its modules.

    By default a module's Flax path is its torch name split at dots (what an
    nnx port with the same attribute names has); ``rename`` maps torch names
    to other paths (``"fc1" -> "Dense_0"`` for linen's automatic names).
    A module holding parameters of a kind not in the table raises.
    """
    rename = dict(rename or {})
    flatten_from = {k: tuple(v) for k, v in (flatten_from or {}).items()}
    layers = []
    for name, module in model.named_modules():
        kind = next((k for types, k in _MODULE_KINDS if isinstance(module, types)), None)
        if kind is None:
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if own:
                raise ConversionError(f"module {name!r} ({type(module).__name__}) holds parameters {own} of a "
                                      "kind the converter does not know; pass your own Layer table")
            continue
        path = rename.pop(name, None)
        path = _default_flax_path(name) if path is None else (tuple(path.split("/")) if isinstance(path, str)
                                                              else tuple(path))
        layers.append(Layer(name, kind, path, flatten_from.pop(name, None)))
    for unused, what in ((rename, "rename"), (flatten_from, "flatten_from")):
        if unused:
            raise ConversionError(f"{what} names modules the model does not have: {sorted(unused)}")
    return layers


# Layout transforms, torch -> Flax and back.  Pure permutations: exact.

def _array_to_flax(layer: Layer, key: str, x: np.ndarray) -> np.ndarray:
    if key != "weight" or layer.kind not in ("conv", "linear"):
        return x
    if layer.kind == "conv":
        return np.transpose(x, (*range(2, x.ndim), 1, 0))
    if layer.flatten_from is None:
        return x.T
    out = x.shape[0]
    x = x.reshape(out, *layer.flatten_from)
    return np.transpose(x, (*range(2, x.ndim), 1, 0)).reshape(-1, out)


def _array_to_torch(layer: Layer, key: str, x: np.ndarray) -> np.ndarray:
    if key != "weight" or layer.kind not in ("conv", "linear"):
        return x
    if layer.kind == "conv":
        return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))
    if layer.flatten_from is None:
        return x.T
    out, (channels, *spatial) = x.shape[-1], layer.flatten_from
    x = x.reshape(*spatial, channels, out)
    return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))).reshape(out, -1)


def _expected_torch_shape(layer: Layer, key: str, shape: tuple[int, ...]) -> None:
    """Raise when a torch array cannot be the ``key`` of ``layer``."""
    if key != "weight":
        return
    ndim = {"conv": (3, 4, 5), "linear": (2,), "embedding": (2,)}.get(layer.kind)
    bad = ndim is not None and len(shape) not in ndim
    if not bad and layer.flatten_from is not None:
        bad = shape[1] != int(np.prod(layer.flatten_from))
    if bad:
        want = f"in_features = prod{layer.flatten_from}" if layer.flatten_from and ndim else f"{ndim}-d"
        raise ConversionError(f"{layer.torch_name}.weight has shape {tuple(shape)}, not a {layer.kind} weight "
                              f"({want})")


def _entries(layers: Iterable[Layer]):
    """(torch key, layer, short key, flax key) for every convertible array; flax key = (collection, *path)."""
    for layer in layers:
        for key, (collection, leaf) in KINDS[layer.kind].items():
            yield f"{layer.torch_name}.{key}", layer, key, (collection, *layer.flax_path, leaf)


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


def _tensor(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x)
    if x.dtype.name in DTYPES:
        return to_torch(x, x.dtype.name)
    return torch.from_numpy(np.ascontiguousarray(x))


# ---------------------------------------------------------------- weights

def _torch_to_flat(state_dict: Mapping[str, Any], layers: Sequence[Layer]) -> dict[Path, np.ndarray]:
    entries = list(_entries(layers))
    torch_only = {f"{layer.torch_name}.{key}" for layer in layers for key in _TORCH_ONLY.get(layer.kind, ())}
    # A layer built with bias=False has no bias; every other entry is required.
    required = {name for name, _, key, _ in entries if key != "bias"}
    optional = {name for name, _, key, _ in entries if key == "bias" and name in state_dict}
    _check_keys(set(state_dict) - torch_only, required | optional, "torch state_dict")
    return {flax_key: _to_flax(layer, key, state_dict[name])
            for name, layer, key, flax_key in entries if name in state_dict}


def _to_flax(layer: Layer, key: str, tensor) -> np.ndarray:
    """One torch array in its Flax layout, after checking it can be the ``key`` of ``layer``."""
    x = as_numpy(tensor)
    _expected_torch_shape(layer, key, x.shape)
    return _array_to_flax(layer, key, x)


def _flat_to_torch(flat: Mapping[Path, Any], layers: Sequence[Layer],
                   reference: Mapping[str, torch.Tensor] | None) -> OrderedDict[str, torch.Tensor]:
    entries = list(_entries(layers))
    needed = {flax_key for _, _, key, flax_key in entries if key != "bias" or flax_key in flat}
    _check_keys(flat, needed, "Flax variables")
    state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, layer, key, flax_key in entries:
        if flax_key in flat:
            state_dict[name] = _tensor(_array_to_torch(layer, key, np.asarray(flat[flax_key])))
    for layer in layers:
        for key in _TORCH_ONLY.get(layer.kind, ()):
            name = f"{layer.torch_name}.{key}"
            state_dict[name] = (reference[name].clone() if reference is not None and name in reference
                                else torch.tensor(0, dtype=torch.long))
    if reference is not None:
        _check_keys(state_dict, reference, "torch state_dict")
        _check_shapes(state_dict, reference, "torch state_dict")
        state_dict = OrderedDict((name, state_dict[name]) for name in reference)
    return state_dict


def torch_to_linen(state_dict: Mapping[str, Any], layers: Sequence[Layer], template: Mapping | None = None) -> dict:
    """A linen variables dict ``{"params": ..., "batch_stats": ...}`` from a torch ``state_dict``.

    With ``template`` (e.g. ``module.init(...)``'s variables) every leaf of the
    template must be produced, with its shape, and nothing else.
    """
    flat = {key: jnp.asarray(x) for key, x in _torch_to_flat(state_dict, layers).items()}
    if template is not None:
        template_flat = _flatten(template)
        _check_keys(flat, template_flat, "Flax variables")
        _check_shapes(flat, template_flat, "Flax variables")
    return _nest(flat)


def linen_to_torch(variables: Mapping, layers: Sequence[Layer],
                   reference: Mapping[str, torch.Tensor] | None = None) -> OrderedDict[str, torch.Tensor]:
    """A torch ``state_dict`` from linen variables; the inverse of :func:`torch_to_linen`.

    ``reference`` (the target model's ``state_dict()``) fixes the key order,
    checks every key and shape, and supplies ``num_batches_tracked``.
    """
    return _flat_to_torch(_flatten(variables), layers, reference)


def _nnx_state(model):
    from flax import nnx

    return model if isinstance(model, nnx.State) else nnx.state(model)


def torch_to_nnx(state_dict: Mapping[str, Any], layers: Sequence[Layer], model) -> Any:
    """An ``nnx.State`` for ``model`` (an ``nnx.Module`` or its state) holding the torch weights.

    Every Param and BatchStat of the model must be produced, with its shape,
    and nothing else; apply it with ``nnx.update(model, state)``.
    """
    from flax import nnx

    flat = {key[1:]: jnp.asarray(x) for key, x in _torch_to_flat(state_dict, layers).items()}
    state = _nnx_state(model)
    template = _flatten(nnx.to_pure_dict(state))
    _check_keys(flat, template, "nnx state")
    _check_shapes(flat, template, "nnx state")
    nnx.replace_by_pure_dict(state, _nest(flat))  # replaces the Variables in this State, not the model's
    return state


def nnx_to_torch(model, layers: Sequence[Layer],
                 reference: Mapping[str, torch.Tensor] | None = None) -> OrderedDict[str, torch.Tensor]:
    """A torch ``state_dict`` from an ``nnx.Module``, its ``nnx.State`` or pure dict; see :func:`linen_to_torch`."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        model = nnx.state(model)
    flat = _flatten(nnx.to_pure_dict(model) if isinstance(model, nnx.State) else model)
    keys = {flax_key[1:]: flax_key for _, _, key, flax_key in _entries(layers)}
    needed = {path for path, flax_key in keys.items() if flax_key[-1] != "bias" or path in flat}
    _check_keys(flat, needed, "nnx state")
    return _flat_to_torch({keys[path]: x for path, x in flat.items()}, layers, reference)


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
    """(index, torch name, layer, key, path in the params tree) in optimizer order."""
    by_name = {name: (layer, key, flax_key) for name, layer, key, flax_key in _entries(layers)
               if flax_key[0] == "params"}
    for index, name in enumerate(names):
        if name not in by_name:
            raise ConversionError(f"optimizer parameter {index} ({name!r}) is in no layer of the table")
        layer, key, flax_key = by_name[name]
        yield index, name, layer, key, flax_key[1:]


def params_to_flax(named: Mapping[str, Any], layers: Sequence[Layer]) -> dict:
    """Parameter-shaped torch tensors (weights, gradients, moments) by torch name -> the Flax params tree."""
    return _nest(_params_to_flax_flat(named, layers))


def _params_to_flax_flat(named: Mapping[str, Any], layers: Sequence[Layer]) -> dict[Path, np.ndarray]:
    return {path: _to_flax(layer, key, named[name]) for _, name, layer, key, path in _param_entries(layers, list(named))}


def torch_layout(model: torch.nn.Module, layers: Sequence[Layer]) -> dict:
    """For ``jax_impl.adamw(torch_layout=...)``: each Flax param element's flat index in its torch tensor.

    torch's fused CPU kernel rounds the last ``numel % 8`` elements of each
    float32 tensor (its scalar tail) differently; in a transposed Flax kernel
    those are other elements, and this tells jax_impl which.
    """
    named = {name: np.arange(p.numel()).reshape(p.shape) for name, p in model.named_parameters()}
    return params_to_flax(named, layers)


def params_to_torch(tree, layers: Sequence[Layer], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`params_to_flax`, for the torch parameters ``names``."""
    flat = _moment_tree(tree)
    entries = list(_param_entries(layers, names))
    _check_keys(flat, {path for *_, path in entries}, "Flax params")
    return {name: _tensor(_array_to_torch(layer, key, np.asarray(flat[path]))) for _, name, layer, key, path in entries}


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
    """Put a converted ``jax_impl.AdamWState`` (moments as nested dicts) into an ``nnx.Optimizer``."""
    from flax import nnx

    current = optimizer.opt_state
    if not isinstance(current, jax_impl.AdamWState):
        raise ConversionError(f"the nnx.Optimizer's state is a {type(current).__name__}, not a jax_impl.AdamWState "
                              "(build it with tx=jax_impl.adamw(...))")
    if (current.max_exp_avg_sq is None) != (state.max_exp_avg_sq is None):
        raise ConversionError("amsgrad differs: one state has max_exp_avg_sq and the other has not")
    for moment in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        target, source = getattr(current, moment), getattr(state, moment)
        if target is None:
            continue
        template = _moment_tree(target)
        flat = _moment_tree(source)
        _check_keys(flat, template, f"optimizer state {moment}")
        _check_shapes(flat, template, f"optimizer state {moment}")
        nnx.replace_by_pure_dict(target, _nest(flat), lambda var, value: var.set_value(value) or var)
    current.count.set_value(jnp.asarray(state.count, current.count.get_value().dtype))
