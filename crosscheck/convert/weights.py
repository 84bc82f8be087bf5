"""Model weights between a torch ``state_dict`` and Flax (linen variables, nnx models), and ``torch_layout``.

Each conversion moves every array by its layer's kind (:mod:`crosscheck.convert.layers`):
a pure permutation of elements, so round trips are exact.  The table of layouts is
in :mod:`crosscheck.convert`'s docstring.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

from crosscheck.common.dtypes import DTYPES, to_torch
from crosscheck.common.metrics import as_numpy
from crosscheck.convert.layers import (ConversionError, Layer, array_to_flax, array_to_torch,
                                       expected_torch_shape, layer_entries, tied_keys)
from crosscheck.convert.trees import Path, closest, flatten, nest, show

# Layout transforms, torch -> Flax and back.  Pure permutations: exact.


def check_keys(have: Iterable, want: Iterable, what: str, *, origin: Mapping | None = None,
               extra_why: str = "no layer in the table converts it") -> None:
    """Refuse a missing or an extra key, listing both sides' leftovers and, for each extra one, the closest missing.

    ``have``/``want`` may be mappings to arrays (their shapes are shown and
    compared); ``origin`` names where an extra key came from (its torch entry).
    """
    shapes = {k: tuple(np.shape(v)) for side in (have, want) if isinstance(side, Mapping) for k, v in side.items()}
    have, want = set(have), set(want)
    missing, extra = want - have, have - want
    if not (missing or extra):
        return
    origin = origin or {}
    item = lambda k: (f"{origin[k]} -> " if k in origin else "") + show(k) + (  # noqa: E731
        f" {shapes[k]}" if k in shapes else "")
    def fmt(keys) -> str:
        items = sorted(map(item, keys))
        return ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
    parts = ([f"missing {fmt(missing)}"] if missing else []) + ([f"extra {fmt(extra)} ({extra_why})"] if extra else [])
    lines = [f"{what}: " + "; ".join(parts)]
    for key in sorted(extra, key=show)[:6]:
        same = sorted(show(k) for k in missing if shapes.get(k) is not None and shapes.get(k) == shapes.get(key))
        near = closest(show(key), [show(k) for k in missing])
        candidates = [*[s for s in near if s in same], *[s for s in same if s not in near], *[s for s in near if s not in same]]
        if candidates:
            lines.append(f"  closest to {item(key)}: " + ", ".join(
                s + (" (same shape)" if s in same else "") for s in candidates[:3]))
    if missing and extra:
        lines.append("  layers_of(torch_model, like=flax_model) places layers by name conventions, shape and order; "
                     "or pass rename= (torch name or prefix -> Flax path)")
    raise ConversionError("\n".join(lines))


def check_shapes(converted: Mapping, template: Mapping, what: str) -> None:
    for key, value in converted.items():
        if tuple(np.shape(value)) != tuple(np.shape(template[key])):
            raise ConversionError(f"{what}: {show(key)} converts to shape {tuple(np.shape(value))}, "
                                  f"the target holds {tuple(np.shape(template[key]))}")


def _is_counter(key) -> bool:
    return show(key).endswith("num_batches_tracked")


def check_dtypes(converted: Mapping, template: Mapping, what: str, allow_dtype_change: bool) -> None:
    """Refuse a silent dtype change (float64 rounded to float32, int64 to int32); counters may narrow."""
    if allow_dtype_change:
        return
    for key, value in converted.items():
        source, target = np.dtype(_dtype_name(value)), np.dtype(_dtype_name(template[key]))
        if source != target and not (_is_counter(key) and source.kind == target.kind == "i"):
            raise ConversionError(f"{what}: {show(key)} is {source.name}, the target holds {target.name}; "
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
    check_dtypes(flat, template, what, allow_dtype_change)


# ---------------------------------------------------------------- weights

def state_of(source) -> Mapping[str, Any]:
    """A torch ``state_dict``, or a module's (with its ``persistent=False`` buffers, which ``state_dict()`` leaves out)."""
    if isinstance(source, torch.nn.Module):
        state = dict(source.state_dict())
        state.update((name, b) for name, b in source.named_buffers() if name not in state)
        return state
    return source


