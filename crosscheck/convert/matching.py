"""Which Flax module holds each torch layer: by name, by the common conventions, then by order and shape.

A port rarely keeps every torch name.  :func:`match_layers` resolves a torch
layer table against the Flax model itself (an ``nnx.Module`` or linen
variables), in three stages, each torch layer taking the first that fits:

1. **mapping**: ``rename`` (a torch name or prefix -> a Flax path), checked against the Flax model;
2. **name**, under the common conventions: ``nnx.Sequential`` keeps its
   children under ``layers`` (torch ``downsample.0`` is ``downsample/layers/0``;
   linen's ``layers_0``), a wrapper prefix the port drops (HF's
   ``transformer.``, ``model.``), and a model's own norm class whose ``weight``
   is ``nnx.LayerNorm``'s ``scale`` (``running_mean``/``var`` are ``mean``/``var``);
3. **structure**: the layers still without a home are grouped by their
   Flax-side shapes (after the kind's layout: conv kernels OIHW -> HWIO, Linear
   transposed, HF ``Conv1D`` (in, out) kept) and the kind of the Flax module
   (its nnx class, or linen's ``Conv_0``/``Dense_1``/``BatchNorm_3`` names);
   a group holding one layer on each side is matched by shape; several are
   paired in order, which needs the Flax order (nnx's definition order, linen's
   call order: its numbering within a module type, ``module.init``'s own dict
   across types; list indices) and an order of calls on one side at least:
   torch's forward hooks (``example=`` an input), linen's, or indices.  Two
   definition orders prove nothing, a dict sorted by a tree map has lost its
   order across types, and unequal groups cannot be paired: all are refused,
   naming the candidates.

Anything left unmatched on either side raises :class:`ConversionError` listing
both sides' leftovers and each one's closest candidates.  Every match comes
back as a row (torch name, Flax path, kind, how) for review.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crosscheck.convert.layers import ConversionError, Layer, array_to_flax, layer_entries, read_layers
from crosscheck.convert.trees import Path, closest, flatten, show

# A model's own layer class keeps torch's names; Flax's layers use these (identity layouts only).
ALIASES = {"weight": ("scale", "embedding"), "running_mean": ("mean",), "running_var": ("var",)}
_CANONICAL = {"weight": "w", "scale": "w", "embedding": "w", "running_mean": "mean", "running_var": "var"}

# linen's automatic names and nnx's classes -> the kind of layer they hold
_LINEN_KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Dense": "linear", "BatchNorm": "batchnorm",
                "LayerNorm": "layernorm", "GroupNorm": "groupnorm", "RMSNorm": "rmsnorm", "Embed": "embedding"}


_FLAX_KIND = {"linear_in_out": "linear"}  # HF's Conv1D is an nnx.Linear in the port


@dataclass(frozen=True)
class FlaxModule:
    """One Flax module holding arrays: its path, its leaves (relative path -> (collection, shape)), its kind."""

    path: Path
    leaves: dict
    kind: str | None
    order: tuple
    module: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Row:
    """One line of the proposed table: a torch layer, where it goes, and how that was decided."""

    torch_name: str
    flax_path: Path
    kind: str
    how: str


@dataclass
class Matching:
    """The resolved layer table and the rows that say how each layer was placed."""

    layers: list[Layer]
    rows: list[Row]

    @property
    def structural(self) -> bool:
        return any(row.how.startswith(("shape", "order")) for row in self.rows)

    def to_mapping(self) -> dict[str, str]:
        """torch name -> Flax path, as ``--mapping`` files and ``rename=`` take it."""
        return {row.torch_name: show(row.flax_path) for row in self.rows}

    def __str__(self) -> str:
        head = ("torch name", "Flax path", "kind", "matched by")
        rows = [head] + [(r.torch_name or "(root)", show(r.flax_path) or "(root)", r.kind, r.how) for r in self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join(f"{a:<{widths[0]}}  ->  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


# ---------------------------------------------------------------- the Flax side


def _normalized(path: Path) -> Path:
    """A Flax path as torch would name it: nnx.Sequential's ``layers/0`` and linen's ``layers_0`` are ``0``."""
    out = []
    for i, part in enumerate(path):
        if part == "layers" and i + 1 < len(path) and isinstance(path[i + 1], int):
            continue
        match = re.fullmatch(r"layers_(\d+)", part) if isinstance(part, str) else None
        out.append(int(match.group(1)) if match else part)
    return tuple(out)


def _nnx_modules(model) -> list[FlaxModule]:
    from flax import nnx

    from crosscheck.convert import flax_layers
    types = ((nnx.ConvTranspose, "conv_transpose"), (nnx.Conv, "conv"), (nnx.Linear, "linear"),
             ((nnx.BatchNorm, flax_layers.BatchNorm), "batchnorm"), (nnx.LayerNorm, "layernorm"),
             (nnx.GroupNorm, "groupnorm"), (nnx.RMSNorm, "rmsnorm"), (nnx.Embed, "embedding"),
             (nnx.MultiHeadAttention, "mha"), (flax_layers.LSTM, "lstm"), (flax_layers.GRU, "gru"))
    modules: dict[Path, dict] = {}
    seen: set[int] = set()

    def collection(var) -> str:
        return "params" if isinstance(var, nnx.Param) else "batch_stats" if isinstance(var, nnx.BatchStat) \
            else "buffers"

    def visit(node, path: Path, owner: Path | None) -> None:
        # definition order: attributes in the order __init__ set them (nnx's State sorts its keys)
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, (nnx.RngState, nnx.Rngs)):
            return
        if isinstance(node, nnx.Variable):
            home = owner if owner is not None else path[:-1]
            entry = modules.setdefault(home, {"leaves": {}, "kind": None, "module": None, "order": len(modules)})
            value = node.get_value() if hasattr(node, "get_value") else node.value  # also abstract (nnx.eval_shape)
            entry["leaves"][path[len(home):]] = (collection(node), tuple(np.shape(value)))
            return
        if isinstance(node, (list, tuple)):
            children = list(enumerate(node))
        elif isinstance(node, Mapping):
            children = list(node.items())
        elif isinstance(node, nnx.Pytree):  # modules, nnx.List, nnx.Dict
            children = [(int(k) if k.isdigit() else k, v) for k, v in vars(node).items() if not k.startswith("_")]
            kind = next((k for cls, k in types if isinstance(node, cls)), None) if isinstance(node, nnx.Module) \
                else None
            if isinstance(node, nnx.Module) and owner is None:
                modules.setdefault(path, {"leaves": {}, "kind": kind, "module": node, "order": len(modules)})
                modules[path].update(kind=kind, module=node)
                if kind in ("mha",):  # its query/key/value/out submodules are its own leaves
                    owner = path
        else:
            return
        for key, child in children:
            visit(child, (*path, key), owner)

    visit(model, (), None)
    return [FlaxModule(path, m["leaves"], m["kind"], (m["order"],), m["module"])
            for path, m in modules.items() if m["leaves"]]


def _family(part) -> tuple[str, int | None]:
    """linen's ``Conv_3`` -> ("Conv", 3); a list index 3 -> ("", 3); any other name -> (name, None)."""
    if isinstance(part, int):
        return "", part
    match = re.fullmatch(r"(.*)_(\d+)", str(part))
    return (match.group(1), int(match.group(2))) if match else (str(part), None)


