"""``locate_divergence``: say *where* a Flax port departs from its torch model, and why.

Both models run on the same batch (on copies: the caller's models, their
weights and batch statistics are left as they were).  Every torch module's
forward output is captured with forward hooks, every Flax module's by
swapping its class for a recording subclass for the duration of one eager
call; modules are matched by the layer table's paths (default: the torch
name split at dots), and compared in torch's execution order.

The *rounding band* of a module is what float32 rounding alone produces
there: the same torch model is run in float64, and the band is
``BAND_FACTOR`` times torch's own float32 error at that module (plus a few
ulps of the output's scale).  A faithful port's error is rounding of the
same size (measured on ``crosscheck.port_examples``: at most 6x torch's own,
see tests/crosscheck_tests/port/test_locate.py), a porting bug is orders of magnitude above.  The
first module outside its band is where the port is wrong; its likely cause
comes from :data:`PITFALLS`, by comparing the two modules' configurations
and testing each pitfall's signature on the captured values.

Parameter gradients are compared too (relative to their leaf, with the
global floor of ``assert_trajectories_match``), for ports whose forward is
right and whose backward is not (a ``stop_gradient`` left in).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from crosscheck import convert
from crosscheck.common import losses
from crosscheck.common.metrics import as_numpy
from crosscheck.convert import flax_layers, trees, weights
from crosscheck.port import compare

# The table of known porting pitfalls: key -> (what happens, the fix).  README "Porting" shows it.
PITFALLS: dict[str, tuple[str, str]] = {
    "layout": ("a kernel in the wrong layout: a Linear kernel not transposed, HF's Conv1D (stored (in, out), "
               "x @ W) converted as a Linear (stored (out, in)), a conv kernel not moved to (*K, I, O), "
               "a ConvTranspose converted as a conv or with the other transpose_kernel convention",
               "fix the layer table (a Conv1D weight is already the Flax kernel; kind conv_transpose, "
               "transpose_kernel=...) and convert with torch_to_nnx"),
    "flatten": ("torch flattens NCHW, the port NHWC: the Linear after the flatten sees its inputs permuted",
                "layers_of(..., flatten_from={name: (C, H, W)})"),
    "gelu": ("jax.nn.gelu defaults to approximate=True (tanh), torch's GELU is exact",
             "jax.nn.gelu(x, approximate=False), or nn.GELU(approximate='tanh') in torch"),
    "epsilon": ("a normalization epsilon differs: nnx.LayerNorm/RMSNorm default 1e-6, torch 1e-5 "
                "(RMSNorm: torch's eps=None is the dtype's machine epsilon)",
                "pass epsilon= equal to torch's eps"),
    "momentum": ("BatchNorm momentum: Flax's is the weight of the old statistics (torch's 0.1 is Flax's 0.9)",
                 "nnx.BatchNorm or linen.BatchNorm(momentum=1 - torch_momentum), or crosscheck.flax_layers.BatchNorm"),
    "padding": ("padding: Flax's default 'SAME' pads asymmetrically for stride > 1 (and pads at all where torch's "
                "default is padding=0); torch pads explicitly and symmetrically",
                "padding=((p, p), ...) as in torch (ConvTranspose: convert.conv_transpose_padding)"),
    "stride": ("strides, dilation or feature groups differ from torch's", "copy stride/dilation/groups"),
    "running_stats": ("running statistics: nnx.BatchNorm updates var with the biased batch variance (torch: "
                      "unbiased) and keeps no num_batches_tracked; or one side is in train mode, the other in eval",
                      "crosscheck.flax_layers.BatchNorm, and the same train/eval mode on both sides"),
    "activation": ("the activation between two modules differs (ReLU, SiLU, a GELU variant)",
                   "use the activation torch's module applies"),
    "causal_mask": ("the attention's causal mask differs: missing (every position attends to later ones) or "
                    "applied where torch attends everywhere",
                    "nnx.make_causal_mask / mask= as torch's is_causal or attn_mask"),
    "attention_scale": ("the attention scores are scaled differently (torch: 1/sqrt(head_dim))",
                        "scale q @ k^T by 1/sqrt(head_dim), as torch's scaled_dot_product_attention"),
    "attention_heads": ("the attention splits the embedding into another number of heads",
                        "use torch's num_heads"),
    "glue": ("the module's inputs already differ although the modules before it agree: the code between "
             "modules (a function, a reshape, a mask) differs", "compare the forward code before this module"),
    "backward": ("the forward agrees but a gradient does not: a stop_gradient, a custom VJP, or a parameter "
                 "that is not an nnx.Param", "compare the backward path of this parameter"),
    "unknown": ("no known pitfall matches", "compare this module's code and configuration line by line"),
}

BAND_FACTOR = compare.BAND_FACTOR
# torch modules whose outputs of rank >= 3 are channels-first (the port's are channels-last)
_CHANNELS_FIRST = (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
                   torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd,
                   torch.nn.modules.instancenorm._InstanceNorm)


@dataclass
class ModuleGap:
    """One module's forward output: torch vs Flax, and the rounding band there."""

    name: str
    kind: str
    error: float  # max |flax - torch float32|
    band: float
    scale: float  # max |torch float64|

    @property
    def ok(self) -> bool:
        return self.error <= self.band


