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
from crosscheck.convert.layers import default_flax_path
from crosscheck.port import compare

# The table of known porting pitfalls: key -> (what happens, the fix).  README "Porting" shows it.
PITFALLS: dict[str, tuple[str, str]] = {
    "layout": ("a kernel in the wrong layout: a Linear kernel not transposed, a conv kernel not moved to (*K, I, O), "
               "a ConvTranspose converted as a conv or with the other transpose_kernel convention",
               "use convert.layers_of (kind conv_transpose, transpose_kernel=...) and torch_to_nnx"),
    "flatten": ("torch flattens NCHW, the port NHWC: the Linear after the flatten sees its inputs permuted",
                "layers_of(..., flatten_from={name: (C, H, W)})"),
    "gelu": ("jax.nn.gelu defaults to approximate=True (tanh), torch's GELU is exact",
             "jax.nn.gelu(x, approximate=False), or nn.GELU(approximate='tanh') in torch"),
    "epsilon": ("a normalization epsilon differs: nnx.LayerNorm/RMSNorm default 1e-6, torch 1e-5 "
                "(RMSNorm: torch's eps=None is the dtype's machine epsilon)",
                "pass epsilon= equal to torch's eps"),
    "momentum": ("BatchNorm momentum: Flax's is the weight of the old statistics (torch's 0.1 is Flax's 0.9)",
                 "nnx.BatchNorm(momentum=1 - torch_momentum), or crosscheck.flax_layers.BatchNorm"),
    "padding": ("padding: Flax's default 'SAME' pads asymmetrically for stride > 1 (and pads at all where torch's "
                "default is padding=0); torch pads explicitly and symmetrically",
                "padding=((p, p), ...) as in torch (ConvTranspose: convert.conv_transpose_padding)"),
    "stride": ("strides, dilation or feature groups differ from torch's", "copy stride/dilation/groups"),
    "running_stats": ("running statistics: nnx.BatchNorm updates var with the biased batch variance (torch: "
                      "unbiased) and keeps no num_batches_tracked; or one side is in train mode, the other in eval",
                      "crosscheck.flax_layers.BatchNorm, and the same train/eval mode on both sides"),
    "glue": ("the module's inputs already differ although the modules before it agree: the code between "
             "modules (a function, a reshape, a mask) differs", "compare the forward code before this module"),
    "backward": ("the forward agrees but a gradient does not: a stop_gradient, a custom VJP, or a parameter "
                 "that is not an nnx.Param", "compare the backward path of this parameter"),
    "unknown": ("no known pitfall matches", "compare this module's code and configuration line by line"),
}

BAND_FACTOR = 32.0
# torch modules whose outputs of rank >= 3 are channels-first (the port's are channels-last)
_CHANNELS_FIRST = (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
                   torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd,
                   torch.nn.modules.instancenorm._InstanceNorm)