def _linen_modules(variables: Mapping) -> tuple[list[FlaxModule], set[Path]]:
    """The modules and the parents whose children's call order is lost (keys sorted by a tree map or jit)."""
    modules: dict[Path, dict] = {}
    # linen numbers Conv_0, Conv_1, ... as they are called: within a family that is the call order even in a
    # sorted dict; across families only module.init's own dict (insertion order) tells
    first_family: dict[tuple, int] = {}
    children: dict[Path, list] = {}

    def key_of(path: Path) -> tuple:
        out = []
        for i, part in enumerate(path):
            family, number = _family(part)
            rank = first_family.setdefault((path[:i], family), len(first_family))
            out.append((rank, -1 if number is None else number))
            if part not in children.setdefault(path[:i], []):
                children[path[:i]].append(part)
        return tuple(out)

    for key, value in flatten(variables).items():
        collection, *path = key
        home = tuple(path[:-1])
        entry = modules.setdefault(home, {"leaves": {}, "order": key_of(home)})
        entry["leaves"][(path[-1],)] = (collection, tuple(np.shape(value)))
    lost = {parent for parent, kids in children.items()
            if len({_family(k)[0] for k in kids}) > 1 and [str(k) for k in kids] == sorted(map(str, kids))}
    out = []
    for path, m in modules.items():
        family = _family(path[-1])[0] if path else None
        out.append(FlaxModule(path, m["leaves"], _LINEN_KINDS.get(family), m["order"]))
    return out, lost


