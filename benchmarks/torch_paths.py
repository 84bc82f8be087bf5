"""jax_impl.adamw(torch_path=...) against torch's CPU paths: bitwise, or how many ulps and how they grow.

    python benchmarks/torch_paths.py [--steps 1000] [--dtypes float32,bfloat16,float16,float64]
                                     [--paths for-loop,foreach] [--options default,amsgrad,...]

For each dtype x path x option, ``jax_impl.adamw(torch_path=path)`` (through
``jax_impl.apply_exact``, the default kernel) and ``torch.optim.AdamW`` on that
path take the same gradients (crosscheck's gaussian stream, params of shapes
with every kind of vector tail); at steps 10, 100, 1000, ... the table gives
the params' largest distance in ulps, the share of elements whose bits differ,
and the growth exponent ``k`` of ``max |dp| ~ t**k`` (a least-squares fit on
the checkpoints 100, 300, 1000, ...; 0 bounded, 0.5 random walk, 1 linear drift).  The last rows
put torch's own for-loop against its fused kernel: what a run continued on
the wrong path drifts by.  Prints a Markdown table (docs/exactness.md holds it).
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np
import torch

from crosscheck.common.metrics import distance
from crosscheck.trajectory import sources
from crosscheck.trajectory.implementations import Hyper, JaxRunner, Runner, TorchRunner

SHAPES = [(), (1,), (7,), (9,), (16,), (33,), (4, 3, 3, 3), (3, 5, 7), (257, 31)]
OPTIONS = {
    "default": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "weight_decay=0": {"weight_decay": 0.0},
    "b1=0.3 (lerp's other branch)": {"b1": 0.3, "b2": 0.6},
    "mask": {"decay_mask": (True, False) * 4 + (True,)},
    "cosine schedule": {"lr": 1e-2, "schedule": "cosine"},
}


def _hyper(dtype: str, option: str, steps: int) -> Hyper:
    values = dict(OPTIONS[option])
    if values.pop("schedule", None):
        values["schedule"] = sources.CosineSchedule(values["lr"], steps)
    if dtype == "float16":
        values["eps"] = 1e-4  # 1e-8 is 0 in float16
    return Hyper(dtype=dtype, **values)


def _worst(a: Runner, b: Runner) -> tuple[float, float, float, float]:
    """(max ulps of the params, of exp_avg_sq, share of param elements that differ, max |dp|)."""
    ulps_p = ulps_v = differ = total = 0
    max_abs = 0.0
    (pa, (_, va)), (pb, (_, vb)) = (a.params(), a.moments()), (b.params(), b.moments())
    for x, y in zip(pa, pb):
        if np.size(x):
            ulps_p = max(ulps_p, distance(x, y).max_ulps)
            x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
            differ += int(np.sum(x64 != y64))
            total += x64.size
            max_abs = max(max_abs, float(np.max(np.abs(x64 - y64))))
    for x, y in zip(va, vb):
        if np.size(x):
            ulps_v = max(ulps_v, distance(x, y).max_ulps)
    return ulps_p, ulps_v, differ / max(total, 1), max_abs


def measure(ours: Runner, theirs: Runner, steps: int) -> list[tuple[int, tuple]]:
    params = [np.random.default_rng(0).standard_normal(s) for s in SHAPES]
    source = sources.synthetic("gaussian")
    checkpoints = {c for c in (10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000) if c < steps} | {steps}
    rows = []
    for t in range(steps):
        g = source(t, params)
        ours.step(g)
        theirs.step(g)
        if t + 1 in checkpoints:
            rows.append((t + 1, _worst(ours, theirs)))
    return rows


def growth(rows) -> str:
    """``k`` of ``max |dp| ~ t**k`` from the checkpoints from step 100 on (before, a few elements dominate)."""
    points = [(math.log(t), math.log(w[3])) for t, w in rows if w[3] > 0 and t >= 100]
    if len(points) < 2:
        return "-" if not points else "n/a"
    x, y = np.array(points).T
    return f"{np.polyfit(x, y, 1)[0]:.2f}"


def cell(rows) -> str:
    if all(w[0] == 0 and w[1] == 0 for _, w in rows):
        return "**bitwise**"
    shown = [(t, w) for t, w in rows if t in (10, 100, 1000, 10_000, 100_000) or t == rows[-1][0]]
    return "; ".join(f"t={t}: {w[0]:.0f} / {w[1]:.0f} ulps, {100 * w[2]:.1f}%, {w[3]:.1e}" for t, w in shown)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16,float64")
    parser.add_argument("--paths", default="for-loop,foreach")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--no-torch-pair", action="store_true", help="skip torch's for-loop vs fused rows")
    args = parser.parse_args(argv)
    params = [np.random.default_rng(0).standard_normal(s) for s in SHAPES]
    print(f"torch {torch.__version__}, jax {jax.__version__}, {args.steps} steps; cells: params' max ulps / "
          "exp_avg_sq's max ulps, params' elements that differ, params' max abs. difference\n")
    print("| dtype | path | option | jax_impl(torch_path) vs torch | growth k |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        # float64 params, and the schedules' float64 lr, need x64 (as crosscheck's --x64).
        jax.config.update("jax_enable_x64", dtype == "float64")
        for path in args.paths.split(","):
            for option in args.options.split(","):
                x64 = dtype == "float64" or option == "cosine schedule"
                jax.config.update("jax_enable_x64", x64)
                hyper = _hyper(dtype, option, args.steps)
                rows = measure(JaxRunner("ours", hyper, params, kind="exact", torch_path=path),
                               TorchRunner("torch", hyper, params, cls=torch.optim.AdamW, path=path), args.steps)
                print(f"| {dtype} | {path} | {option} | {cell(rows)} | {growth(rows)} |", flush=True)
        jax.config.update("jax_enable_x64", False)
        if args.no_torch_pair:
            continue
        hyper = _hyper(dtype, "default", args.steps)
        jax.config.update("jax_enable_x64", dtype == "float64")
        rows = measure(TorchRunner("loop", hyper, params, cls=torch.optim.AdamW, path="for-loop"),
                       TorchRunner("fused", hyper, params, cls=torch.optim.AdamW, path="fused"), args.steps)
        print(f"| {dtype} | torch for-loop vs torch fused | default | {cell(rows)} | {growth(rows)} |", flush=True)
        jax.config.update("jax_enable_x64", False)


if __name__ == "__main__":
    main()