def torch_to_flat(state_dict: Mapping[str, Any], layers: Sequence[Layer],
                  origin: dict | None = None) -> dict[Path, np.ndarray]:
    """The Flax leaves (collection, *path) of a torch state; ``origin`` gets each leaf's torch key."""
    state_dict = state_of(state_dict)
    entries = layer_entries(layers)
    ties = tied_keys(layers)
    required = {e.torch_key for e in entries if not e.optional}
    optional = {e.torch_key for e in entries if e.optional and e.torch_key in state_dict}
    # a persistent=False buffer is in no state_dict: it is read from its module, and may be left out
    ignored = {e.torch_key for e in entries if not e.layer.persistent}
    check_keys(set(state_dict) - {alias for alias, _ in ties} - (ignored - optional), required | optional,
               "torch state_dict")
    for alias, source in ties:
        if alias in state_dict and not torch.equal(torch.as_tensor(state_dict[alias]),
                                                   torch.as_tensor(state_dict[source])):
            raise ConversionError(f"torch state_dict: {alias} is tied to {source} in the model but holds other "
                                  "values")
    flat = {}
    for e in entries:
        value = state_dict[e.torch_key] if e.torch_key in state_dict else \
            e.layer.value() if e.layer.value is not None else None
        if value is None and e.torch_key not in state_dict:
            continue
        flat.update(zip(e.flax_keys, _to_flax(e.layer, e.key, value)))
        if origin is not None:
            origin.update((key, e.torch_key) for key in e.flax_keys)
    return flat


def _to_flax(layer: Layer, key: str, tensor) -> list[np.ndarray]:
    """One torch array in its Flax layout, after checking it can be the ``key`` of ``layer``."""
    if tensor is None:
        raise ConversionError(f"{layer.torch_name}{'.' if key else ''}{key} is None (a parameter without a gradient: "
                              "frozen with requires_grad=False, or unused in forward)")
    # A copy: on CPU, JAX may alias a NumPy buffer, and torch would then step the Flax weights in place.
    x = np.array(as_numpy(tensor), copy=True)
    expected_torch_shape(layer, key, x.shape)
    return array_to_flax(layer, key, x)


def _flat_to_torch(flat: Mapping[Path, Any], layers: Sequence[Layer],
                   reference: Mapping[str, torch.Tensor] | None,
                   allow_dtype_change: bool = False) -> OrderedDict[str, torch.Tensor]:
    entries = layer_entries(layers)
    needed = {k for e in entries if not (e.optional or e.flax_optional) for k in e.flax_keys}
    needed |= {k for e in entries if e.optional or e.flax_optional for k in e.flax_keys if k in flat}
    check_keys(flat, needed, "Flax variables")
    state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
    for e in entries:
        if not e.layer.persistent:
            continue  # not in a torch state_dict: the module keeps its own
        if all(k in flat for k in e.flax_keys):
            arrays = [np.asarray(flat[k]) for k in e.flax_keys]
            state_dict[e.torch_key] = (torch.tensor(int(arrays[0]), dtype=torch.long) if _is_counter(e.torch_key)
                                       else _tensor(array_to_torch(e.layer, e.key, arrays)))
        elif e.flax_optional and (not e.layer.keys or e.key in e.layer.keys):
            # nnx.BatchNorm keeps no counter: take it from the reference, or start at 0.
            state_dict[e.torch_key] = (reference[e.torch_key].clone() if reference is not None
                                       and e.torch_key in reference else torch.tensor(0, dtype=torch.long))
    for alias, source in tied_keys(layers):
        state_dict[alias] = state_dict[source]
    if reference is not None:
        check_keys(state_dict, reference, "torch state_dict")
        check_shapes(state_dict, reference, "torch state_dict")
        check_dtypes(state_dict, reference, "torch state_dict", allow_dtype_change)
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
    origin: dict = {}
    flat = torch_to_flat(state_dict, layers, origin)
    optional = _optional_leaves(layers)
    if template is not None:
        template_flat = flatten(template)
        flat = {k: x for k, x in flat.items() if k in template_flat or not (_is_counter(k) or k in optional)}
        check_keys(flat, template_flat, "Flax variables", origin=origin, extra_why="the Flax model has no such leaf")
        check_shapes(flat, template_flat, "Flax variables")
        check_dtypes(flat, template_flat, "Flax variables", allow_dtype_change)
        return nest({k: jnp.asarray(x, dtype=template_flat[k].dtype) for k, x in flat.items()})
    flat = {k: x for k, x in flat.items() if not (_is_counter(k) or k in optional)}
    _jax_dtype_kept(flat, "Flax variables", allow_dtype_change)
    return nest({k: jnp.asarray(x) for k, x in flat.items()})


def linen_to_torch(variables: Mapping, layers: Sequence[Layer],
                   reference: Mapping[str, torch.Tensor] | None = None, *,
                   allow_dtype_change: bool = False) -> OrderedDict[str, torch.Tensor]:
    """A torch ``state_dict`` from linen variables; the inverse of :func:`torch_to_linen`.

    ``reference`` (the target model's ``state_dict()``) fixes the key order,
    checks every key, shape and dtype, and supplies ``num_batches_tracked``.
    """
    return _flat_to_torch(flatten(variables), layers, reference, allow_dtype_change)