def flax_modules(like) -> tuple[list[FlaxModule], str, set[Path] | None]:
    """The Flax modules holding arrays; which order they come in ("linen": call order, "nnx": definition
    order, "sorted": none); and the parents whose children's order is lost (None: all of them)."""
    from flax import nnx

    if isinstance(like, nnx.Module):
        return _nnx_modules(like), "nnx", set()
    if isinstance(like, nnx.State):  # keys sorted, Variable types gone: any collection, no order but indices
        modules, _ = _linen_modules({"params": nnx.to_pure_dict(like)})
        return [dataclasses.replace(m, leaves={k: ("?", s) for k, (_, s) in m.leaves.items()})
                for m in modules], "sorted", None
    if isinstance(like, Mapping):
        modules, lost = _linen_modules(like if any(k in like for k in ("params", "batch_stats")) else {"params": like})
        return modules, "linen", lost
    raise ConversionError(f"like={type(like).__name__}: expected an nnx.Module, an nnx.State or linen variables")


def _order_known(members: Sequence[FlaxModule], lost: set[Path] | None) -> tuple[bool, bool]:
    """(whether the members' order is known, whether it is by numbers alone: linen's or a list's indices)."""
    numbered = True
    for a, b in zip(members, members[1:]):
        i = next((i for i, (x, y) in enumerate(zip(a.path, b.path)) if x != y), None)
        if i is None:
            continue
        (fa, na), (fb, nb) = _family(a.path[i]), _family(b.path[i])
        if fa == fb and na is not None and nb is not None:
            continue
        numbered = False
        if lost is None or a.path[:i] in lost:
            return False, False
    return True, numbered


# ---------------------------------------------------------------- the torch side


@dataclass
class _Unit:
    """The torch side of one match: a layer of a known kind, or a module's bare parameters and buffers."""

    name: str
    kind: str  # a KINDS kind, or "params" for a module's own bare arrays
    layers: list[Layer]
    path: Path  # the Flax path the names propose
    leaves: dict  # relative Flax leaf -> (collection, shape), for a known kind; torch key -> ... for "params"
    order: int = 0


def _shape_only(shape) -> np.ndarray:
    return np.broadcast_to(np.zeros((), np.float32), shape)


def _units(model: torch.nn.Module, layers: Sequence[Layer]) -> list[_Unit]:
    tensors = dict(model.state_dict(keep_vars=True))
    tensors.update(model.named_buffers())
    units: dict[str, _Unit] = {}
    for layer in layers:
        if layer.kind in ("param", "buffer"):
            parent, _, key = layer.torch_name.rpartition(".")
            unit = units.setdefault(f"{parent}#", _Unit(parent, "params", [], layer.flax_path[:-1], {}))
            collection = "params" if layer.kind == "param" else "buffers"
            unit.layers.append(layer)
            unit.leaves[key] = (collection, tuple(tensors[layer.torch_name].shape))
            continue
        leaves = {}
        for entry in layer_entries([layer]):
            if entry.torch_key not in tensors or tensors[entry.torch_key] is None:
                continue
            arrays = array_to_flax(layer, entry.key, _shape_only(tuple(tensors[entry.torch_key].shape)))
            for key, x in zip(entry.flax_keys, arrays):
                leaves[key[1 + len(layer.flax_path):]] = (key[0], x.shape)
        units[layer.torch_name] = _Unit(layer.torch_name, layer.kind, [layer], layer.flax_path, leaves)
    return list(units.values())


