"""``assert_trajectories_match``: gradient and optimizer parity of a user's torch and Flax NNX models.

Put it in a test: it converts the torch weights into the Flax model, then for
``steps`` batches computes loss and gradients in both frameworks at the same
parameters, and steps ``torch.optim.AdamW(fused=True)`` and ``jax_impl.adamw``
on the *same* (torch's) gradients, so the two trajectories cannot part by
chaos, only by a defect:

- the logits of the first batch before training, the loss at every step and every gradient leaf agree
  within their *rounding band*: what float32 rounding explains on this model and batch, measured at
  every step as ``band_factor`` x torch's own float32 error (its distance from torch's float64 runs,
  at the parameters and at parameters perturbed by their float32 rounding, see
  :func:`crosscheck.port.compare.gradient_bands`), the band :func:`crosscheck.locate_divergence` uses.
  So a port that a float64 run shows wrong fails (at trained-scale weights a GELU variant moves the
  logits 24-30x above their band, docs/porting.md), and rounding a correct port does differently (a ReLU kink taken the other way, a
  zero-gradient leaf's noise, attention, BatchNorm) stays inside.  ``logit_tol``, ``loss_tol`` and
  ``grad_tol`` replace a band by a fixed tolerance (absolute, relative, and relative to the leaf's
  scale with the floor ``grad_floor`` x the model's largest gradient element);
- batch statistics and buffers agree within ``stats_tol`` of their scale;
- after every step the parameters are bitwise equal (``jax_impl.adamw`` is
  torch's fused CPU kernel to the bit), or within ``param_ulps`` ulps where a
  platform does not give bitwise equality.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jax_impl
from crosscheck import convert
from crosscheck.common.losses import flax_cross_entropy, torch_cross_entropy
from crosscheck.common.metrics import as_numpy, distance
from crosscheck.convert import trees, weights
from crosscheck.port import compare
from crosscheck.port.compare import (BAND_FACTOR, GRAD_FLOOR, align_to_flax,
                                     channels_last, relative_gaps)


@dataclass
class StepRecord:
    step: int
    loss_torch: float
    loss_flax: float
    grad_gap: float  # the worst leaf's max|g_flax - g_torch| (relative to its scale with a fixed grad_tol)
    grad_leaf: str
    param_max_ulps: int
    param_leaf: str
    stats_gap: float = 0.0  # max over batch statistics and buffers, relative to their scale
    stats_leaf: str = "-"
    grad_band: float = float("nan")  # the worst leaf's band (its tolerance, with a fixed grad_tol)
    loss_band: float = float("nan")  # relative


@dataclass
class ParityReport:
    logit_gap: float
    steps: list[StepRecord] = field(default_factory=list)
    logit_band: float = float("nan")

    def __str__(self) -> str:
        lines = [f"logit gap before training: {self.logit_gap:.3g} (band {self.logit_band:.3g})",
                 "step  loss torch    loss flax     grad gap  band      (leaf)            params max ulps (leaf)   "
                 "stats gap (leaf)"]
        for r in self.steps:
            lines.append(f"{r.step:>4}  {r.loss_torch:<12.7g}  {r.loss_flax:<12.7g}  "
                         f"{r.grad_gap:<9.3g} {r.grad_band:<9.3g} {r.grad_leaf:<16} {r.param_max_ulps:>5} "
                         f"{r.param_leaf:<18} {r.stats_gap:<9.3g} {r.stats_leaf}")
        return "\n".join(lines)


def assert_trajectories_match(
    torch_model: torch.nn.Module,
    flax_model: nnx.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    layers: Sequence[convert.Layer] | None = None,
    steps: int = 10,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    torch_loss: Callable = torch_cross_entropy,
    flax_loss: Callable = flax_cross_entropy,
    to_flax_input: Callable[[np.ndarray], np.ndarray] = channels_last,
    output=None,
    torch_output=None,
    flax_output=None,
    band_factor: float = BAND_FACTOR,
    logit_tol: float | None = None,
    loss_tol: float | None = None,
    grad_tol: float | None = None,
    grad_floor: float = GRAD_FLOOR,
    grad_tol_by_leaf: Mapping[str, float] | None = None,
    stats_tol: float = 3e-6,
    param_ulps: int = 0,
    locate: bool = True,
) -> ParityReport:
    """Check ``steps`` training steps of ``torch_model`` and its Flax port; raise ``AssertionError`` on a gap.

    ``flax_model``: an ``nnx.Module``, or a linen module in ``nnx.bridge.ToNNX`` (initialized).
    ``batches`` yields (inputs, labels) as NumPy arrays in torch's layout;
    ``to_flax_input`` maps inputs to the Flax model's (default
    :func:`channels_last`: float inputs of rank 3-5 channels-last, token ids
    unchanged).  Outputs may be any pytree (a ``ModelOutput``, nanoGPT's
    ``(logits, loss)``): ``output`` (or ``torch_output``/``flax_output`` for one
    side) selects what the loss takes (:func:`crosscheck.port.compare.select_output`:
    default ``.logits`` if there is one, else the first array).  The default losses are mean
    cross entropy for (N, C) logits, per-position logits and (B, T, V) token logits.  ``layers`` is the
    converter table (default :func:`convert.layers_of`; give ``flatten_from``
    there for a Linear after a channels-first flatten).  Both models are used
    in their current train/eval mode, and the torch model's weights are
    written into ``flax_model`` first.  Frozen torch parameters
    (``requires_grad=False``) are neither compared as gradients nor stepped.

    Logits, loss and gradients are held to their rounding bands (module docstring) unless
    ``logit_tol`` / ``loss_tol`` / ``grad_tol`` fix a tolerance; ``grad_tol_by_leaf`` gives one leaf
    (``"conv1/bias"``) a fixed tolerance relative to its scale.  Batch statistics and buffers (BatchNorm running
    mean/var and counter) are compared after every step within ``stats_tol``
    of their scale: rounding gives <= 3.3e-7 (resnet_block, 10 steps); a
    biased running variance (nnx.BatchNorm) is off by momentum x var / n per
    step, 2e-5 relative at n = 4096 values per channel.  A failure says which band was exceeded and by
    how much, and, unless ``locate=False``, ends with :func:`crosscheck.locate_divergence`'s report on
    that step's batch (the first module whose output leaves the rounding band, and the likely cause).
    Returns the per-step report, also on success.
    """
    from crosscheck.port import locate as locate_module
    compare.check_flax_model(flax_model)
    torch_output = output if torch_output is None else torch_output
    flax_output = output if flax_output is None else flax_output
    layers = list(layers) if layers is not None else convert.layers_of(torch_model, like=flax_model)
    nnx.update(flax_model, convert.torch_to_nnx(torch_model.state_dict(), layers, flax_model))
    named = {n: p for n, p in torch_model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("torch_model has no trainable parameters (all have requires_grad=False)")
    trainable = set(trees.flatten(convert.params_to_flax(named, layers)))
    grad_tol_by_leaf = dict(grad_tol_by_leaf or {})
    all_params = trees.flatten(nnx.to_pure_dict(nnx.state(flax_model, nnx.Param)))
    unknown = set(grad_tol_by_leaf) - {"/".join(map(str, p)) for p in trainable}
    if unknown:
        raise ValueError(f"grad_tol_by_leaf names no trainable leaf: {sorted(unknown)}")
    missing = trainable - set(all_params)
    if missing:
        raise ValueError(f"trainable torch parameters {sorted('/'.join(map(str, p)) for p in missing)} are not "
                         "nnx.Param leaves of the Flax model")
    optimizer = torch.optim.AdamW(named.values(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  amsgrad=amsgrad, fused=True)
    tx = jax_impl.adamw(lr, betas[0], betas[1], eps, weight_decay, amsgrad=amsgrad,
                         torch_layout=convert.torch_layout(torch_model, layers))
    params = trees.nest({p: all_params[p] for p in trainable})
    opt_state = tx.init(params)
    adamw_step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    flax_grads = nnx.jit(lambda m, x, y: compare.loss_and_grads(m, x, y, flax_loss, flax_output))
    name = lambda path: "/".join(map(str, path))  # noqa: E731

    report = None
    for step, (inputs, labels) in zip(range(1, steps + 1), batches):
        snapshot = (copy.deepcopy(torch_model), nnx.clone(flax_model)) if locate else None

        def fail(message: str, code_or_conversion: bool = False) -> AssertionError:
            text = f"{message}\n{report}"
            if snapshot is not None:
                try:
                    where = locate_module.locate_divergence(*snapshot, (inputs, labels), layers=layers,
                                                            to_flax_input=to_flax_input, torch_loss=torch_loss,
                                                            flax_loss=flax_loss, torch_output=torch_output,
                                                            flax_output=flax_output, band_factor=band_factor,
                                                            convert_weights=False)
                    if code_or_conversion:
                        text += ("\nthe weight conversion is wrong (check the layer table, flatten_from, "
                                 "to_flax_input)" if where.conversion_at_fault else
                                 "\nthe weights convert right; the port's code computes something else"
                                 if not where.ok else "")
                    text += f"\n\nwhere: {where}"
                except Exception as err:  # the locator must never hide the failure it explains
                    text += f"\n\n(locate_divergence failed: {type(err).__name__}: {err})"
            return AssertionError(text)

        x_torch, y_torch = torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(labels))
        x_flax, y_flax = jnp.asarray(to_flax_input(np.asarray(inputs))), jnp.asarray(labels)
        # torch's float64 runs at these parameters, before the step (copies: the model is untouched)
        references = compare.torch_references(torch_model, x_torch, y_torch, torch_loss, torch_output)
        optimizer.zero_grad()
        logits_torch = compare.select_output(torch_model(x_torch), torch_output)
        loss_torch = torch_loss(logits_torch, y_torch)
        loss_torch.backward()
        loss_flax, logits_flax, grads_flax = flax_grads(flax_model, x_flax, y_flax)
        if report is None:
            l32 = as_numpy(logits_torch).astype(np.float64)
            aligned = align_to_flax(l32, np.asarray(logits_flax))
            band = (logit_tol if logit_tol is not None else
                    max(compare.rounding_band(l32, out64, band_factor) for out64, _, _ in references))
            report = ParityReport(float(np.max(np.abs(aligned - np.asarray(logits_flax, np.float64)))),
                                  logit_band=band)
            if not report.logit_gap <= band:
                what = (f"logit_tol={logit_tol:g}" if logit_tol is not None else
                        f"their rounding band {band:.3g} ({band_factor:g}x torch's own float32 error)")
                raise fail(f"logits differ by {report.logit_gap:.3g} before training, {report.logit_gap / band:.3g}x "
                           f"{what}", code_or_conversion=True)

        grads_torch = trees.flatten(convert.params_to_flax({n: p.grad for n, p in named.items()}, layers))
        grads_flax = trees.flatten(nnx.to_pure_dict(grads_flax))
        flax_flat = {p: grads_flax[p] for p in trainable}
        relative = relative_gaps(flax_flat, grads_torch, grad_floor)
        absolute = {name(p): v for p, v in compare.absolute_gaps(flax_flat, grads_torch).items()}
        bands = compare.gradient_bands({name(p): grads_torch[p] for p in trainable},
                                       [{name(p): v for p, v in trees.flatten(convert.params_to_flax(
                                           g, layers)).items()} for _, _, g in references], band_factor)
        # each leaf's (gap, allowed) in the units of its test
        tests = {leaf: ((relative[leaf], grad_tol_by_leaf.get(leaf, grad_tol)) if grad_tol is not None
                        or leaf in grad_tol_by_leaf else (absolute[leaf], bands[leaf])) for leaf in absolute}
        grad_leaf = max(tests, key=lambda leaf: tests[leaf][0] / max(tests[leaf][1], 1e-300))
        grad_gap, grad_allowed = tests[grad_leaf]
        optimizer.step()
        params, opt_state = adamw_step(jax.tree.map(jnp.asarray, trees.nest(grads_torch)), opt_state, params)
        torch_params = convert.params_to_flax(named, layers)
        ulps, param_leaf = _worst_ulps(params, torch_params)
        nnx.update(flax_model, with_params(flax_model, params))
        stats_gap, stats_leaf, stats = _stats_gap(torch_model, flax_model, layers)
        loss32 = loss_torch.item()
        loss_band = (loss_tol if loss_tol is not None else
                     max(band_factor * abs(loss32 - l64) for _, l64, _ in references) / max(abs(loss32), 1e-30)
                     + compare.ULPS)
        record = StepRecord(step, loss32, float(loss_flax), grad_gap, grad_leaf, ulps, param_leaf,
                            stats_gap, stats_leaf, grad_allowed, loss_band)
        report.steps.append(record)
        loss_gap = abs(record.loss_flax - record.loss_torch) / max(abs(record.loss_torch), 1e-30)
        over = lambda gap, allowed: f"{gap / allowed:.3g}x" if allowed > 0 else "inf x"  # noqa: E731
        band_words = lambda fixed, allowed: (fixed if fixed else  # noqa: E731
                                             f"its rounding band {allowed:.3g} ({band_factor:g}x torch's own "
                                             "float32 error)")
        grad_fixed = (f"grad_tol={grad_allowed:g} of its scale" if grad_tol is not None or grad_leaf in grad_tol_by_leaf
                      else "")
        failures = [f"loss differs by {loss_gap:.3g} relative, {over(loss_gap, loss_band)} "
                    f"{band_words(f'loss_tol={loss_tol:g}' if loss_tol is not None else '', loss_band)}"
                    if not loss_gap <= loss_band else "",
                    f"gradient {grad_leaf} differs by {grad_gap:.3g}, {over(grad_gap, grad_allowed)} "
                    f"{band_words(grad_fixed, grad_allowed)}" if not grad_gap <= grad_allowed else "",
                    f"params {param_leaf} differ by {ulps} ulps > param_ulps={param_ulps}" if ulps > param_ulps
                    else "",
                    f"batch statistics {stats_leaf} differ by {stats_gap:.3g} of their scale > stats_tol="
                    f"{stats_tol:g} ({locate_module.stats_cause(stats_leaf, *stats)})"
                    if not stats_gap <= stats_tol else ""]
        failures = [f for f in failures if f]
        if failures:
            raise fail(f"step {step}: " + "; ".join(failures))
    if report is None or len(report.steps) < steps:
        raise ValueError(f"batches ran out after {0 if report is None else len(report.steps)} of steps={steps}")
    return report


def with_params(model: nnx.Module, params: dict) -> nnx.State:
    state = nnx.state(model, nnx.Param)
    flat = trees.flatten(nnx.to_pure_dict(state))
    flat.update(trees.flatten(params))  # frozen leaves keep their values
    nnx.replace_by_pure_dict(state, trees.nest(flat))
    return state


def _leaves(tree) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(x) for path, x in trees.flatten(tree).items()}


def _stats_gap(torch_model: torch.nn.Module, flax_model: nnx.Module,
               layers: Sequence[convert.Layer]) -> tuple[float, str, tuple[dict, dict]]:
    """The worst batch statistic or buffer (relative to its own scale; integers and booleans exactly), and
    (Flax, torch) statistics by leaf name."""
    torch_flat = {key[1:]: x for key, x in weights.torch_to_flat(torch_model.state_dict(), layers).items()
                  if key[0] != "params"}
    flax_flat = trees.flatten(nnx.to_pure_dict(nnx.state(flax_model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))))
    worst, leaf = 0.0, "-"
    for path, t in torch_flat.items():
        if path not in flax_flat:
            continue  # nnx.BatchNorm keeps no num_batches_tracked
        f, t = np.asarray(flax_flat[path]), np.asarray(t)
        if t.dtype.kind in "biu":
            gap = 0.0 if np.array_equal(f.astype(np.int64), t.astype(np.int64)) else float("inf")
        else:
            gap = float(np.max(np.abs(f - t), initial=0.0)) / max(float(np.max(np.abs(t), initial=0.0)), 1e-30)
        if gap > worst:
            worst, leaf = gap, "/".join(map(str, path))
    flat = lambda tree: {"/".join(map(str, p)): np.asarray(x) for p, x in tree.items()}  # noqa: E731
    return worst, leaf, (flat(flax_flat), flat(torch_flat))


def _worst_ulps(flax_tree, torch_tree) -> tuple[int, str]:
    torch_leaves = _leaves(torch_tree)
    ulps = {name: int(distance(x, torch_leaves[name]).max_ulps) for name, x in _leaves(flax_tree).items()}
    worst = max(ulps, key=ulps.get)
    return ulps[worst], worst if ulps[worst] else "-"