def _optional_leaves(layers: Sequence[Layer]) -> set[Path]:
    """Flax leaves a port may lack: persistent=False buffers (a mask the port computes) and counters."""
    return {k for e in layer_entries(layers) if not e.layer.persistent for k in e.flax_keys}


def _nnx_state(model):
    from flax import nnx

    return model if isinstance(model, nnx.State) else nnx.state(model, nnx.Not(nnx.RngState))


def module_at(model, path: Path):
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

    from crosscheck.convert import flax_layers
    expected = {
        "conv": (nnx.Conv,), "conv_transpose": (nnx.ConvTranspose,), "linear": (nnx.Linear,),
        "linear_in_out": (nnx.Linear,),
        "batchnorm": (nnx.BatchNorm, flax_layers.BatchNorm), "layernorm": (nnx.LayerNorm,),
        "groupnorm": (nnx.GroupNorm,), "rmsnorm": (nnx.RMSNorm,), "embedding": (nnx.Embed,),
        "mha": (nnx.MultiHeadAttention,), "lstm": (flax_layers.LSTM,), "gru": (flax_layers.GRU,),
    }
    known = tuple({cls for classes in expected.values() for cls in classes}
                  | {nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell, nnx.SimpleCell, nnx.RNN, nnx.LinearGeneral})
    for layer in layers:
        if layer.kind not in expected:
            continue
        module = module_at(model, layer.flax_path)
        if isinstance(module, known) and not isinstance(module, expected[layer.kind]):
            hint = {"lstm": ": Flax's cells keep one bias per gate and their own gate order; use "
                            "crosscheck.flax_layers.LSTM (torch's two biases, gate order i, f, g, o)",
                    "gru": ": Flax's GRUCell keeps one bias on the hidden path; use crosscheck.flax_layers.GRU",
                    "conv": " (a ConvTranspose needs kind 'conv_transpose')" if isinstance(module, nnx.ConvTranspose)
                    else ""}.get(layer.kind, "")
            raise ConversionError(f"layer {layer.torch_name!r} is a torch {layer.kind}, but the Flax model holds "
                                  f"an {type(module).__name__} at {show(layer.flax_path)}{hint}")
        if layer.kind == "conv_transpose" and isinstance(module, nnx.ConvTranspose) \
                and bool(module.transpose_kernel) != layer.transpose_kernel:
            raise ConversionError(f"layer {layer.torch_name!r}: the Flax ConvTranspose at {show(layer.flax_path)} "
                                  f"has transpose_kernel={module.transpose_kernel}, the table "
                                  f"{layer.transpose_kernel} (layers_of(torch_model, like=flax_model) reads it from "
                                  "the Flax model)")


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
    origin: dict = {}
    flat = {key[1:]: x for key, x in torch_to_flat(state_dict, layers, origin).items()}
    origin = {key[1:]: name for key, name in origin.items()}
    optional = {key[1:] for key in _optional_leaves(layers)}
    state = _nnx_state(model)
    template = flatten(nnx.to_pure_dict(state))
    flat = {k: x for k, x in flat.items() if k in template or not (_is_counter(k) or k in optional)}
    check_keys(flat, template, "nnx state", origin=origin, extra_why="the Flax model has no such leaf")
    check_shapes(flat, template, "nnx state")
    check_dtypes(flat, template, "nnx state", allow_dtype_change)
    nnx.replace_by_pure_dict(state, nest({k: jnp.asarray(x, dtype=template[k].dtype) for k, x in flat.items()}))
    return state  # the Variables of this State were replaced, not the model's