@dataclass
class Divergence:
    """``locate_divergence``'s answer: per-module gaps in execution order, gradient gaps, the verdict."""

    modules: list[ModuleGap] = field(default_factory=list)
    gradients: dict[str, float] = field(default_factory=dict)  # leaf -> max |flax - torch float32|
    gradient_bands: dict[str, float] = field(default_factory=dict)  # leaf -> its rounding band
    first: str | None = None  # the torch module name (or gradient leaf) where the port departs
    cause: str | None = None  # a PITFALLS key
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.first is None

    @property
    def conversion_at_fault(self) -> bool:
        """Whether the verdict blames the weight conversion (a kernel layout, a flatten order), not the code."""
        return self.cause in ("layout", "flatten")

    def __str__(self) -> str:
        if self.ok:
            return (f"no divergence: {len(self.modules)} module outputs within their rounding band, "
                    f"{len(self.gradients)} gradient leaves within theirs")
        what, fix = PITFALLS[self.cause]
        gap = next((m for m in self.modules if m.name == self.first), None)
        if gap is None:  # a container reported for the code between its children: the child that showed it
            gap = next((m for m in self.modules if m.name.startswith(f"{self.first}.") and not m.ok), None)
        size = (f"output off by {gap.error:.3g} (band {gap.band:.3g}, scale {gap.scale:.3g})" if gap
                else f"gradient off by {self.gradients.get(self.first, float('nan')):.3g} "
                     f"(band {self.gradient_bands.get(self.first, float('nan')):.3g})")
        return (f"first divergence at {self.first!r}: {size}; likely cause [{self.cause}]: {what}"
                + (f" ({self.detail})" if self.detail else "") + f"; fix: {fix}")

    def to_json(self) -> dict:
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731
        return {"ok": self.ok, "first": self.first, "cause": self.cause, "detail": self.detail,
                "cause_text": PITFALLS[self.cause][0] if self.cause else None,
                "fix": PITFALLS[self.cause][1] if self.cause else None,
                "modules": [{**asdict(m), "ok": m.ok} for m in self.modules],
                "gradients": {k: finite(v) for k, v in self.gradients.items()},
                "gradient_bands": {k: finite(v) for k, v in self.gradient_bands.items()}}

    def to_markdown(self) -> str:
        lines = [f"**{self}**", "", "| # | module | kind | error | band | scale | |", "|---|---|---|---|---|---|---|"]
        for i, m in enumerate(self.modules):
            lines.append(f"| {i} | `{m.name}` | {m.kind} | {m.error:.3g} | {m.band:.3g} | {m.scale:.3g} | "
                         f"{'ok' if m.ok else '**outside**'} |")
        lines += ["", "| gradient leaf | gap | band |", "|---|---|---|"]
        lines += [f"| `{k}` | {v:.3g} | {self.gradient_bands.get(k, float('nan')):.3g} |"
                  for k, v in self.gradients.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------- capture

def _as64(x) -> np.ndarray | None:
    if x is None:
        return None
    if torch.is_tensor(x):
        return as_numpy(x).astype(np.float64) if (x.is_floating_point() or x.dtype == torch.bool
                                                  or not x.is_complex()) else None
    try:
        return np.asarray(x, np.float64)
    except (TypeError, ValueError):
        return None


def _first_input(args, kwargs):
    arg = compare.first_array(list(args))
    return arg if arg is not None else compare.first_array(dict(kwargs))


def _torch_capture(model: torch.nn.Module, inputs: torch.Tensor, output=None, module_outputs=None):
    """(name -> (input, output) as float64 NumPy, the model's selected output) of every submodule's first call,
    in the order the calls return (children before their container)."""
    module_outputs = module_outputs or {}
    captured: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module, args, kwargs, out, name=name):
            if name not in captured:
                try:
                    value = compare.select_output(out, module_outputs.get(name))
                except (TypeError, AttributeError, KeyError, IndexError):
                    return  # an output without an array (a cache object): nothing to compare
                captured[name] = (_as64(_first_input(args, kwargs)), _as64(value))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    return captured, compare.select_output(out, output)


def _record(captured, key, args, kwargs, out, selector) -> None:
    if key in captured:
        return
    try:
        value = compare.select_output(out, selector)
    except (TypeError, AttributeError, KeyError, IndexError):
        return
    captured[key] = (_as64(_first_input(args, kwargs)), _as64(value))


def _flax_capture(model, inputs: jax.Array, module_outputs=None) -> tuple[dict, dict]:
    """(path -> (input, output), path -> module) of every submodule's first call, eagerly.

    nnx modules are recorded by swapping their class for a recording subclass; a linen module wrapped in
    ``nnx.bridge.ToNNX`` through linen's method interception (its paths are the linen scope names).
    Paths are tuples of strings (``("h", "0", "attn")``).
    """
    module_outputs = {_key(k): v for k, v in (module_outputs or {}).items()}
    captured: dict[tuple, tuple] = {}
    configs: dict[tuple, object] = {}
    if compare.is_linen_bridge(model):
        from flax import linen

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.scope.path) if context.module.scope is not None else ()
            if context.method_name == "__call__" and path:
                configs.setdefault(path, context.module)
                _record(captured, path, args, kwargs, out, module_outputs.get(path))
            return out

        with linen.intercept_methods(interceptor):
            compare.call_flax(model, inputs)
        return captured, configs
    swapped = []
    recorders: dict[type, type] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or not path or node.__class__ in recorders.values():
            continue
        cls = node.__class__
        if cls not in recorders:
            def call(self, *args, __cls=cls, **kwargs):
                out = __cls.__call__(self, *args, **kwargs)
                key = self.__dict__.get("_crosscheck_path")
                if key is not None:
                    _record(captured, key, args, kwargs, out, module_outputs.get(key))
                return out
            recorders[cls] = type(cls.__name__, (cls,), {"__call__": call})
        key = _key(path)
        configs.setdefault(key, node)
        object.__setattr__(node, "_crosscheck_path", key)
        node.__class__ = recorders[cls]
        swapped.append((node, cls))
    try:
        compare.call_flax(model, inputs)
    finally:
        for node, cls in swapped:
            node.__class__ = cls
            node.__dict__.pop("_crosscheck_path", None)
    return captured, configs