def torch_order(model: torch.nn.Module, example) -> dict[str, int]:
    """Module name -> its position in torch's forward on ``example`` (forward pre-hooks, no gradients).

    It runs a copy in eval mode: the order of calls is the same, and a
    train-mode BatchNorm of the caller's model keeps its statistics.
    """
    import copy

    model = copy.deepcopy(model).eval()
    order: dict[str, int] = {}

    def hook(name: str):
        def record(module, args) -> None:
            order.setdefault(name, len(order))
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order


# ---------------------------------------------------------------- matching


def _fits(unit: _Unit, module: FlaxModule, transpose_kernel: bool | None) -> dict | None:
    """torch key or Flax leaf -> the module's leaf, when ``module`` can hold ``unit``; None when it cannot."""
    if unit.kind != "params" and module.kind is not None and module.kind != _FLAX_KIND.get(unit.kind, unit.kind):
        return None
    want = dict(unit.leaves)
    if unit.kind == "conv_transpose" and transpose_kernel is not None and unit.layers[0].transpose_kernel \
            != transpose_kernel and ("kernel",) in want:
        collection, shape = want[("kernel",)]
        want[("kernel",)] = (collection, (*shape[:-2], shape[-1], shape[-2]))
    have = dict(module.leaves)
    out = {}
    for key, (collection, shape) in want.items():
        names = [key] if unit.kind != "params" else [(key,)] + [(alias,) for alias in ALIASES.get(key, ())]
        found = next((n for n in names if n in have and have[n][1] == shape and _same_collection(collection,
                                                                                                  have[n][0])), None)
        if found is None:
            if unit.kind != "params" and key[-1:] == ("num_batches_tracked",):
                continue  # nnx.BatchNorm keeps no counter
            return None
        out[key] = found
        del have[found]
    return None if have else out


def _same_collection(torch_side: str, flax_side: str) -> bool:
    return torch_side == flax_side or flax_side == "?" or (torch_side == "buffers" and flax_side != "params") \
        or (torch_side == "batch_stats" and flax_side == "buffers")


def _signature(leaves: Mapping, kind: str | None) -> tuple:
    """What structural matching groups by: leaf names up to the aliases, and shapes (a ConvTranspose's
    last two kernel dimensions unordered: its convention is read from the Flax module after the match)."""
    def path(key) -> tuple:
        return key if isinstance(key, tuple) else (key,)

    def shape(key: tuple, s: tuple) -> tuple:
        return (*s[:-2], *sorted(s[-2:])) if kind == "conv_transpose" and key[-1] == "kernel" else s

    return tuple(sorted((tuple(_CANONICAL.get(str(p), str(p)) for p in path(k)), shape(path(k), s))
                        for k, (_, s) in leaves.items() if path(k)[-1] != "num_batches_tracked"))


def _describe(leaves: Mapping) -> str:
    return ", ".join(f"{show(k) if isinstance(k, tuple) else k} {tuple(s)}" for k, (_, s) in leaves.items())


def _placed(unit: _Unit, module: FlaxModule, fit: dict, transpose_kernel) -> list[Layer]:
    if unit.kind != "params":
        layer = unit.layers[0]
        changes = {"flax_path": module.path}
        if unit.kind == "conv_transpose" and transpose_kernel is not None:
            changes["transpose_kernel"] = bool(transpose_kernel)
        return [dataclasses.replace(layer, **changes)]
    return [dataclasses.replace(layer, flax_path=(*module.path, *fit[layer.torch_name.rpartition(".")[2]]))
            for layer in unit.layers]


def _flag(module: FlaxModule, explicit: Mapping[str, bool], unit: _Unit):
    """The ConvTranspose kernel convention: given by name, else read from the nnx module."""
    if unit.kind != "conv_transpose":
        return None
    if unit.name in explicit:
        return explicit[unit.name]
    return bool(module.module.transpose_kernel) if module.module is not None \
        and hasattr(module.module, "transpose_kernel") else None