_ULPS = 8 * 2.0 ** -23  # a few float32 ulps of an output's scale: the band of an exactly-computed output


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
    gradients: dict[str, float] = field(default_factory=dict)  # leaf -> relative gap
    grad_tol: float = 1e-2
    first: str | None = None  # the torch module name (or gradient leaf) where the port departs
    cause: str | None = None  # a PITFALLS key
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.first is None

    def __str__(self) -> str:
        if self.ok:
            return (f"no divergence: {len(self.modules)} module outputs within their rounding band, "
                    f"{len(self.gradients)} gradient leaves within {self.grad_tol:g}")
        what, fix = PITFALLS[self.cause]
        gap = next((m for m in self.modules if m.name == self.first), None)
        size = (f"output off by {gap.error:.3g} (band {gap.band:.3g}, scale {gap.scale:.3g})" if gap
                else f"gradient off by {self.gradients.get(self.first, float('nan')):.3g} of its scale")
        return (f"first divergence at {self.first!r}: {size}; likely cause [{self.cause}]: {what}"
                + (f" ({self.detail})" if self.detail else "") + f"; fix: {fix}")

    def to_json(self) -> dict:
        return {"ok": self.ok, "first": self.first, "cause": self.cause, "detail": self.detail,
                "cause_text": PITFALLS[self.cause][0] if self.cause else None,
                "fix": PITFALLS[self.cause][1] if self.cause else None,
                "modules": [{**asdict(m), "ok": m.ok} for m in self.modules],
                "gradients": {k: (v if math.isfinite(v) else None) for k, v in self.gradients.items()},
                "grad_tol": self.grad_tol}

    def to_markdown(self) -> str:
        lines = [f"**{self}**", "", "| # | module | kind | error | band | scale | |", "|---|---|---|---|---|---|---|"]
        for i, m in enumerate(self.modules):
            lines.append(f"| {i} | `{m.name}` | {m.kind} | {m.error:.3g} | {m.band:.3g} | {m.scale:.3g} | "
                         f"{'ok' if m.ok else '**outside**'} |")
        lines += ["", "| gradient leaf | gap (of its scale) |", "|---|---|"]
        lines += [f"| `{k}` | {v:.3g} |" for k, v in self.gradients.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------- capture

def _first_array(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _torch_capture(model: torch.nn.Module, inputs: torch.Tensor):
    """(name -> (input, output) as float64 NumPy, execution order) of every submodule's first call."""
    captured: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module, args, out, name=name):
            if name not in captured:
                arg = _first_array(args) if args else None
                captured[name] = (as_numpy(arg).astype(np.float64) if torch.is_tensor(arg) else None,
                                  as_numpy(_first_array(out)).astype(np.float64))
        handles.append(module.register_forward_hook(hook))
    try:
        out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    return captured, out


def _flax_capture(model: nnx.Module, inputs: jax.Array) -> dict[tuple, tuple]:
    """path -> (input, output) of every submodule's first call (eager, by class swapping)."""
    captured: dict[tuple, tuple] = {}
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
                if key is not None and key not in captured:
                    arg = _first_array(args) if args else None
                    captured[key] = (None if arg is None else np.asarray(arg, np.float64),
                                     np.asarray(_first_array(out), np.float64))
                return out
            recorders[cls] = type(cls.__name__, (cls,), {"__call__": call})
        object.__setattr__(node, "_crosscheck_path", tuple(path))
        node.__class__ = recorders[cls]
        swapped.append((node, cls))
    try:
        model(inputs)
    finally:
        for node, cls in swapped:
            node.__class__ = cls
            node.__dict__.pop("_crosscheck_path", None)
    return captured


# ---------------------------------------------------------------- causes

def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    span = dilation * (kernel - 1) + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _config_cause(tm: torch.nn.Module, fm, torch_input: np.ndarray | None) -> tuple[str, str] | None:
    """A configuration difference between the torch module and its Flax port, as (pitfall, detail)."""
    def tup(v, n):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n

    if isinstance(tm, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)) and hasattr(fm, "epsilon"):
        eps = tm.eps if tm.eps is not None else float(torch.finfo(torch.float32).eps)
        if not math.isclose(eps, fm.epsilon, rel_tol=1e-6):
            return "epsilon", f"torch eps={eps:g}, Flax epsilon={fm.epsilon:g}"
    if isinstance(tm, torch.nn.modules.batchnorm._BatchNorm):
        eps = getattr(fm, "epsilon", getattr(fm, "eps", None))
        if eps is not None and not math.isclose(tm.eps, eps, rel_tol=1e-6):
            return "epsilon", f"torch eps={tm.eps:g}, Flax epsilon={eps:g}"
        frozen = bool(getattr(fm, "use_running_average", False))
        if frozen == tm.training:
            return "running_stats", (f"torch {'train' if tm.training else 'eval'} mode, Flax "
                                     f"use_running_average={frozen}")
        if isinstance(fm, nnx.BatchNorm) and not math.isclose(fm.momentum, 1 - (tm.momentum or 0), rel_tol=1e-6):
            return "momentum", f"torch momentum={tm.momentum}, Flax momentum={fm.momentum} (want {1 - tm.momentum:g})"
        if isinstance(fm, flax_layers.BatchNorm) and not math.isclose(fm.momentum, tm.momentum or 0, rel_tol=1e-6):
            return "momentum", f"torch momentum={tm.momentum}, flax_layers.BatchNorm momentum={fm.momentum}"
    if isinstance(tm, torch.nn.modules.conv._ConvNd) and isinstance(fm, (nnx.Conv, nnx.ConvTranspose)):
        n = len(tm.kernel_size)
        if tup(fm.strides or 1, n) != tuple(tm.stride) or tup(fm.kernel_dilation or 1, n) != tuple(tm.dilation) \
                or getattr(fm, "feature_group_count", 1) != tm.groups:
            return "stride", (f"torch stride={tm.stride} dilation={tm.dilation} groups={tm.groups}, Flax strides="
                              f"{fm.strides} kernel_dilation={fm.kernel_dilation} "
                              f"feature_group_count={getattr(fm, 'feature_group_count', 1)}")
        if isinstance(tm, torch.nn.modules.conv._ConvTransposeNd):
            if not isinstance(fm, nnx.ConvTranspose):
                return "layout", f"torch {type(tm).__name__} ported as {type(fm).__name__}"
            want = convert.conv_transpose_padding(tm)
            have = fm.padding if isinstance(fm.padding, str) else [tuple(p) for p in fm.padding]
            if have != want:
                return "padding", (f"torch padding={tm.padding} output_padding={tm.output_padding}: "
                                   f"Flax needs {want}, has {have}")
        elif isinstance(fm, nnx.Conv) and not isinstance(tm.padding, str):
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
    if isinstance(tm, torch.nn.ConvTranspose2d | torch.nn.ConvTranspose1d | torch.nn.ConvTranspose3d) \
            and isinstance(fm, nnx.Conv):
        return "layout", "a ConvTranspose ported as a Conv"
    return None