def _key(path) -> tuple[str, ...]:
    """A module path in one spelling for nnx, linen and torch: parts as strings, a list index joined to the
    name before it (nnx's ``("h", 0)``, linen's ``"h_0"`` and torch's ``"h.0"`` are all ``("h_0",)``)."""
    if isinstance(path, str):
        path = path.split("/") if "/" in path else path.split(".")
    out: list[str] = []
    for part in map(str, path):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _module_paths(torch_model: torch.nn.Module, layers: Sequence[convert.Layer]) -> dict[str, tuple]:
    """torch module name -> the (:func:`_key`) path of the Flax module it is matched with.

    A layer of the table gives its module's path; a bare parameter (``c_attn.weight`` at
    ``c_attn/kernel``) its owner's.  A container (``transformer.h.0.attn``) gets the path its
    descendants agree on, with as many trailing parts removed as the container is above them
    (``h/0/attn`` when its children are at ``h/0/attn/c_attn``, ``stages_0`` for torch's
    ``stages.0.layers.0`` when the port leaves out a level); other modules their torch name.
    """
    by_key = {_key(name): name for name, _ in torch_model.named_modules() if name}
    known: dict[str, tuple] = {}
    for layer in layers:
        if layer.kind in ("param", "buffer"):
            owner, _, _ = layer.torch_name.rpartition(".")
            if owner and len(layer.flax_path) > 1:
                known.setdefault(owner, _key(layer.flax_path[:-1]))
        else:
            known[layer.torch_name] = _key(layer.flax_path)
    votes: dict[str, dict[tuple, int]] = {}
    for name, path in known.items():
        parts = _key(name)
        for k in range(1, min(len(parts), len(path))):
            container = by_key.get(parts[:-k])
            if container is not None and container not in known:
                box = votes.setdefault(container, {})
                box[path[:-k]] = box.get(path[:-k], 0) + 1
    paths = {name: max(box, key=box.get) for name, box in votes.items()}
    paths.update(known)
    for name, _ in torch_model.named_modules():
        if name and name not in paths:
            paths[name] = _key(name)
    return paths


# ---------------------------------------------------------------- causes

def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    span = dilation * (kernel - 1) + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _flax_convention_momentum(fm) -> bool:
    """Whether a Flax BatchNorm's ``momentum`` weights the old statistics (nnx's and linen's) or the batch's."""
    from flax import linen
    return isinstance(fm, (nnx.BatchNorm, linen.BatchNorm))


def _is_batchnorm(fm) -> bool:
    from flax import linen
    return isinstance(fm, (nnx.BatchNorm, linen.BatchNorm, flax_layers.BatchNorm))


def _torch_eps(tm: torch.nn.Module, io) -> tuple[float | None, bool]:
    """(torch's normalization epsilon, measured?): its ``eps``, or measured from what it computed for a
    module of its own that normalizes its last axis (nanoGPT's LayerNorm passes a literal 1e-5)."""
    if isinstance(tm, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm,
                       torch.nn.modules.batchnorm._BatchNorm)):
        return (tm.eps if tm.eps is not None else float(torch.finfo(torch.float32).eps)), False
    w, b = _norm_params(tm)
    if w is None or io is None or io[0] is None:
        return None, False
    return layernorm_eps(io[0], io[1], w, b), True


def _norm_params(module: torch.nn.Module):
    """(weight, bias) as float64 when ``module`` holds exactly a 1-D weight (and optionally a 1-D bias)."""
    own = dict(module.named_parameters(recurse=False))
    w, b = own.get("weight", own.get("scale", own.get("gain"))), own.get("bias")
    if w is None or w.ndim != 1 or (b is not None and b.shape != w.shape) or len(own) != 1 + (b is not None):
        return None, None
    return as_numpy(w).astype(np.float64), None if b is None else as_numpy(b).astype(np.float64)