def match_layers(model: torch.nn.Module, layers: Sequence[Layer], like, *, mapped: Sequence[str] = (),
                 example=None, transpose_kernel: Mapping[str, bool] | None = None) -> Matching:
    """Place every layer of ``layers`` (from :func:`~crosscheck.convert.layers_of`) in the Flax model ``like``.

    ``mapped`` names the layers whose path a mapping gave; ``example`` (a torch
    input, or a tuple of inputs) gives torch's execution order for stage 3;
    ``transpose_kernel`` the ConvTranspose conventions given by name (others are
    read from the nnx modules).  Raises :class:`ConversionError` when a layer
    has no home, a Flax module no torch layer, or a match is ambiguous.
    """
    modules, flax_order, lost = flax_modules(like)
    explicit = dict(transpose_kernel or {})
    units = _units(model, layers)
    order = torch_order(model, example) if example is not None else {}
    definition = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for unit in units:
        unit.order = order.get(unit.name, len(order) + definition.get(unit.name, 0))
    by_path = {m.path: m for m in modules}
    by_normal: dict[Path, list[FlaxModule]] = {}
    for m in modules:
        by_normal.setdefault(_normalized(m.path), []).append(m)
    top = {m.path[0] for m in modules if m.path}
    placed: dict[int, tuple[FlaxModule, dict, str]] = {}
    claimed: set[Path] = set()

    def attempt(i: int, unit: _Unit, module: FlaxModule | None, how: str) -> bool:
        if module is None or module.path in claimed:
            return False
        fit = _fits(unit, module, _flag(module, explicit, unit))
        if fit is None:
            return False
        placed[i] = (module, fit, how)
        claimed.add(module.path)
        return True

    # 1. a mapping, and 2. names under the conventions
    for i, unit in enumerate(units):
        if not unit.leaves:  # every array tied to another layer's: no Flax leaf of its own
            placed[i] = (FlaxModule(unit.path, {}, None, ()), {}, "tied (no leaf of its own)")
            continue
        name_parts = tuple(p for p in unit.name.split(".") if p)
        if any(layer.torch_name in mapped for layer in unit.layers) or unit.name in mapped:
            if not attempt(i, unit, by_path.get(unit.path), "mapping"):
                raise ConversionError(f"the mapping puts {unit.name!r} ({unit.kind}: {_describe(unit.leaves)}) at "
                                      f"{show(unit.path) or '(root)'}, where the Flax model holds "
                                      f"{_describe(by_path[unit.path].leaves) if unit.path in by_path else 'nothing'}")
            continue
        candidates = [(unit.path, "name")]
        if name_parts and name_parts[0] not in top:
            candidates.append((unit.path[1:], f"name (prefix {name_parts[0]!r} dropped)"))
        for path, how in candidates:
            if attempt(i, unit, by_path.get(path), how):
                break
            normal = [m for m in by_normal.get(_normalized(path), []) if m.path not in claimed]
            if len(normal) == 1 and attempt(i, unit, normal[0], how + (", nnx.Sequential 'layers'"
                                                                       if "layers" in map(str, normal[0].path)
                                                                       or any(str(p).startswith("layers_")
                                                                              for p in normal[0].path) else "")):
                break
    # 3. structure: shapes, kinds, and the order of execution
    free_units = [i for i in range(len(units)) if i not in placed]
    free_modules = [m for m in modules if m.path not in claimed]
    groups: dict[tuple, tuple[list, list]] = {}
    for i in sorted(free_units, key=lambda i: units[i].order):
        unit = units[i]
        groups.setdefault(_signature(unit.leaves, unit.kind), ([], []))[0].append(i)
    for m in sorted(free_modules, key=lambda m: m.order):
        groups.setdefault(_signature(m.leaves, m.kind), ([], []))[1].append(m)
    ambiguous = []
    for signature, (torch_side, flax_side) in groups.items():
        if not torch_side or not flax_side:
            continue
        if len(torch_side) == len(flax_side) == 1:
            attempt(torch_side[0], units[torch_side[0]], flax_side[0], "shape")
        elif len(torch_side) == len(flax_side):
            known, numbered = _order_known(flax_side, lost)
            flax_how = ("indices" if flax_order != "linen" else "linen's call order") if numbered else \
                {"linen": "linen's call order", "nnx": "Flax's definition order"}.get(flax_order, "")
            # pairing in order needs the Flax order, and an order of calls on one side at least
            if known and (order or flax_order == "linen" or numbered):
                how = f"order + shape ({'torch forward' if order else 'torch definition'} vs {flax_how})"
                for i, m in zip(torch_side, flax_side):
                    attempt(i, units[i], m, how)
            else:
                ambiguous.append((torch_side, flax_side, "lost" if not known else "definition"))
        else:
            ambiguous.append((torch_side, flax_side, "count"))
    left_units = [units[i] for i in range(len(units)) if i not in placed]
    left_modules = [m for m in modules if m.path not in claimed]
    if ambiguous or left_units or left_modules:
        in_doubt = {i for torch_side, _, _ in ambiguous for i in torch_side}  # named once, as candidates
        unsure = {m.path for _, flax_side, _ in ambiguous for m in flax_side}
        raise ConversionError(_unmatched_message(
            [u for i, u in enumerate(units) if i not in placed and i not in in_doubt],
            [m for m in left_modules if m.path not in unsure], ambiguous, units))
    out_layers, rows = [], []
    for i, unit in enumerate(units):
        module, fit, how = placed[i]
        new = _placed(unit, module, fit, _flag(module, explicit, unit))
        out_layers.extend(new)
        if unit.kind == "params":
            for layer in new:
                renamed = "" if layer.flax_path[-1] == layer.torch_name.rpartition(".")[2] else \
                    f", {layer.torch_name.rpartition('.')[2]} -> {layer.flax_path[-1]}"
                rows.append(Row(layer.torch_name, layer.flax_path, layer.kind, how + renamed))
        else:
            rows.append(Row(unit.name, module.path, unit.kind, how))
    by_name = {layer.torch_name: layer for layer in out_layers}
    return Matching([by_name[layer.torch_name] for layer in layers], rows)


