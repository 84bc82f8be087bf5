"""``assert_trajectories_match``: gradient and optimizer parity of a user's torch and Flax NNX models.

Put it in a test: it converts the torch weights into the Flax model, then for
``steps`` batches computes loss and gradients in both frameworks at the same
parameters, and steps ``torch.optim.AdamW(fused=True)`` and ``jax_impl.adamw``
on the *same* (torch's) gradients, so the two trajectories cannot part by
chaos, only by a defect:

- the logits of the first batch before training agree within ``logit_tol``
  (the conversion is right: a wrong layout gives errors of order 0.1-1);
- at every step the losses agree within ``loss_tol`` (relative) and every
  gradient leaf within ``grad_tol`` of its largest element (a wrong layer gives
  order 1).

What the defaults allow, measured on the SimpleCNN (``tests/test_parity_api.py``
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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jax_impl
from crosscheck import convert, models
from crosscheck.metrics import as_numpy, distance


@dataclass
class StepRecord:
    step: int
    loss_torch: float
    loss_flax: float
    grad_gap: float  # max over leaves of max|g_flax - g_torch| / max|g_torch|
    grad_leaf: str
    param_max_ulps: int
    param_leaf: str


@dataclass
class ParityReport:
    logit_gap: float
    steps: list[StepRecord] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"logit gap before training: {self.logit_gap:.3g}",
                 "step  loss torch    loss flax     grad gap (leaf)            params max ulps (leaf)"]
        for r in self.steps:
            lines.append(f"{r.step:>4}  {r.loss_torch:<12.7g}  {r.loss_flax:<12.7g}  "
                         f"{r.grad_gap:<9.3g} {r.grad_leaf:<16} {r.param_max_ulps:>5} {r.param_leaf}")
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
    torch_loss: Callable = models.torch_cross_entropy,
    flax_loss: Callable = models.flax_cross_entropy,
    to_flax_input: Callable[[np.ndarray], np.ndarray] = models.nchw_to_nhwc,
    logit_tol: float = 1e-4,
    loss_tol: float = 1e-5,
    grad_tol: float = 1e-2,
    param_ulps: int = 0,
) -> ParityReport:
    """Check ``steps`` training steps of ``torch_model`` and its Flax NNX port; raise ``AssertionError`` on a gap.

    ``batches`` yields (inputs, labels) as NumPy arrays in torch's layout;
    ``to_flax_input`` maps inputs to the Flax model's (default NCHW -> NHWC).
    ``layers`` is the converter table (default :func:`convert.layers_of`;
    give ``flatten_from`` there for a Linear after a channels-first flatten).
    Both models are used in their current train/eval mode, and the torch
    model's weights are written into ``flax_model`` first.  Returns the
    per-step report, also on success, so a test can print or inspect it.
    """
    layers = list(layers) if layers is not None else convert.layers_of(torch_model)
    nnx.update(flax_model, convert.torch_to_nnx(torch_model.state_dict(), layers, flax_model))
    named = dict(torch_model.named_parameters())
    optimizer = torch.optim.AdamW(named.values(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  amsgrad=amsgrad, fused=True)
    tx = jax_impl.adamw(lr, betas[0], betas[1], eps, weight_decay, amsgrad=amsgrad,
                         torch_layout=convert.torch_layout(torch_model, layers))
    params = nnx.to_pure_dict(nnx.state(flax_model, nnx.Param))
    opt_state = tx.init(params)
    adamw_step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    flax_grads = nnx.jit(lambda m, x, y: models.flax_loss_and_grads(m, x, y, flax_loss))

    report = None
    for step, (inputs, labels) in zip(range(1, steps + 1), batches):
        x_torch, y_torch = torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(labels))
        x_flax, y_flax = jnp.asarray(to_flax_input(np.asarray(inputs))), jnp.asarray(labels)
        optimizer.zero_grad()
        logits_torch = torch_model(x_torch)
        loss_torch = torch_loss(logits_torch, y_torch)
        loss_torch.backward()
        loss_flax, logits_flax, grads_flax = flax_grads(flax_model, x_flax, y_flax)
        if report is None:
            report = ParityReport(float(np.max(np.abs(as_numpy(logits_torch) - np.asarray(logits_flax)))))
            if not report.logit_gap <= logit_tol:
                raise AssertionError(f"logits differ by {report.logit_gap:.3g} > logit_tol={logit_tol:g} before "
                                     "training: the weight conversion is wrong (check the layer table, "
                                     f"flatten_from, to_flax_input)\n{report}")

        grads_torch = convert.params_to_flax({n: p.grad for n, p in named.items()}, layers)
        grad_gap, grad_leaf = _worst_relative_gap(nnx.to_pure_dict(grads_flax), grads_torch)
        optimizer.step()
        params, opt_state = adamw_step(jax.tree.map(jnp.asarray, grads_torch), opt_state, params)
        torch_params = convert.params_to_flax(named, layers)
        ulps, param_leaf = _worst_ulps(params, torch_params)
        nnx.update(flax_model, _with_params(flax_model, params))
        record = StepRecord(step, loss_torch.item(), float(loss_flax), grad_gap, grad_leaf, ulps, param_leaf)
        report.steps.append(record)
        loss_gap = abs(record.loss_flax - record.loss_torch) / max(abs(record.loss_torch), 1e-30)
        failures = [f"loss differs by {loss_gap:.3g} relative > loss_tol={loss_tol:g}" if not loss_gap <= loss_tol
                    else "",
                    f"gradient {grad_leaf} differs by {grad_gap:.3g} of its scale > grad_tol={grad_tol:g}"
                    if not grad_gap <= grad_tol else "",
                    f"params {param_leaf} differ by {ulps} ulps > param_ulps={param_ulps}" if ulps > param_ulps
                    else ""]
        failures = [f for f in failures if f]
        if failures:
            raise AssertionError(f"step {step}: " + "; ".join(failures) + f"\n{report}")
    if report is None or len(report.steps) < steps:
        raise ValueError(f"batches ran out after {0 if report is None else len(report.steps)} of steps={steps}")
    return report


def _with_params(model: nnx.Module, params: dict) -> nnx.State:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return state


def _leaves(tree) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(x) for path, x in convert._flatten(tree).items()}


def _worst_relative_gap(flax_tree, torch_tree) -> tuple[float, str]:
    torch_leaves = _leaves(torch_tree)
    gaps = {name: float(np.max(np.abs(x - torch_leaves[name]), initial=0.0)
                        / max(float(np.max(np.abs(torch_leaves[name]), initial=0.0)), 1e-30))
            for name, x in _leaves(flax_tree).items()}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def _worst_ulps(flax_tree, torch_tree) -> tuple[int, str]:
    torch_leaves = _leaves(torch_tree)
    ulps = {name: int(distance(x, torch_leaves[name]).max_ulps) for name, x in _leaves(flax_tree).items()}
    worst = max(ulps, key=ulps.get)
    return ulps[worst], worst if ulps[worst] else "-"
