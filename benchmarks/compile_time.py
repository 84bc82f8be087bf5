"""First-call time (trace + compile + run) of each AdamW path against optax.adamw, 10 ... 5,000 leaves.

    python benchmarks/compile_time.py [--leaves 10,30,100,300,1200,5000] [--trees mixed,small]
                                      [--paths ...] [--repeats 2] [--out DIR]

Each measurement runs in a fresh Python process (nothing cached, as a user's
first step): it builds the tree, jits one step of the path and times the first
call to ``block_until_ready``.  For each tree and leaf count the paths run in
rotated order (A B C, B C A, ...) ``--repeats`` times, so a busy machine slows
all alike; the report gives the median seconds, the ratio to ``optax.adamw``
measured in the same rounds, and per path the growth exponent ``k`` of
``seconds ~ leaves**k``, a least-squares fit on the log-log points from 100
leaves up (below that a fixed cost dominates).

Trees: ``mixed`` cycles through a 128x128 matrix, a 128 vector, a 3x3x16x16
kernel and a scalar (about 4,400 parameters a leaf); ``small`` has 8 elements
a leaf (per-head or per-expert parameters).  Paths: ``apply_exact`` and
``update + apply_updates`` on the default (CPU kernel) path, the same two with
``kernel="xla"`` (the path GPUs and TPUs take), and ``optax.adamw``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as benchmarks/step_time.py: torch's OpenMP threads park

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("apply_exact", "update+apply_updates", "apply_exact[xla]", "update+apply_updates[xla]", "optax.adamw")
TREES = ("mixed", "small")
BASELINE = "optax.adamw"
FIT_FROM = 100
MIXED_SHAPES = ((128, 128), (128,), (3, 3, 16, 16), ())


def tree_shapes(tree: str, leaves: int) -> list[tuple[int, ...]]:
    if tree == "small":
        return [(8,)] * leaves
    return [MIXED_SHAPES[i % len(MIXED_SHAPES)] for i in range(leaves)]


def first_call(path: str, tree: str, leaves: int) -> float:
    """Seconds of the first jitted step of ``path`` over the tree, in this (fresh) process."""
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, str(ROOT))
    import jax_impl

    params = {f"w{i:05d}": jnp.full(shape, 0.5, jnp.float32) for i, shape in enumerate(tree_shapes(tree, leaves))}
    grads = jax.tree.map(lambda p: p * 1e-3, params)
    kernel = "xla" if path.endswith("[xla]") else "auto"
    tx = optax.adamw(1e-3) if path == BASELINE else jax_impl.adamw(1e-3, kernel=kernel)
    state = tx.init(params)
    if path.startswith("apply_exact"):
        def step(grads, state, params):
            return jax_impl.apply_exact(tx, grads, state, params)
    else:
        def step(grads, state, params):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
    jax.block_until_ready((params, state, grads))
    started = time.perf_counter()
    jax.block_until_ready(jax.jit(step)(grads, state, params))
    return time.perf_counter() - started


def measure(path: str, tree: str, leaves: int) -> float:
    """:func:`first_call` in a new process."""
    done = subprocess.run([sys.executable, __file__, "--one", path, tree, str(leaves)], capture_output=True,
                          text=True, cwd=ROOT, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{path}, {tree}, {leaves} leaves failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def growth_exponent(leaves: list[int], seconds: list[float]) -> float | None:
    """k of seconds ~ leaves**k, least squares on the points with at least FIT_FROM leaves."""
    points = [(math.log(n), math.log(s)) for n, s in zip(leaves, seconds) if n >= FIT_FROM and s > 0]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def run(leaf_counts: list[int], trees: list[str], paths: list[str], repeats: int, progress: bool) -> dict:
    rows = []
    total = len(leaf_counts) * len(trees) * len(paths) * repeats
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="run", file=sys.stderr)
    for tree in trees:
        for leaves in leaf_counts:
            times: dict[str, list[float]] = {p: [] for p in paths}
            ratios: dict[str, list[float]] = {p: [] for p in paths}
            for r in range(repeats):
                order = paths[r % len(paths):] + paths[:r % len(paths)]
                this_round = {}
                for path in order:
                    this_round[path] = measure(path, tree, leaves)
                    if bar is not None:
                        bar.set_description(f"{tree} {leaves} {path}")
                        bar.update()
                for path, seconds in this_round.items():
                    times[path].append(seconds)
                    if BASELINE in this_round:
                        ratios[path].append(seconds / this_round[BASELINE])
            for path in paths:
                rows.append({"tree": tree, "leaves": leaves, "path": path, "seconds": times[path],
                             "median_s": statistics.median(times[path]),
                             "vs_optax": statistics.median(ratios[path]) if ratios[path] else None})
    if bar is not None:
        bar.close()
    fits = {}
    for tree in trees:
        for path in paths:
            mine = [r for r in rows if r["tree"] == tree and r["path"] == path]
            fits[f"{tree}/{path}"] = growth_exponent([r["leaves"] for r in mine], [r["median_s"] for r in mine])
    return {"rows": rows, "growth_exponent": fits, "fit_from_leaves": FIT_FROM, "repeats": repeats}


def markdown(report: dict) -> str:
    rows, fits = report["rows"], report["growth_exponent"]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    lines = []
    for tree in dict.fromkeys(r["tree"] for r in rows):
        lines += [f"### {tree} tree: first call (trace + compile + run), median seconds (ratio to {BASELINE})", "",
                  "| leaves | " + " | ".join(paths) + " |", "|---" * (len(paths) + 1) + "|"]
        for leaves in dict.fromkeys(r["leaves"] for r in rows):
            cells = []
            for path in paths:
                row = next(r for r in rows if r["tree"] == tree and r["leaves"] == leaves and r["path"] == path)
                ratio = "" if row["vs_optax"] is None or path == BASELINE else f" ({row['vs_optax']:.2f}x)"
                cells.append(f"{row['median_s']:.2f}{ratio}")
            lines.append(f"| {leaves} | " + " | ".join(cells) + " |")
        exps = [fits[f"{tree}/{p}"] for p in paths]
        lines.append("| growth k | " + " | ".join("" if k is None else f"{k:.2f}" for k in exps) + " |")
        lines.append("")
    lines.append(f"k: least-squares slope of log(seconds) on log(leaves) from {report['fit_from_leaves']} leaves up.")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    trees = list(dict.fromkeys(r["tree"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, axes = plt.subplots(1, len(trees), figsize=(6 * len(trees), 4.5), squeeze=False)
    styles = ["-o", "--s", "-^", "--v", ":D"]
    for ax, tree in zip(axes[0], trees):
        for k, p in enumerate(paths):
            mine = [r for r in rows if r["tree"] == tree and r["path"] == p]
            exponent = report["growth_exponent"][f"{tree}/{p}"]
            label = p + ("" if exponent is None else f" (k={exponent:.2f})")
            ax.plot([r["leaves"] for r in mine], [r["median_s"] for r in mine], styles[k % len(styles)], label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("leaves")
        ax.set_ylabel("first call, seconds")
        ax.set_title(f"{tree} tree")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # a single measurement, in its own process
        print(first_call(argv[1], argv[2], int(argv[3])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", default="10,30,100,300,1200,5000", help="comma-separated leaf counts")
    parser.add_argument("--trees", default=",".join(TREES), help="comma-separated: " + ", ".join(TREES))
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_time"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        leaf_counts = [int(float(x)) for x in args.leaves.split(",") if x]
    except ValueError:
        parser.error(f"--leaves must be numbers, got {args.leaves!r}")
    trees = [t for t in args.trees.split(",") if t]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not leaf_counts or any(n < 1 for n in leaf_counts):
        parser.error(f"--leaves must be positive, got {args.leaves!r}")
    if not trees or any(t not in TREES for t in trees):
        parser.error(f"--trees takes {', '.join(TREES)}, got {args.trees!r}")
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--paths takes {', '.join(PATHS)}, got {args.paths!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    report = run(leaf_counts, trees, paths, args.repeats, not args.no_progress)
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (args.out / "report.md").write_text(text + "\n")
    plot(report, args.out / "compile_time.png")
    print(f"report: {args.out}/report.json, report.md, compile_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