def _unmatched_message(left_units: list[_Unit], left_modules: list[FlaxModule], ambiguous, units) -> str:
    lines = ["cannot match the torch model's layers to the Flax model:"]
    reasons = {"count": "their numbers differ",
               "definition": "only definition orders are known (pass example= a torch input, or a mapping)",
               "lost": "the Flax order is lost (linen variables or an nnx.State come with sorted keys from a "
                       "jax.tree map or jit: pass module.init's own output or the nnx.Module, or a mapping)"}
    for torch_side, flax_side, reason in ambiguous:
        names = ", ".join(units[i].name for i in torch_side)
        paths = ", ".join(show(m.path) for m in flax_side)
        unit = units[torch_side[0]]
        why = reasons[reason]
        lines.append(f"  ambiguous: torch {names} ({unit.kind}: {_describe(unit.leaves)}) and Flax {paths} "
                     f"have the same shapes; {why}")
    if left_units:
        lines.append("  torch entries without a Flax home: " + "; ".join(
            f"{u.name or '(root)'} ({u.kind}: {_describe(u.leaves)})" for u in left_units))
    if left_modules:
        lines.append("  Flax leaves without a torch entry: " + "; ".join(
            f"{show(m.path) or '(root)'} ({_describe(m.leaves)})" for m in left_modules))
    for unit in left_units:
        paths = [show(m.path) for m in left_modules]
        same = [show(m.path) for m in left_modules
                if _signature(m.leaves, m.kind) == _signature(unit.leaves, unit.kind)]
        kind = [show(m.path) for m in left_modules if m.kind is not None
                and m.kind == _FLAX_KIND.get(unit.kind, unit.kind) and show(m.path) not in same]
        near = [p for p in closest(show(unit.path), paths) if p not in same and p not in kind]
        hint = [f"{p} (same shapes)" for p in same] + [f"{p} (same kind)" for p in kind] + near
        if hint:
            lines.append(f"  closest to torch {unit.name or '(root)'}: {', '.join(hint[:3])}")
    lines.append("  pass a mapping (rename= / --mapping FILE.json: torch name or prefix -> Flax path)")
    return "\n".join(lines)