def nnx_to_torch(model, layers: Sequence[Layer], reference: Mapping[str, torch.Tensor] | None = None, *,
                 allow_dtype_change: bool = False) -> OrderedDict[str, torch.Tensor]:
    """A torch ``state_dict`` from an ``nnx.Module``, its ``nnx.State`` or pure dict; see :func:`linen_to_torch`."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        model = _nnx_state(model)
    flat = flatten(nnx.to_pure_dict(model) if isinstance(model, nnx.State) else model)
    entries = layer_entries(layers)
    keys = {k[1:]: k for e in entries for k in e.flax_keys}
    check_keys(flat, {k[1:] for e in entries for k in e.flax_keys
                       if not (e.optional or e.flax_optional) or k[1:] in flat}, "nnx state")
    return _flat_to_torch({keys[path]: x for path, x in flat.items()}, layers, reference, allow_dtype_change)


# ---------------------------------------------------------------- AdamW state


def params_to_flax(named: Mapping[str, Any], layers: Sequence[Layer]) -> dict:
    """Parameter-shaped torch tensors (weights, gradients, moments) by torch name -> the Flax params tree."""
    return nest(params_to_flax_flat(named, layers))


def params_to_flax_flat(named: Mapping[str, Any], layers: Sequence[Layer]) -> dict[Path, np.ndarray]:
    flat = {}
    for _, name, entry, paths in param_entries(layers, list(named)):
        flat.update(zip(paths, _to_flax(entry.layer, entry.key, named[name])))
    return flat


def torch_layout(model: torch.nn.Module, layers: Sequence[Layer], like=None, *, labels=None):
    """For ``jax_impl.adamw(torch_layout=...)``: each Flax param element's flat index in its torch tensor.

    torch's fused CPU kernel rounds the last ``numel % 8`` elements of each
    float32 tensor (its scalar tail) differently; in a transposed Flax kernel
    those are other elements, and this tells jax_impl which.  A nested dict by
    default; with ``like`` (the ``nnx.Module``, or the ``nnx.State`` the
    optimizer is built on) an ``nnx.State`` of the same structure, as
    ``nnx.Optimizer`` and ``jax_impl.ExactOptimizer`` need.  Only trainable
    torch parameters are listed (torch's optimizer never sees frozen ones);
    with ``like``, the params must match its ``nnx.Param`` leaves.

    Inside ``optax.multi_transform`` each inner transform sees the params with
    ``optax.MaskedNode()`` where another label's leaves are: pass the same
    ``labels`` (the label tree, or the callable of params) and get one layout
    per label, masked alike (``{"adamw": ..., "sgd": ...}``) for
    ``jax_impl.adamw(torch_layout=layouts[label])``.
    """
    named = {name: np.arange(p.numel()).reshape(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    # A packed torch tensor (MultiheadAttention's in_proj_weight) splits into q/k/v leaves: each leaf gets
    # its elements' ranks, so the last ones of the tensor stay the last of the value leaf.  That is the
    # tail exactly when the tensor's and the leaf's numel % 8 agree (always for an even embed_dim).
    rank = lambda x: np.argsort(np.argsort(x.ravel(), kind="stable"), kind="stable").reshape(x.shape)  # noqa: E731
    tree = nest({path: rank(x) for path, x in params_to_flax_flat(named, layers).items()})
    if like is None:
        return tree if labels is None else _by_label(tree, labels)
    from flax import nnx

    state = nnx.clone(nnx.state(like, nnx.Param) if isinstance(like, nnx.Module) else like)
    template = flatten(nnx.to_pure_dict(state))
    flat = {k: jnp.asarray(x, jnp.int32) for k, x in flatten(tree).items()}
    check_keys(flat, template, "torch_layout")
    check_shapes(flat, template, "torch_layout")
    nnx.replace_by_pure_dict(state, nest(flat))
    return state if labels is None else _by_label(state, labels)


def _by_label(layout, labels) -> dict:
    """One layout per label of ``optax.multi_transform``, ``optax.MaskedNode()`` at the other labels' leaves."""
    import jax
    import optax

    tree = labels(layout) if callable(labels) else labels
    try:
        names = jax.tree.leaves(jax.tree.map(lambda _, label: label, layout, tree))
    except ValueError as err:
        raise ConversionError(f"torch_layout: labels do not have the params' tree structure: {err}") from None
    return {name: jax.tree.map(lambda x, label, name=name: x if label == name else optax.MaskedNode(), layout, tree)
            for name in dict.fromkeys(names)}


def params_to_torch(tree, layers: Sequence[Layer], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`params_to_flax`, for the torch parameters ``names``."""
    flat = moment_tree(tree)
    entries = list(param_entries(layers, names))
    check_keys(flat, {path for *_, paths in entries for path in paths}, "Flax params")
    return {name: _tensor(array_to_torch(entry.layer, entry.key, [np.asarray(flat[p]) for p in paths]))
            for _, name, entry, paths in entries}


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


def param_entries(layers: Sequence[Layer], names: Sequence[str]):
    """(index, torch name, entry, paths in the params tree) in optimizer order."""
    by_name = {e.torch_key: e for e in layer_entries(layers) if e.param}
    tied = dict(tied_keys(layers))
    for index, name in enumerate(names):
        if name not in by_name:
            why = f" (it is tied to {tied[name]!r})" if name in tied else ""
            raise ConversionError(f"optimizer parameter {index} ({name!r}) is in no layer of the table{why}")
        entry = by_name[name]
        yield index, name, entry, tuple(k[1:] for k in entry.flax_keys)


def moment_tree(tree) -> dict[Path, Any]:
    from flax import nnx

    return flatten(nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)