def _close(a: np.ndarray, b: np.ndarray, band: float) -> bool:
    return a.shape == b.shape and float(np.max(np.abs(a - b), initial=0.0)) <= band


def _numeric_cause(name: str, tm: torch.nn.Module, torch_io, flax_io, band: float, order: list[str],
                   torch_cap: dict, flax_outputs: dict) -> tuple[str, str] | None:
    """Test the signatures of the pitfalls that show in values, not in configuration."""
    t_in, t_out = torch_io
    f_in, f_out = flax_io
    if t_in is not None and f_in is not None:
        t_in_aligned = t_in if t_in.shape == f_in.shape or t_in.ndim < 3 else np.moveaxis(t_in, 1, -1)
        input_band = band * max(float(np.max(np.abs(t_in_aligned), initial=0.0)), 1e-30) / max(
            float(np.max(np.abs(t_out), initial=0.0)), 1e-30)
        inputs_agree = _close(t_in_aligned, f_in, max(input_band, _ULPS * float(np.max(np.abs(t_in), initial=0))))
        if not inputs_agree:
            if (isinstance(tm, torch.nn.Linear) and t_in.shape == f_in.shape
                    and np.allclose(np.sort(t_in, axis=-1), np.sort(f_in, axis=-1), rtol=1e-5, atol=1e-6)):
                shape = _flatten_shape(t_in.shape[-1], [torch_cap[n][1].shape for n in order[:order.index(name)]])
                where = tuple(shape) if shape else "(C, H, W)"
                return "flatten", f"its inputs are a permutation of torch's; flatten_from={where}"
            # gelu between the previous module and this one: torch's input is gelu_exact(p), the port's
            # gelu_tanh(p) of its own (agreeing) p.
            for prev in reversed(order[:order.index(name)]):
                p_t = torch_cap[prev][1]
                p_f = flax_outputs.get(prev)
                if p_f is None or p_t.shape != t_in.shape:
                    continue
                tol = 1e-5 * max(float(np.max(np.abs(t_in))), 1.0)
                if (_close(as_numpy(torch.nn.functional.gelu(torch.from_numpy(p_t))), t_in, tol)
                        and _close(np.asarray(jax.nn.gelu(p_f, approximate=True), np.float64), f_in, tol)):
                    return "gelu", f"{name}'s input is jax.nn.gelu(approximate=True) of {prev}'s output"
                break
            return "glue", "its inputs already differ from torch's"
        # inputs agree, output does not: the module itself
        if isinstance(tm, torch.nn.Linear) and tm.in_features == tm.out_features:
            w = tm.weight.detach().double()
            alt = as_numpy(torch.nn.functional.linear(torch.from_numpy(t_in), w.T,
                                                      None if tm.bias is None else tm.bias.detach().double()))
            if _close(alt, f_out, 1e-4 * max(float(np.max(np.abs(alt))), 1.0)):
                return "layout", "the Flax kernel is torch's weight untransposed"
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


def stats_cause(leaf: str, flax_model: nnx.Module) -> str:
    """The likely cause of a batch-statistics mismatch at ``leaf`` ("bn1/var")."""
    path = tuple(int(p) if p.isdigit() else p for p in leaf.split("/")[:-1])
    module = weights.module_at(flax_model, path)
    if isinstance(module, nnx.BatchNorm):
        return (f"{leaf}: nnx.BatchNorm updates running var with the biased batch variance and momentum "
                f"{module.momentum} weights the old value; torch uses the unbiased variance: use "
                "crosscheck.flax_layers.BatchNorm")
    return f"{leaf}: {PITFALLS['running_stats'][0]}"


# ---------------------------------------------------------------- the locator

