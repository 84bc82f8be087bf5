"""``python -m crosscheck recipes``: each training recipe in JAX and in torch on shared gradients, and how far apart.

Every row runs the same recipe in both frameworks for ``--steps`` optimizer
steps on one seeded gradient stream (small params, lr=1e-2, so updates cross
zero) and compares the final params: bitwise, or max ulps and max relative
error.  Rows marked ``exact`` must be bitwise (exit status 1 otherwise); the
others measure a documented alternative (optax's own transformations).
Writes ``report.json``, ``report.md`` and ``recipes.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jax_impl
from crosscheck.common.metrics import distance
from jax_impl import clipping
from jax_impl.accumulation import torch_accumulation
from jax_impl.loss_scale import grad_scaler
from jax_impl.optax_schedules import tabulate

SHAPES = {"w": (16, 9), "b": (9,), "head": (7,)}
TORCH_ORDER = ("head", "w", "b")  # torch's parameter list order; the tree's (sorted) order differs
ORDER = [TORCH_ORDER.index(k) for k in sorted(SHAPES)]
LR, WD, K = 1e-2, 0.1, 4


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _grads(t: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10_000 + t)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _jax(tx, grads_of: Callable[[int], dict], steps: int, exact: bool = True, edit=None) -> dict:
    params = jax.tree.map(jnp.asarray, _params())
    state = tx.init(params)
    if exact:
        step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    else:
        def plain(g, s, p):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        step = jax.jit(plain)
    for t in range(steps):
        if edit is not None:
            state = edit(t, state)
        params, state = step(jax.tree.map(jnp.asarray, grads_of(t)), state, params)
    return {k: np.asarray(v) for k, v in params.items()}


def _torch(steps: int, grads_of: Callable[[int], dict], *, groups=None, clip=False, every_k=1, lr_at=None,
           skip_nonfinite=False, scaler=None) -> dict:
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v)) for k, v in _params().items()}
    optimizer = torch.optim.AdamW(groups(tparams) if groups else [tparams[k] for k in TORCH_ORDER], lr=LR,
                                  weight_decay=WD, fused=True)
    for t in range(steps):
        if lr_at is not None:
            optimizer.param_groups[0]["lr"] = lr_at(t)
        grads = grads_of(t)
        for k, p in tparams.items():
            g = torch.from_numpy(grads[k].copy())
            p.grad = g if p.grad is None or every_k == 1 else p.grad.add_(g)
        if (t + 1) % every_k:
            continue
        if clip:
            torch.nn.utils.clip_grad_norm_([tparams[k] for k in TORCH_ORDER], 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif not skip_nonfinite or all(torch.isfinite(p.grad).all() for p in tparams.values()):
            optimizer.step()
        optimizer.zero_grad()
    return {k: p.detach().numpy() for k, p in tparams.items()}


def _compare(a: dict, b: dict) -> dict:
    ds = [distance(a[k], b[k]) for k in SHAPES]
    n = sum(d.n for d in ds)
    return {"bitwise": all(d.first_mismatch < 0 for d in ds),
            "equal_elements": sum(d.bitwise_equal * d.n for d in ds) / n,
            "max_ulps": max(d.max_ulps for d in ds), "max_abs": max(d.max_abs for d in ds),
            "max_rel": max(d.max_rel for d in ds)}


def _recipes(steps: int):
    """(name, exact?, JAX thunk, torch thunk) for each row."""
    adamw = lambda **kw: jax_impl.adamw(LR, weight_decay=WD, **kw)  # noqa: E731
    clip = clipping.clip_grad_norm(1.0, order=ORDER)
    big = lambda t: _grads(t, 0.7)  # noqa: E731  (global norm ~5: every step clipped at max_norm=1)
    quarter = lambda t: _grads(t, 1 / K)  # noqa: E731  (gradients of loss / K; exact for K = 4)
    lr_changes = {0: LR, 15: 3e-3, 30: 2.5e-2}

    def lr_at(t):
        return float(np.float32([v for s, v in sorted(lr_changes.items()) if s <= t][-1]))

    def inject_edit(t, state):
        if t in lr_changes:
            state.hyperparams["learning_rate"] = jnp.asarray(lr_changes[t], jnp.float32)
        return state

    bad = {5, 6, 17}

    def with_inf(t):
        g = _grads(t)
        if t in bad:
            g["w"][0, 0] = np.inf
        return g

    scale_box = {}

    def scaled(t):
        return {k: v * np.float32(scale_box["scaler"].get_scale()) for k, v in with_inf(t).items()}

    def torch_scaled():
        scale_box["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
        scale_box["scaler"].scale(torch.ones(()))
        return _torch(steps, scaled, scaler=scale_box["scaler"])

    def jax_scaled():
        tx = grad_scaler(adamw(), init_scale=2.0 ** 10, growth_interval=3)
        params = jax.tree.map(jnp.asarray, _params())
        state = tx.init(params)
        step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
        for t in range(steps):
            g = {k: v * np.float32(state.scale) for k, v in with_inf(t).items()}
            params, state = step(jax.tree.map(jnp.asarray, g), state, params)
        return {k: np.asarray(v) for k, v in params.items()}

    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-2, warmup_steps=5, decay_steps=max(steps, 6), end_value=1e-3)
    table = tabulate(schedule, steps)
    groups = [{"weight_decay": 0.1}, {"weight_decay": 0.0, "lr": 3e-2, "eps": 1e-6},
              {"lr": 5e-3, "betas": (0.8, 0.99), "amsgrad": True}]
    labels = {"w": 0, "b": 1, "head": 2}

    def torch_groups(tp):
        return [{"params": [tp[k] for k, g in labels.items() if g == i], **group} for i, group in enumerate(groups)]

    bf16 = lambda t: {k: jnp.asarray(v, jnp.bfloat16) for k, v in _grads(t).items()}  # noqa: E731
    bf16_as_torch = lambda t: {k: np.asarray(v, np.float32) for k, v in bf16(t).items()}  # noqa: E731

    return [
        ("bare adamw, apply_exact", True, lambda: _jax(adamw(), _grads, steps), lambda: _torch(steps, _grads)),
        ("bare adamw, optax.apply_updates", False, lambda: _jax(adamw(), _grads, steps, exact=False),
         lambda: _torch(steps, _grads)),
        ("chain(clipping.clip_grad_norm, adamw)", True, lambda: _jax(optax.chain(clip, adamw()), big, steps),
         lambda: _torch(steps, big, clip=True)),
        ("chain(optax.clip_by_global_norm, adamw)", False,
         lambda: _jax(optax.chain(optax.clip_by_global_norm(1.0), adamw()), big, steps),
         lambda: _torch(steps, big, clip=True)),
        (f"torch_accumulation(adamw, {K})", True, lambda: _jax(torch_accumulation(adamw(), K), quarter, K * steps),
         lambda: _torch(K * steps, quarter, every_k=K)),
        (f"MultiSteps(adamw, {K}, use_grad_mean=False)", True,
         lambda: _jax(optax.MultiSteps(adamw(), K, use_grad_mean=False), quarter, K * steps),
         lambda: _torch(K * steps, quarter, every_k=K)),
        (f"MultiSteps(adamw, {K}) (mean of unscaled grads)", False,
         lambda: _jax(optax.MultiSteps(adamw(), K), _grads, K * steps), lambda: _torch(K * steps, quarter, every_k=K)),
        ("param_groups (3 groups, own lr/betas/eps/wd/amsgrad)", True,
         lambda: _jax(jax_impl.param_groups(groups, labels, lr=LR, weight_decay=WD), _grads, steps),
         lambda: _torch(steps, _grads, groups=torch_groups)),
        ("inject_hyperparams(adamw), lr changed mid-run, jit", True,
         lambda: _jax(optax.inject_hyperparams(jax_impl.adamw, static_args=("b1", "b2", "eps"))(
             learning_rate=LR, weight_decay=float(np.float32(WD))), _grads, steps, edit=inject_edit),
         lambda: _torch_lr_injected(steps, lr_at)),
        ("apply_if_finite(adamw), 3 inf steps", True,
         lambda: _jax(optax.apply_if_finite(adamw(), 10), with_inf, steps),
         lambda: _torch(steps, with_inf, skip_nonfinite=True)),
        ("loss_scale.grad_scaler(adamw) vs GradScaler, 3 inf steps", True, jax_scaled, torch_scaled),
        # bfloat16 gradients cast up before the step on both sides: torch and the exact path take no other dtype.
        ("bf16 grads, f32 params", True, lambda: _jax(adamw(), bf16_as_torch, steps),
         lambda: _torch(steps, bf16_as_torch)),
        ("optax warmup_cosine schedule, tabulated", True, lambda: _jax(jax_impl.adamw(table, weight_decay=WD),
                                                                       _grads, steps),
         lambda: _torch(steps, _grads, lr_at=lambda t: float(table.table[t]))),
        ("optax warmup_cosine schedule, direct", False, lambda: _jax(jax_impl.adamw(schedule, weight_decay=WD),
                                                                     _grads, steps),
         lambda: _torch(steps, _grads, lr_at=lambda t: float(table.table[t]))),
    ]


def _torch_lr_injected(steps, lr_at):
    # inject_hyperparams keeps weight_decay as a float32 array: torch gets the same float.
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v)) for k, v in _params().items()}
    optimizer = torch.optim.AdamW([tparams[k] for k in TORCH_ORDER], lr=LR, weight_decay=float(np.float32(WD)),
                                  fused=True)
    for t in range(steps):
        optimizer.param_groups[0]["lr"] = lr_at(t)
        for k, p in tparams.items():
            p.grad = torch.from_numpy(_grads(t)[k])
        optimizer.step()
    return {k: p.detach().numpy() for k, p in tparams.items()}


def measure(steps: int) -> list[dict]:
    rows = []
    for name, exact, run_jax, run_torch in _recipes(steps):
        row = {"recipe": name, "expected_exact": exact, "steps": steps, **_compare(run_jax(), run_torch())}
        row["passed"] = row["bitwise"] or not exact
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | steps | result | equal elements | max ulps | max rel |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = "bitwise" if r["bitwise"] else ("MISMATCH" if r["expected_exact"] else "differs")
        lines.append(f"| {r['recipe']} | {r['steps']} | {result} | {100 * r['equal_elements']:.1f}% | "
                     f"{r['max_ulps']:g} | {r['max_rel']:.2g} |")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recipes", help="training recipes (clipping, accumulation, groups, ...) vs torch")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per recipe (default %(default)s)")
    return p


def run(args) -> int:
    if args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    from crosscheck.common.report import report_errors

    out = args.out
    rows = measure(args.steps)
    with report_errors(out):
        _write(rows, out)
    print(markdown(rows))
    print(f"report: {out}/report.json, report.md, recipes.png")
    return 0 if all(r["passed"] for r in rows) else 1


def _write(rows: list[dict], out: Path) -> None:
    """report.json (strict), report.md and recipes.png, written together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crosscheck.common.report import strict_json, write_report

    text_json, text_md = strict_json(rows), markdown(rows) + "\n"
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1))
    ulps = [max(r["max_ulps"], 0.5) for r in rows]
    ax.barh([r["recipe"] for r in rows], ulps, color=["tab:green" if r["bitwise"] else "tab:orange" for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("max ulps vs torch (0 drawn as 0.5: bitwise)")
    ax.invert_yaxis()
    fig.tight_layout()
    write_report({out / "report.json": text_json, out / "report.md": text_md}, out / "recipes.png", fig)