def layers_of(model: torch.nn.Module, *, rename: Mapping[str, Path | str] | None = None,
              flatten_from: Mapping[str, Sequence[int]] | None = None,
              transpose_kernel: bool | Mapping[str, bool] | None = None, like=None, example=None,
              show_table: bool | None = None) -> list[Layer]:
    """The layer table of a torch model: which kind each layer is, and where the port keeps it.

    Without ``like`` a module's Flax path is its torch name split at dots (an
    nnx port with the same attribute names), changed by ``rename`` (a torch
    name or prefix -> a Flax path: ``{"transformer": ""}``, ``{"fc1": "Dense_0"}``;
    digits in a string path are list indices).  With ``like`` (the ``nnx.Module``,
    its ``nnx.State``, or linen variables) every layer is placed in that model
    by :func:`match`: the mapping, then names under the common conventions,
    then shape and execution order (``example``: a torch input, for torch's
    forward order), and ``transpose_kernel`` is read from each
    ``nnx.ConvTranspose`` unless given.  The table of how each layer was matched
    is printed when a structural match was used (``show_table=True``: always;
    ``False``: never).  ``flatten_from`` gives a Linear after torch's NCHW flatten
    its (C, H, W).  Bare ``nn.Parameter``, buffers (also ``persistent=False``
    ones) of the model's own classes become ``param``/``buffer`` layers; a weight
    tied to an earlier one is recorded on its layer.  A module holding arrays of
    a kind the converter does not know, or a known kind in a configuration it
    cannot reproduce, raises :class:`ConversionError`, and so does a layer
    ``like`` has no place for.
    """
    if like is None:
        return read_layers(model, rename=rename, flatten_from=flatten_from,
                           transpose_kernel=transpose_kernel if isinstance(transpose_kernel, Mapping)
                           else bool(transpose_kernel))
    return match(model, like, rename=rename, flatten_from=flatten_from, transpose_kernel=transpose_kernel,
                 example=example, show_table=show_table).layers


def match(model: torch.nn.Module, like, *, rename: Mapping[str, Path | str] | None = None,
          flatten_from: Mapping[str, Sequence[int]] | None = None,
          transpose_kernel: bool | Mapping[str, bool] | None = None, example=None,
          show_table: bool | None = False) -> Matching:
    """:func:`layers_of` with ``like``, returning the :class:`Matching` (its ``rows`` say how each layer was placed)."""
    explicit = dict(transpose_kernel) if isinstance(transpose_kernel, Mapping) else {}
    base = read_layers(model, rename=rename, flatten_from=flatten_from,
                       transpose_kernel=explicit if isinstance(transpose_kernel, Mapping) else bool(transpose_kernel))
    if isinstance(transpose_kernel, bool):
        explicit = {layer.torch_name: transpose_kernel for layer in base if layer.kind == "conv_transpose"}
    keys = {k.rstrip(".") for k in (rename or {})}
    renamed = {layer.torch_name for layer in base
               if any(k == "" or layer.torch_name == k or layer.torch_name.startswith(f"{k}.") for k in keys)}
    # a persistent=False buffer the port does not hold (a mask it computes) is not part of the match
    modules, _, _ = flax_modules(like)
    held = {str((*m.path, *leaf)[-1]) for m in modules for leaf in m.leaves}
    base = [layer for layer in base if layer.persistent or layer.torch_name.rpartition(".")[2] in held]
    result = match_layers(model, base, like, mapped=sorted(renamed), example=example, transpose_kernel=explicit)
    if show_table or (show_table is None and result.structural):
        print(result)
    return result