def locate_divergence(torch_model: torch.nn.Module, flax_model: nnx.Module, batch, *,
                      layers: Sequence[convert.Layer] | None = None,
                      to_flax_input: Callable[[np.ndarray], np.ndarray] | None = None,
                      torch_loss: Callable | None = None, flax_loss: Callable | None = None,
                      grad_tol: float = 1e-2, band_factor: float = BAND_FACTOR,
                      convert_weights: bool = True) -> Divergence:
    """Run both models on ``batch`` ((inputs, labels) in torch's layout, or inputs alone) and find where they part.

    Returns a :class:`Divergence`: every matched module's output error and
    rounding band in torch's execution order, every gradient leaf's gap (when
    labels are given), the first module outside its band (or gradient leaf
    beyond ``grad_tol``) and its likely cause from :data:`PITFALLS`.  With
    ``convert_weights`` (default) the torch weights are first written into
    (a copy of) the Flax model, so only the port's code is under test.
    """
    inputs, labels = batch if isinstance(batch, tuple) else (batch, None)
    inputs = np.asarray(inputs)
    to_flax_input = to_flax_input or compare.channels_last
    torch_loss = torch_loss or losses.torch_cross_entropy
    flax_loss = flax_loss or losses.flax_cross_entropy
    layers = list(layers) if layers is not None else convert.layers_of(torch_model)
    torch32 = copy.deepcopy(torch_model)
    flax_copy = nnx.clone(flax_model)
    if convert_weights:
        nnx.update(flax_copy, convert.torch_to_nnx(torch32.state_dict(), layers, flax_copy))
    torch64 = copy.deepcopy(torch32).double()
    x32 = torch.from_numpy(inputs)
    x64 = x32.double() if x32.is_floating_point() else x32
    with torch.no_grad():
        cap32, _ = _torch_capture(torch32, x32)
        cap64, _ = _torch_capture(torch64, x64)
    flax_in = jnp.asarray(to_flax_input(inputs))
    capf = _flax_capture(nnx.clone(flax_copy), flax_in)

    paths = {layer.torch_name: layer.flax_path for layer in layers}
    modules = dict(torch32.named_modules())
    order = list(cap32)  # hooks fire when a module returns: children before parents
    result = Divergence(grad_tol=grad_tol)
    flax_outputs = {}  # torch name -> the Flax output of the same module (as captured, Flax layout)
    for name in order:
        path = paths.get(name, default_flax_path(name))
        if path not in capf:
            continue
        f_in, f_out = capf[path]
        flax_outputs[name] = f_out
        channels_first = True if isinstance(modules[name], _CHANNELS_FIRST) else None
        try:
            t32 = compare.align_to_flax(cap32[name][1], f_out, channels_first)
            # the float64 run in the layout chosen for float32 (its values are what decide it)
            moved = t32.shape != cap32[name][1].shape or not np.array_equal(t32, cap32[name][1])
            t64 = np.moveaxis(cap64[name][1], 1, -1) if moved else cap64[name][1]  # the float32 run's layout
        except AssertionError:
            continue
        scale = float(np.max(np.abs(t64), initial=0.0))
        band = max(band_factor * float(np.max(np.abs(t32 - t64), initial=0.0)), _ULPS * scale)
        gap = ModuleGap(name, type(modules[name]).__name__, float(np.max(np.abs(f_out - t32), initial=0.0)),
                        band, scale)
        result.modules.append(gap)
        if result.first is None and not gap.ok:
            result.first = name
            found = _config_cause(modules[name], weights.module_at(flax_copy, path), cap32[name][0])
            found = found or _numeric_cause(name, modules[name], (cap32[name][0], cap32[name][1]),
                                            (f_in, f_out), band, order, cap32, flax_outputs)
            result.cause, result.detail = found or ("unknown", "")
    # BatchNorm configuration can be wrong with the forward right (eval mode, momentum): check them all.
    if result.first is None:
        for name, module in modules.items():
            fm = weights.module_at(flax_copy, paths.get(name, default_flax_path(name)))
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and fm is not None:
                found = _config_cause(module, fm, None)
                if found:
                    result.first, (result.cause, result.detail) = name, found
                    break
    if labels is not None:
        result.gradients = _gradient_gaps(torch32, flax_copy, x32, flax_in, labels, layers, torch_loss, flax_loss)
        if result.first is None:
            # the leaf nearest the output (last in torch's parameter order) whose gradient is off:
            # the backward pass breaks just before it
            over = [leaf for leaf, gap in result.gradients.items() if not gap <= grad_tol]
            if over:
                result.first, result.cause = over[-1], "backward"
    return result


def _gradient_gaps(torch_model, flax_model, x_torch, x_flax, labels, layers, torch_loss, flax_loss) -> dict:
    named = {n: p for n, p in torch_model.named_parameters() if p.requires_grad}
    torch_model.zero_grad()
    torch_loss(torch_model(x_torch), torch.from_numpy(np.asarray(labels))).backward()
    grads_torch = trees.flatten(convert.params_to_flax({n: p.grad for n, p in named.items()}, layers))
    _, _, grads = losses.flax_loss_and_grads(nnx.clone(flax_model), x_flax, jnp.asarray(labels), flax_loss)
    grads_flax = trees.flatten(nnx.to_pure_dict(grads))
    return compare.relative_gaps({p: grads_flax[p] for p in grads_torch if p in grads_flax}, grads_torch,
                                 compare.GRAD_FLOOR)


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
