"""``assert_trajectories_match``: gradient and optimizer parity of a user's torch and Flax NNX models.

Put it in a test: it converts the torch weights into the Flax model, then for
``steps`` batches computes loss and gradients in both frameworks at the same
parameters, and steps ``torch.optim.AdamW(fused=True)`` and ``jax_impl.adamw``
on the *same* (torch's) gradients, so the two trajectories cannot part by
chaos, only by a defect:

- the logits of the first batch before training agree within ``logit_tol``
  (the conversion is right: a wrong layout gives errors of order 0.1-1);
- at every step the losses agree within ``loss_tol`` (relative) and every
  gradient leaf within ``grad_tol`` of max(its largest element, ``grad_floor``
  x the model's largest gradient element) (a wrong layer gives order 1; the
  floor keeps leaves whose true gradient is zero from false alarms, see
  :data:`GRAD_FLOOR`), and batch statistics and buffers within ``stats_tol``.

What the defaults allow, measured on the SimpleCNN (``tests/crosscheck_tests/port/test_parity_api.py``
prints the report): logits 1.8e-7 and loss 4e-7 relative, so ``logit_tol`` and
``loss_tol`` leave ~30x room.  Gradients agree to <= 3.3e-6 of their scale while
both passes take the same branches, but when a pre-activation rounds to the
other side of a ReLU kink (or a max-pool tie) in one framework, one summand of
the gradient changes discretely: measured 6e-4 of the scale (conv1, checked
against a float64 torch gradient: torch was right to 1.5e-8, Flax off by 3e-6).
``grad_tol=1e-2`` stays above such events and two orders below a defect;
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
from crosscheck.common import losses
from crosscheck.common.losses import flax_cross_entropy, torch_cross_entropy
from crosscheck.common.metrics import as_numpy, distance
from crosscheck.convert import trees, weights
from crosscheck.port.compare import (GRAD_FLOOR, align_to_flax, channels_last,
                                     relative_gaps)


@dataclass
class StepRecord:
    step: int
    loss_torch: float
    loss_flax: float
    grad_gap: float  # max over leaves of max|g_flax - g_torch| / max(max|g_torch|, grad_floor * global scale)
    grad_leaf: str
    param_max_ulps: int
    param_leaf: str
    stats_gap: float = 0.0  # max over batch statistics and buffers, relative to their scale
    stats_leaf: str = "-"


@dataclass
class ParityReport:
    logit_gap: float
    steps: list[StepRecord] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"logit gap before training: {self.logit_gap:.3g}",
                 "step  loss torch    loss flax     grad gap (leaf)            params max ulps (leaf)   "
                 "stats gap (leaf)"]
        for r in self.steps:
            lines.append(f"{r.step:>4}  {r.loss_torch:<12.7g}  {r.loss_flax:<12.7g}  "
                         f"{r.grad_gap:<9.3g} {r.grad_leaf:<16} {r.param_max_ulps:>5} {r.param_leaf:<18} "
                         f"{r.stats_gap:<9.3g} {r.stats_leaf}")
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
    logit_tol: float = 1e-4,
    loss_tol: float = 1e-5,
    grad_tol: float = 1e-2,
    grad_floor: float = GRAD_FLOOR,
    grad_tol_by_leaf: Mapping[str, float] | None = None,
    stats_tol: float = 3e-6,
    param_ulps: int = 0,
    locate: bool = True,
) -> ParityReport:
    """Check ``steps`` training steps of ``torch_model`` and its Flax NNX port; raise ``AssertionError`` on a gap.

    ``batches`` yields (inputs, labels) as NumPy arrays in torch's layout;
    ``to_flax_input`` maps inputs to the Flax model's (default
    :func:`channels_last`: float inputs of rank 3-5 channels-last, token ids
    unchanged).  The default losses are mean cross entropy for (N, C) logits,
    per-position logits and (B, T, V) token logits.  ``layers`` is the
    converter table (default :func:`convert.layers_of`; give ``flatten_from``
    there for a Linear after a channels-first flatten).  Both models are used
    in their current train/eval mode, and the torch model's weights are
    written into ``flax_model`` first.  Frozen torch parameters
    (``requires_grad=False``) are neither compared as gradients nor stepped.

    A gradient leaf fails when it differs by more than ``grad_tol`` of
    max(its largest element, ``grad_floor`` x the largest gradient element of
    the model); ``grad_tol_by_leaf`` overrides ``grad_tol`` by leaf name
    (``"conv1/bias"``).  Batch statistics and buffers (BatchNorm running
    mean/var and counter) are compared after every step within ``stats_tol``
    of their scale: rounding gives <= 3.3e-7 (resnet_block, 10 steps); a
    biased running variance (nnx.BatchNorm) is off by momentum x var / n per
    step, 2e-5 relative at n = 4096 values per channel.  On a failure, unless ``locate=False``, the message ends
    with :func:`crosscheck.locate_divergence`'s report on that step's batch
    (the first module whose output leaves the rounding band, and the likely cause).
    Returns the per-step report, also on success.
    """
    from crosscheck.port import locate as locate_module
    layers = list(layers) if layers is not None else convert.layers_of(torch_model)
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
    flax_grads = nnx.jit(lambda m, x, y: losses.flax_loss_and_grads(m, x, y, flax_loss))

    report = None
    for step, (inputs, labels) in zip(range(1, steps + 1), batches):
        snapshot = (copy.deepcopy(torch_model), nnx.clone(flax_model)) if locate else None

        def fail(message: str) -> AssertionError:
            text = f"{message}\n{report}"
            if snapshot is not None:
                try:
                    where = locate_module.locate_divergence(*snapshot, (inputs, labels), layers=layers,
                                                            to_flax_input=to_flax_input, torch_loss=torch_loss,
                                                            flax_loss=flax_loss, convert_weights=False)
                    text += f"\n\nwhere: {where}"
                except Exception as err:  # the locator must never hide the failure it explains
                    text += f"\n\n(locate_divergence failed: {type(err).__name__}: {err})"
            return AssertionError(text)

        x_torch, y_torch = torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(labels))
        x_flax, y_flax = jnp.asarray(to_flax_input(np.asarray(inputs))), jnp.asarray(labels)
        optimizer.zero_grad()
        logits_torch = torch_model(x_torch)
        loss_torch = torch_loss(logits_torch, y_torch)
        loss_torch.backward()
        loss_flax, logits_flax, grads_flax = flax_grads(flax_model, x_flax, y_flax)
        if report is None:
            aligned = align_to_flax(as_numpy(logits_torch), np.asarray(logits_flax))
            report = ParityReport(float(np.max(np.abs(aligned - np.asarray(logits_flax)))))
            if not report.logit_gap <= logit_tol:
                raise fail(f"logits differ by {report.logit_gap:.3g} > logit_tol={logit_tol:g} before "
                           "training: the weight conversion is wrong (check the layer table, "
                           "flatten_from, to_flax_input)")

        grads_torch = trees.flatten(convert.params_to_flax({n: p.grad for n, p in named.items()}, layers))
        grads_flax = trees.flatten(nnx.to_pure_dict(grads_flax))
        gaps = relative_gaps({p: grads_flax[p] for p in trainable}, grads_torch, grad_floor)
        over = {leaf: gap / grad_tol_by_leaf.get(leaf, grad_tol) for leaf, gap in gaps.items()}
        grad_leaf = max(over, key=over.get)
        grad_gap = gaps[grad_leaf]
        optimizer.step()
        params, opt_state = adamw_step(jax.tree.map(jnp.asarray, trees.nest(grads_torch)), opt_state, params)
        torch_params = convert.params_to_flax(named, layers)
        ulps, param_leaf = _worst_ulps(params, torch_params)
        nnx.update(flax_model, with_params(flax_model, params))
        stats_gap, stats_leaf = _stats_gap(torch_model, flax_model, layers)
        record = StepRecord(step, loss_torch.item(), float(loss_flax), grad_gap, grad_leaf, ulps, param_leaf,
                            stats_gap, stats_leaf)
        report.steps.append(record)
        loss_gap = abs(record.loss_flax - record.loss_torch) / max(abs(record.loss_torch), 1e-30)
        leaf_tol = grad_tol_by_leaf.get(grad_leaf, grad_tol)
        failures = [f"loss differs by {loss_gap:.3g} relative > loss_tol={loss_tol:g}" if not loss_gap <= loss_tol
                    else "",
                    f"gradient {grad_leaf} differs by {grad_gap:.3g} of its scale > grad_tol={leaf_tol:g}"
                    if not grad_gap <= leaf_tol else "",
                    f"params {param_leaf} differ by {ulps} ulps > param_ulps={param_ulps}" if ulps > param_ulps
                    else "",
                    f"batch statistics {stats_leaf} differ by {stats_gap:.3g} of their scale > stats_tol="
                    f"{stats_tol:g} ({locate_module.stats_cause(stats_leaf, flax_model)})"
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
               layers: Sequence[convert.Layer]) -> tuple[float, str]:
    """The worst batch statistic or buffer (relative to its own scale; integers and booleans exactly)."""
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
    return worst, leaf


def _worst_ulps(flax_tree, torch_tree) -> tuple[int, str]:
    torch_leaves = _leaves(torch_tree)
    ulps = {name: int(distance(x, torch_leaves[name]).max_ulps) for name, x in _leaves(flax_tree).items()}
    worst = max(ulps, key=ulps.get)
    return ulps[worst], worst if ulps[worst] else "-"
