"""SimpleCNN CIFAR-10 training step (forward, backward, AdamW) in PyTorch and in Flax, per batch size.

    python benchmarks/train_step.py [--batch-sizes 32,128] [--repeats 20] [--out DIR]

Both frameworks train the same model from the same weights on the same random
batches (CIFAR-10 shaped; the step's time does not depend on the pixels).
Rounds are interleaved (torch, Flax, torch, ..., as in step_time.py); the median over rounds is
reported with the interquartile range, and the optimizer's share of the step:
the time of the optimizer step alone (``torch_impl.AdamW(fused)`` /
``jax_impl.adamw`` jitted) over the whole step's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# First: step_time sets GOMP_SPINCOUNT before torch (and its OpenMP) loads; see there.
from step_time import interleaved

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_impl  # noqa: E402
import torch_impl  # noqa: E402
from crosscheck import convert  # noqa: E402
from crosscheck.cifar import models  # noqa: E402
from crosscheck.cifar.training import FlaxRun, TorchRun  # noqa: E402


def run(batch_sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for batch in batch_sizes:
        torch_model, flax_model = models.simple_cnn_pair(0)
        layers = models.simple_cnn_layers(torch_model)
        names = [n for n, _ in torch_model.named_parameters()]
        torch_run = TorchRun("torch", torch_model, torch_impl.AdamW(torch_model.parameters(), fused=True))
        flax_run = FlaxRun("flax", flax_model, jax_impl.adamw(), layers, names)
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        grads = {n: p.detach().clone().normal_() for n, p in torch_model.named_parameters()}
        flax_grads = nnx.State(jax.tree.map(jnp.asarray, convert.params_to_flax(grads, layers)))

        def torch_opt():
            for n, p in torch_model.named_parameters():
                p.grad = grads[n]
            torch_run.optimizer.step()

        def flax_opt():
            flax_run.params, flax_run.opt_state = flax_run._apply(flax_grads, flax_run.params, flax_run.opt_state)
            jax.block_until_ready(flax_run.params)

        steps = {"torch step": lambda: torch_run.train_step(x, y), "flax step": lambda: flax_run.train_step(x, y),
                 "torch optimizer": torch_opt, "flax optimizer": flax_opt}
        times = interleaved(steps, repeats)  # two warm-up rounds compile the JAX steps
        med = {k: statistics.median(v) for k, v in times.items()}
        iqr = {k: np.subtract(*np.percentile(v, [75, 25])) for k, v in times.items()}
        for framework in ("torch", "flax"):
            rows.append({"batch": batch, "framework": framework, "step_ms": 1e3 * med[f"{framework} step"],
                         "step_iqr_ms": 1e3 * iqr[f"{framework} step"],
                         "optimizer_ms": 1e3 * med[f"{framework} optimizer"],
                         "optimizer_share": med[f"{framework} optimizer"] / med[f"{framework} step"],
                         "vs_torch": med[f"{framework} step"] / med["torch step"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [f"SimpleCNN training step on {jax.devices()[0].device_kind} (torch {torch.__version__}, jax "
             f"{jax.__version__}); medians of interleaved rounds.", "",
             "| batch | framework | step ms (IQR) | vs torch | AdamW ms | AdamW share of step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['framework']} | {r['step_ms']:.2f} ({r['step_iqr_ms']:.2f}) | "
                     f"{r['vs_torch']:.2f}x | {r['optimizer_ms']:.3f} | {100 * r['optimizer_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step"))
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        parser.error(f"--batch-sizes must be integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in batch_sizes) or args.repeats < 3:
        parser.error("--batch-sizes must be >= 1 and --repeats >= 3")
    rows = run(batch_sizes, args.repeats)
    text = markdown(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(rows, indent=1))
    (args.out / "report.md").write_text(text)
    print(f"report: {args.out}/report.json, report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