def layernorm_eps(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> float | None:
    """The epsilon of ``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the last axis, measured from
    values; None when ``y`` is no LayerNorm of ``x``.

    Per element, ((x - mean) * weight / (y - bias))^2 = var + eps; the median over well-conditioned
    elements (large |x - mean| and |weight|), less the row's biased variance.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.shape[-1] != weight.shape[0] or x.shape[-1] < 2:
        return None
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    centered = x2 - x2.mean(-1, keepdims=True)
    var = (centered ** 2).mean(-1, keepdims=True)
    shifted = y2 - (0.0 if bias is None else bias)
    good = (np.abs(centered) > 0.5 * np.sqrt(var)) & (np.abs(weight) > 0.1 * np.max(np.abs(weight)))
    good &= np.abs(shifted) > 1e-12
    if not good.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = (centered * weight / shifted) ** 2 - var
    eps = max(float(np.median(r2[good])), 0.0)
    again = centered / np.sqrt(var + eps) * weight + (0.0 if bias is None else bias)
    if float(np.max(np.abs(again - y2))) > 1e-4 * max(float(np.max(np.abs(y2))), 1e-30):
        return None
    return eps


def _eps_text(eps: float, measured: bool) -> str:
    return f"{eps:.2g} (measured)" if measured else f"{eps:g}"


def _config_cause(tm: torch.nn.Module, fm, torch_input: np.ndarray | None, torch_io=None,
                  flax_io=None) -> tuple[str, str] | None:
    """A configuration difference between the torch module and its Flax port (nnx or linen), as (pitfall, detail)."""
    def tup(v, n):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n

    if fm is None:
        return None
    is_bn = isinstance(tm, torch.nn.modules.batchnorm._BatchNorm)
    if not is_bn and not isinstance(tm, torch.nn.modules.conv._ConvNd):
        eps, measured = _torch_eps(tm, torch_io)
        if eps is not None:
            flax_eps, flax_measured = getattr(fm, "epsilon", None), False
            if flax_eps is None and flax_io is not None and flax_io[0] is not None:
                w, b = _norm_params(tm)
                flax_eps, flax_measured = (layernorm_eps(flax_io[0], flax_io[1], w, b) if w is not None
                                           else None), True
            if flax_eps is not None:
                tol = 0.2 if measured or flax_measured else 1e-6
                if not math.isclose(eps, flax_eps, rel_tol=tol, abs_tol=1e-9 if measured or flax_measured else 0):
                    what = "LayerNorm of its own (1-D weight, normalizes the last axis)" if measured else \
                        type(tm).__name__
                    return "epsilon", (f"torch {what} eps={_eps_text(eps, measured)}, Flax epsilon="
                                       f"{_eps_text(flax_eps, flax_measured)}")
    if is_bn:
        eps = getattr(fm, "epsilon", getattr(fm, "eps", None))
        if eps is not None and not math.isclose(tm.eps, eps, rel_tol=1e-6):
            return "epsilon", f"torch eps={tm.eps:g}, Flax epsilon={eps:g}"
        frozen = getattr(fm, "use_running_average", False)
        if frozen is not None and bool(frozen) == tm.training:
            return "running_stats", (f"torch {'train' if tm.training else 'eval'} mode, Flax "
                                     f"use_running_average={bool(frozen)}")
        if _flax_convention_momentum(fm) and not math.isclose(fm.momentum, 1 - (tm.momentum or 0), rel_tol=1e-6):
            return "momentum", (f"torch momentum={tm.momentum}, Flax {type(fm).__name__} momentum={fm.momentum} "
                                f"(Flax's weights the old statistics: want {1 - tm.momentum:g})")
        if isinstance(fm, flax_layers.BatchNorm) and not math.isclose(fm.momentum, tm.momentum or 0, rel_tol=1e-6):
            return "momentum", f"torch momentum={tm.momentum}, flax_layers.BatchNorm momentum={fm.momentum}"
    if isinstance(tm, torch.nn.modules.conv._ConvNd) and hasattr(fm, "strides") and hasattr(fm, "padding"):
        n = len(tm.kernel_size)
        groups = getattr(fm, "feature_group_count", 1)
        if tup(fm.strides or 1, n) != tuple(tm.stride) or tup(fm.kernel_dilation or 1, n) != tuple(tm.dilation) \
                or groups != tm.groups:
            return "stride", (f"torch stride={tm.stride} dilation={tm.dilation} groups={tm.groups}, Flax strides="
                              f"{fm.strides} kernel_dilation={fm.kernel_dilation} feature_group_count={groups}")
        transpose = hasattr(fm, "transpose_kernel")
        if isinstance(tm, torch.nn.modules.conv._ConvTransposeNd):
            if not transpose:
                return "layout", f"torch {type(tm).__name__} ported as {type(fm).__name__}"
            want = convert.conv_transpose_padding(tm)
            have = fm.padding if isinstance(fm.padding, str) else [tuple(p) for p in fm.padding]
            if have != want:
                return "padding", (f"torch padding={tm.padding} output_padding={tm.output_padding}: "
                                   f"Flax needs {want}, has {have}")
        elif transpose:
            return "layout", "a ConvTranspose ported as a Conv"
        elif not isinstance(tm.padding, str):
            want = [(p, p) for p in tm.padding]
            if isinstance(fm.padding, str):
                size = torch_input.shape[2:] if torch_input is not None else None
                have = ([_same_padding(s, k, st, d) for s, k, st, d in
                         zip(size, tm.kernel_size, tm.stride, tm.dilation)] if fm.padding == "SAME" and size
                        else [(0, 0)] * n if fm.padding == "VALID" else None)
                if have != want:
                    return "padding", f"torch padding={tm.padding}, Flax padding={fm.padding!r} (pads {have})"
            elif [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in fm.padding] != want:
                return "padding", f"torch padding={tm.padding}, Flax padding={fm.padding}"
    return None


def _close(a: np.ndarray, b: np.ndarray, band: float) -> bool:
    return a.shape == b.shape and float(np.max(np.abs(a - b), initial=0.0)) <= band


def _peak(x) -> float:
    return float(np.max(np.abs(x), initial=0.0))


# activations a port may swap for another (torch's exact GELU for jax.nn.gelu's tanh default, ...)
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "the exact GELU (erf)": lambda x: as_numpy(torch.nn.functional.gelu(torch.from_numpy(x))),
    "the tanh GELU": lambda x: as_numpy(torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh")),
    "ReLU": lambda x: np.maximum(x, 0.0),
    "SiLU": lambda x: x / (1 + np.exp(-x)),
    "the sigmoid GELU (x * sigmoid(1.702 x))": lambda x: x / (1 + np.exp(-1.702 * x)),
}


def _activation(before: np.ndarray, after: np.ndarray) -> str | None:
    tol = 1e-5 * max(_peak(after), 1.0)
    return next((name for name, f in _ACTIVATIONS.items() if _close(f(before), after, tol)), None)


def _heads(torch_module: torch.nn.Module | None, embed: int) -> list[int]:
    """Head counts to try: what the attention module says (num_heads, n_head, ...), else every divisor."""
    said = []
    for source in (torch_module, getattr(torch_module, "config", None)):
        for attr in ("num_heads", "n_head", "num_attention_heads", "n_heads"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0 and embed % value == 0:
                said.append(value)
        head_dim = getattr(source, "head_dim", None)
        if isinstance(head_dim, int) and head_dim > 0 and embed % head_dim == 0:
            said.append(embed // head_dim)
    return list(dict.fromkeys(said)) or [h for h in range(1, embed + 1) if embed % h == 0]


_SCALES = {"1/sqrt(head_dim)": lambda d, e: d ** -0.5, "1/head_dim": lambda d, e: 1.0 / d,
           "1 (no scale)": lambda d, e: 1.0, "1/sqrt(embed_dim)": lambda d, e: e ** -0.5}


def _attention(q, k, v, heads: int, causal: bool, scale: float) -> np.ndarray:
    *lead, t, e = q.shape
    split = lambda a: a.reshape(*lead, a.shape[-2], heads, e // heads).swapaxes(-2, -3)  # noqa: E731
    scores = split(q) @ split(k).swapaxes(-1, -2) * scale
    if causal:
        scores = np.where(np.tril(np.ones((t, k.shape[-2]), bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ split(v)
    return out.swapaxes(-2, -3).reshape(*lead, t, e)


def _attention_variant(q, k, v, target, heads_list) -> tuple[int, bool, str] | None:
    tol = 1e-4 * max(_peak(target), 1e-30)
    e = q.shape[-1]
    for heads in heads_list:
        for causal in (True, False):
            for scale_name, scale in _SCALES.items():
                if _close(_attention(q, k, v, heads, causal, scale(e // heads, e)), target, tol):
                    return heads, causal, scale_name
    return None


def _qkv_sources(name: str, t_in: np.ndarray, order: list[str], torch_cap: dict, flax_outputs: dict):
    """((q, k, v) torch, (q, k, v) Flax) from the modules before ``name`` in its container whose outputs agree:
    one fused projection of width 3E (GPT-2's c_attn, split q, k, v), or query/key/value projections."""
    parent = name.rpartition(".")[0]
    before = [n for n in order[:order.index(name)] if n.rpartition(".")[0] == parent and n in flax_outputs
              and torch_cap[n][1] is not None]
    e = t_in.shape[-1]
    for n in reversed(before):
        out = torch_cap[n][1]
        if out.shape[:-1] == t_in.shape[:-1] and out.shape[-1] == 3 * e:
            return np.split(out, 3, -1), np.split(flax_outputs[n], 3, -1)
    found = {}
    for n in before:
        last = n.rpartition(".")[2].lower()
        role = next((r for r, names in (("q", ("q", "query", "q_proj", "wq")), ("k", ("k", "key", "k_proj", "wk")),
                                        ("v", ("v", "value", "v_proj", "wv"))) if last in names), None)
        if role and torch_cap[n][1].shape[-1] == e:
            found[role] = n
    if len(found) == 3:
        names = [found[r] for r in "qkv"]
        return [torch_cap[n][1] for n in names], [flax_outputs[n] for n in names]
    return None


def _glue_cause(name: str, tm_parent, t_in, f_in, order, torch_cap, flax_outputs) -> tuple[str, str] | None:
    """The code between modules: an activation swapped, or attention with another mask or scale."""
    for prev in reversed(order[:order.index(name)]):
        p_t, p_f = torch_cap[prev][1], flax_outputs.get(prev)
        if p_f is None or p_t is None or p_t.shape != t_in.shape or p_f.shape != f_in.shape:
            continue
        torch_fn, flax_fn = _activation(p_t, t_in), _activation(p_f, f_in)
        if torch_fn and flax_fn and torch_fn != flax_fn:
            cause = "gelu" if "GELU" in torch_fn and "GELU" in flax_fn else "activation"
            return cause, f"between {prev} and {name} torch applies {torch_fn}, the port {flax_fn}"
        break
    sources = _qkv_sources(name, t_in, order, torch_cap, flax_outputs)
    if sources is not None:
        heads = _heads(tm_parent, t_in.shape[-1])
        torch_variant = _attention_variant(*sources[0], t_in, heads)
        flax_variant = _attention_variant(*sources[1], f_in, heads)
        if torch_variant and flax_variant and torch_variant != flax_variant:
            (h, causal, scale), (fh, fcausal, fscale) = torch_variant, flax_variant
            if causal != fcausal:
                return "causal_mask", (f"torch's attention before {name} is {'' if causal else 'not '}causal, the "
                                       f"port's {'is' if fcausal else 'has no causal mask'}")
            if scale != fscale:
                return "attention_scale", (f"torch scales the attention scores by {scale}, the port by {fscale} "
                                           f"({h} heads)")
            return "attention_heads", f"torch splits {h} heads, the port {fh}"
        if torch_variant and not flax_variant:
            return "glue", (f"the port's attention before {name} is none of: causal or not, scaled by "
                            f"{', '.join(_SCALES)}")
    return None


def _linear_layout(tm: torch.nn.Module, t_in, t_out, f_out) -> str | None:
    """A module holding a 2-D ``weight`` that computes x @ W.T + b (torch's Linear) or x @ W + b (HF's Conv1D,
    stored (in, out)): the Flax output is the other one, i.e. its kernel is transposed."""
    own = dict(tm.named_parameters(recurse=False))
    w, b = own.get("weight"), own.get("bias")
    if w is None or w.ndim != 2 or w.shape[0] != w.shape[1] or t_in.shape[-1] != w.shape[0]:
        return None
    w = as_numpy(w).astype(np.float64)
    b = 0.0 if b is None else as_numpy(b).astype(np.float64)
    tol = lambda y: 1e-4 * max(_peak(y), 1.0)  # noqa: E731
    as_linear, as_conv1d = t_in @ w.T + b, t_in @ w + b
    stored = "(out, in), a Linear" if _close(as_linear, t_out, tol(t_out)) else         "(in, out), like HF's Conv1D" if _close(as_conv1d, t_out, tol(t_out)) else None
    if stored is None:
        return None
    other = as_conv1d if stored.startswith("(out") else as_linear
    if f_out.shape == other.shape and _close(other, f_out, tol(other)):
        return f"the Flax kernel is torch's weight transposed: torch stores it {stored}"
    return None


def _numeric_cause(name: str, tm: torch.nn.Module, torch_io, flax_io, band: float, order: list[str],
                   torch_cap: dict, flax_outputs: dict, tm_parent=None) -> tuple[str, str] | None:
    """Test the signatures of the pitfalls that show in values, not in configuration."""
    t_in, t_out = torch_io
    f_in, f_out = flax_io
    if t_in is None or f_in is None:
        return None
    t_in_aligned = t_in if t_in.shape == f_in.shape or t_in.ndim < 3 else np.moveaxis(t_in, 1, -1)
    input_band = band * max(_peak(t_in_aligned), 1e-30) / max(_peak(t_out), 1e-30)
    inputs_agree = _close(t_in_aligned, f_in, max(input_band, compare.ULPS * _peak(t_in)))
    if not inputs_agree:
        if (t_in.shape == f_in.shape and t_in.ndim >= 2 and dict(tm.named_parameters(recurse=False)).get(
                "weight") is not None and np.allclose(np.sort(t_in, axis=-1), np.sort(f_in, axis=-1), rtol=1e-5,
                                                      atol=1e-6) and not np.allclose(t_in, f_in, rtol=1e-5, atol=1e-6)):
            shape = _flatten_shape(t_in.shape[-1], [torch_cap[n][1].shape for n in order[:order.index(name)]
                                                    if torch_cap[n][1] is not None])
            where = tuple(shape) if shape else "(C, H, W)"
            return "flatten", f"its inputs are a permutation of torch's; flatten_from={where}"
        if t_in.shape == f_in.shape:
            found = _glue_cause(name, tm_parent, t_in, f_in, order, torch_cap, flax_outputs)
            if found:
                return found
        return "glue", "its inputs already differ from torch's"
    # inputs agree, output does not: the module itself
    transposed = _linear_layout(tm, t_in, t_out, f_out) if t_in.shape == f_in.shape else None
    if transposed:
        return "layout", transposed
    if isinstance(tm, torch.nn.modules.conv._ConvTransposeNd):
        return "layout", "a ConvTranspose kernel in the other Flax convention (transpose_kernel) or flipped"
    if isinstance(tm, torch.nn.modules.conv._ConvNd | torch.nn.Linear):
        return "layout", "inputs agree, outputs do not, configuration matches"
    return None


def _flatten_shape(features: int, earlier: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The (C, *spatial) a Linear's ``features`` inputs were flattened from: an earlier channels-first output of
    that size, else the last one's channels with square spatial dims (a pool between them is not a module)."""
    for shape in reversed(earlier):
        if len(shape) >= 3 and int(np.prod(shape[1:])) == features:
            return tuple(shape[1:])
    for shape in reversed(earlier):
        if len(shape) >= 3 and features % shape[1] == 0:
            side = round((features // shape[1]) ** (1 / (len(shape) - 2)))
            if side ** (len(shape) - 2) == features // shape[1]:
                return (shape[1], *([side] * (len(shape) - 2)))
            return None
    return None


def stats_cause(leaf: str, flax_stats: dict, torch_stats: dict) -> str:
    """The likely cause of a batch-statistics mismatch at ``leaf`` (``"bn1/var"``), read from the values of the
    layer's statistics (``{"bn1/mean": ..., "bn1/var": ...}`` on each side).

    Momentum of the other convention moves the running *mean* by a multiple of its own scale (torch's
    0.1 read as Flax's weight of the old value keeps 0.9 of the batch mean instead of 0.1: 8x after
    one step from 0); a biased running variance leaves the mean exact and moves the variance by
    momentum x var / n.
    """
    layer = leaf.rpartition("/")[0]
    mean_f, mean_t = flax_stats.get(f"{layer}/mean"), torch_stats.get(f"{layer}/mean")
    var_f, var_t = flax_stats.get(f"{layer}/var"), torch_stats.get(f"{layer}/var")
    rel = lambda f, t: _peak(np.asarray(f, np.float64) - np.asarray(t, np.float64)) / max(_peak(t), 1e-30)  # noqa
    if mean_f is not None and mean_t is not None:
        mean_gap = rel(mean_f, mean_t)
        if mean_gap > 0.1:
            return (f"{layer}/mean is off by {mean_gap:.3g}x its scale: the momentum signature "
                    f"[momentum]: {PITFALLS['momentum'][0]}; fix: {PITFALLS['momentum'][1]}")
        if var_f is not None and var_t is not None and mean_gap < 1e-4:
            f, t = np.asarray(var_f, np.float64), np.asarray(var_t, np.float64)
            return (f"{layer}/mean agrees, {layer}/var is off by {rel(var_f, var_t):.3g} of its scale, "
                    f"{'below' if float(np.mean(f - t)) < 0 else 'above'} torch's: "
                    + ("the biased batch variance (nnx/linen BatchNorm store it; torch the unbiased n/(n-1)): "
                       "use crosscheck.flax_layers.BatchNorm" if float(np.mean(f - t)) < 0
                       else PITFALLS["running_stats"][0]))
    return f"{leaf}: {PITFALLS['running_stats'][0]}"


# ---------------------------------------------------------------- the locator

def locate_divergence(torch_model: torch.nn.Module, flax_model: nnx.Module, batch, *,
                      layers: Sequence[convert.Layer] | None = None,
                      to_flax_input: Callable[[np.ndarray], np.ndarray] | None = None,
                      torch_loss: Callable | None = None, flax_loss: Callable | None = None,
                      output=None, torch_output=None, flax_output=None,
                      torch_module_outputs: dict | None = None, flax_module_outputs: dict | None = None,
                      band_factor: float = BAND_FACTOR, convert_weights: bool = True) -> Divergence:
    """Run both models on ``batch`` ((inputs, labels) in torch's layout, or inputs alone) and find where they part.

    ``flax_model``: an ``nnx.Module``, or a linen module wrapped in ``nnx.bridge.ToNNX`` (initialized,
    e.g. with ``nnx.bridge.lazy_init``).  Returns a :class:`Divergence`: every matched module's output
    error and rounding band in torch's execution order (every torch submodule, containers included,
    whose Flax counterpart was called; the model's output last, as ``"(output)"``), every gradient
    leaf's gap and rounding band (when labels are given), the first module outside its band (or
    gradient leaf outside its band) and its likely cause from :data:`PITFALLS`.

    Outputs may be any pytree: ``output`` (or ``torch_output``/``flax_output`` for one side) selects the
    array to compare (:func:`crosscheck.port.compare.select_output`: default ``.logits`` if there is one,
    else the first array), and ``torch_module_outputs`` (by torch module name) /
    ``flax_module_outputs`` (by Flax path, ``"h/0/attn"``) do the same for submodules.  With
    ``convert_weights`` (default) the torch weights are first written into (a copy of) the Flax model,
    so only the port's code is under test.
    """
    compare.check_flax_model(flax_model)
    inputs, labels = batch if isinstance(batch, tuple) else (batch, None)
    inputs = np.asarray(inputs)
    to_flax_input = to_flax_input or compare.channels_last
    torch_loss = torch_loss or losses.torch_cross_entropy
    flax_loss = flax_loss or losses.flax_cross_entropy
    torch_output = output if torch_output is None else torch_output
    flax_output = output if flax_output is None else flax_output
    layers = list(layers) if layers is not None else convert.layers_of(torch_model, like=flax_model)
    torch32 = copy.deepcopy(torch_model)
    flax_copy = nnx.clone(flax_model)
    if convert_weights:
        nnx.update(flax_copy, convert.torch_to_nnx(torch32.state_dict(), layers, flax_copy))
    torch64 = copy.deepcopy(torch32).double()
    x32 = torch.from_numpy(inputs)
    x64 = x32.double() if x32.is_floating_point() else x32
    with torch.no_grad():
        cap32, out32 = _torch_capture(copy.deepcopy(torch32), x32, torch_output, torch_module_outputs)
        cap64, out64 = _torch_capture(torch64, x64, torch_output, torch_module_outputs)
    flax_in = jnp.asarray(to_flax_input(inputs))
    capf, configs = _flax_capture(nnx.clone(flax_copy), flax_in, flax_module_outputs)
    out_f = compare.select_output(compare.call_flax(nnx.clone(flax_copy), flax_in), flax_output)
    cap32["(output)"], cap64["(output)"] = (None, _as64(out32)), (None, _as64(out64))
    capf[("(output)",)] = (None, _as64(out_f))

    paths = _module_paths(torch32, layers)
    paths["(output)"] = ("(output)",)
    modules = dict(torch32.named_modules())
    modules["(output)"] = torch32
    order = list(cap32)  # hooks fire when a module returns: children before parents
    result = Divergence()
    flax_outputs = {}  # torch name -> the Flax output of the same module (as captured, Flax layout)
    for name in order:
        path = paths.get(name)
        if path not in capf or capf[path][1] is None or cap32[name][1] is None:
            continue
        f_in, f_out = capf[path]
        channels_first = True if isinstance(modules[name], _CHANNELS_FIRST) else None
        try:
            t32 = compare.align_to_flax(cap32[name][1], f_out, channels_first)
            # the float64 run in the layout chosen for float32 (its values are what decide it)
            moved = t32.shape != cap32[name][1].shape or not np.array_equal(t32, cap32[name][1])
            t64 = np.moveaxis(cap64[name][1], 1, -1) if moved else cap64[name][1]  # the float32 run's layout
        except AssertionError:
            continue
        flax_outputs[name] = f_out
        band = compare.rounding_band(t32, t64, band_factor)
        gap = ModuleGap(name, type(modules[name]).__name__, _peak(f_out - t32), band, _peak(t64))
        result.modules.append(gap)
        if result.first is None and not gap.ok:
            result.first = name
            parent = name.rpartition(".")[0] if name != "(output)" else ""
            found = _config_cause(modules[name], configs.get(path), cap32[name][0], cap32[name], capf[path])
            found = found or _numeric_cause(name, modules[name], cap32[name], (f_in, f_out), band, order, cap32,
                                            flax_outputs, modules.get(parent))
            if found is None and name == "(output)":
                found = "glue", "every matched module agrees: the code after the last one differs"
            result.cause, result.detail = found or ("unknown", "")
            if result.cause in _CODE_BETWEEN_CHILDREN and parent and paths.get(parent) in capf:
                result.detail += f" (in the code of {parent!r})"
                result.first = parent  # the code between two children of this container is where it differs
    # BatchNorm configuration can be wrong with the forward right (eval mode, momentum): check them all.
    if result.first is None:
        for name, module in modules.items():
            fm = configs.get(paths.get(name))
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and fm is not None:
                found = _config_cause(module, fm, None)
                if found:
                    result.first, (result.cause, result.detail) = name, found
                    break
    if labels is not None:
        result.gradients, result.gradient_bands = _gradient_gaps(
            torch32, flax_copy, inputs, flax_in, labels, layers, torch_loss, flax_loss, torch_output, flax_output,
            band_factor)
        if result.first is None:
            # the leaf nearest the output (last in torch's parameter order) whose gradient is off:
            # the backward pass breaks just before it
            over = [leaf for leaf, gap in result.gradients.items() if not gap <= result.gradient_bands[leaf]]
            if over:
                result.first, result.cause = over[-1], "backward"
    return result


# causes that live in the code between two modules: reported at the container whose code it is
_CODE_BETWEEN_CHILDREN = {"gelu", "activation", "causal_mask", "attention_scale", "attention_heads"}


def gradient_check(torch_model, flax_model, torch_in, flax_in, labels, layers, torch_loss, flax_loss,
                   torch_output=None, flax_output=None, band_factor: float = BAND_FACTOR):
    """(torch float32 gradients, Flax gradients, rounding bands), by Flax leaf name (``"h/0/attn/c_attn/kernel"``),
    plus (torch float32 loss, float64 losses) and (float32, float64 outputs): one float32 and
    1 + ``compare.PERTURBED_RUNS`` float64 torch runs, one Flax run."""
    x = torch.from_numpy(np.asarray(torch_in))
    y = np.asarray(labels)
    out32, loss32, g32 = compare.torch_run(torch_model, x, torch.from_numpy(y), torch_loss, torch_output)
    refs = compare.torch_references(torch_model, x, torch.from_numpy(y), torch_loss, torch_output)
    to_flax = lambda g: {"/".join(map(str, p)): v for p, v in  # noqa: E731
                         weights.params_to_flax_flat(g, layers).items()}
    t32 = to_flax(g32)
    t64s = [to_flax(g) for _, _, g in refs]
    _, _, grads = compare.loss_and_grads(nnx.clone(flax_model), flax_in, jnp.asarray(y), flax_loss, flax_output)
    flax = {"/".join(map(str, p)): np.asarray(v) for p, v in trees.flatten(nnx.to_pure_dict(grads)).items()}
    bands = compare.gradient_bands(t32, t64s, band_factor)
    return t32, {k: flax[k] for k in t32 if k in flax}, bands, (loss32, [l for _, l, _ in refs]), \
        (out32, [o for o, _, _ in refs])


def _gradient_gaps(torch_model, flax_model, torch_in, flax_in, labels, layers, torch_loss, flax_loss,
                   torch_output, flax_output, band_factor) -> tuple[dict, dict]:
    t32, flax, bands, _, _ = gradient_check(torch_model, flax_model, torch_in, flax_in, labels, layers, torch_loss,
                                            flax_loss, torch_output, flax_output, band_factor)
    gaps = compare.absolute_gaps(flax, t32)
    return gaps, {k: bands[k] for k in gaps}


def write_report(divergence: Divergence, directory, title: str = "port check", checks: dict | None = None) -> list:
    """report.md, report.json (strict) and errors.png (per-module error and band) in ``directory``, written together.

    ``checks``: further results (the ``port`` command's parity and resume checks), added to both reports.
    """
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crosscheck.common.report import strict_json, write_report

    directory = Path(directory)
    data = {"title": title, **divergence.to_json(), **({"checks": checks} if checks else {})}
    text_md = f"# {title}\n\n{divergence.to_markdown()}\n"
    if checks:
        text_md += "\n## Checks\n\n" + "\n".join(f"- {k}: {v}" for k, v in checks.items()) + "\n"
    text_json = strict_json(data)
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(divergence.modules)), 4))
    xs = range(len(divergence.modules))
    tiny = 1e-30
    ax.semilogy(xs, [max(m.error, tiny) for m in divergence.modules], "o-", label="|Flax - torch|")
    ax.semilogy(xs, [max(m.band, tiny) for m in divergence.modules], "k--", label="rounding band")
    ax.set_xticks(list(xs), [m.name for m in divergence.modules], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("max abs error of the module output")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    paths = [directory / n for n in ("report.md", "report.json", "errors.png")]
    write_report({paths[0]: text_md, paths[1]: text_json}, paths[2], fig)
    return paths
