"""Writes a check's results: report.json (everything), report.md (the table), PNGs (error against step).

Files are written to a temporary name and renamed, so a crash leaves no half-written report.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crosscheck.trajectory import TrajectoryResult


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def _fmt_ulps(x: float) -> str:
    return "inf" if not np.isfinite(x) else f"{x:.0f}"


def summary_rows(results: Sequence[TrajectoryResult]) -> list[dict]:
    rows = []
    for r in results:
        for pair, s in r.summary.items():
            rows.append({"case": r.case, "pair": pair, **s})
    return rows


def markdown(results: Sequence[TrajectoryResult]) -> str:
    lines = ["| case | implementation | vs | bitwise | max ulps (param / m / v) | max abs. err. (param) "
             "| drift | err. vs float64 ref. (x torch path's) | pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary_rows(results):
        u = row["max_ulps"]
        bitwise = "**yes**" if row["bitwise"] else f"no ({100 * row['min_bitwise_fraction']['param']:.1f}% equal)"
        ratio = row["reference_error_ratio"]
        lines.append(
            f"| {row['case']} | {row['implementation']} | {row['against']} | {bitwise} | "
            f"{_fmt_ulps(u['param'])} / {_fmt_ulps(u['exp_avg'])} / {_fmt_ulps(u['exp_avg_sq'])} | "
            f"{row['max_abs']['param']:.2e} | {row['drift']} | {'-' if ratio is None else f'{ratio:.2f}'} | "
            f"{'pass' if row['pass'] else 'FAIL: ' + row['why']} |")
    failures = [row for row in summary_rows(results) if not row["pass"]]
    if failures:
        lines += ["", "First mismatches of failing pairs:", ""]
        for row in failures:
            lines.append(f"- {row['case']}: {row['pair']}: {row['first_mismatch']}")
    lines += ["", "Ulps are counted between neighbouring representable values, so a parameter near 0 "
              "shows many ulps for a tiny absolute error: read them with the relative error.", ""]
    return "\n".join(lines)


def to_json(results: Sequence[TrajectoryResult]) -> dict:
    cases = []
    for r in results:
        cases.append({
            "case": r.case, "hyper": r.hyper, "steps": r.steps, "mode": r.mode, "baseline": r.baseline,
            "summary": r.summary,
            "series": {f"{name} vs {against}": {"max_ulps": s.max_ulps, "max_abs": s.max_abs, "max_rel": s.max_rel,
                                                 "bitwise_fraction": s.bitwise_fraction}
                       for (name, against), s in r.vs_baseline.items()},
            "vs_reference64": {name: {"max_abs": s.max_abs, "max_ulps": s.max_ulps}
                               for name, s in r.vs_reference.items()},
        })
    return {"passed": all(r.passed() for r in results), "cases": cases}


def plot(results: Sequence[TrajectoryResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        steps = np.arange(1, r.steps + 1)
        for (name, against), s in r.vs_baseline.items():
            err = np.asarray(s.max_abs["param"])
            label = f"{name} vs {against}" + (" (bitwise)" if not np.any(err > 0) else "")
            ax.plot(steps, np.where(err > 0, err, np.nan), label=label, lw=1)
        for name, s in r.vs_reference.items():
            if name == r.baseline:
                ax.plot(steps, s.max_abs, "k--", lw=1, label=f"{name} vs float64 reference")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_title(r.case, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("max |param error|")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write(results: Sequence[TrajectoryResult], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "trajectories.png"}
    write_text(paths["json"], json.dumps(to_json(results), indent=1, default=float))
    write_text(paths["md"], markdown(results))
    plot(results, paths["png"])
    return paths
