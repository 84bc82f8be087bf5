from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crosscheck.common.report import strict_json, write_report
from crosscheck.trajectory.harness import TrajectoryResult


def _fmt_ulps(x: float) -> str:
    return "inf" if not np.isfinite(x) else f"{x:.0f}"


def summary_rows(results: Sequence[TrajectoryResult]) -> list[dict]:
    rows = []
    for r in results:
        for pair, s in r.summary.items():
            rows.append({"case": r.case, "pair": pair, **s})
    return rows


def _cell(row: dict) -> str:
    """One matrix cell: bitwise, or the parameter's max ulps and the drift; FAIL first when it fails."""
    if row.get("first_nonfinite"):
        text = f"NaN/inf from step {row['first_nonfinite']['step']}"
    elif row["bitwise"]:
        text = "**bitwise**"
    else:
        drift = row["drift"].split(" (")[0]
        text = f"{_fmt_ulps(row['max_ulps']['param'])} ulps, {drift}"
    return text if row["pass"] else f"**FAIL**: {text}"


def matrix(results: Sequence[TrajectoryResult]) -> str:
    """Cases x implementations: each cell bitwise, or max ulps of the parameters and the drift."""
    columns: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for r in results:
        for row in r.summary.values():
            column = _pair_label(row["implementation"], row["against"], r.baseline)
            if column not in columns:
                columns.append(column)
            cells[r.case, column] = _cell(row)
    baselines = sorted({r.baseline for r in results})
    lines = [f"Each implementation against {', '.join(baselines)} (max ulps of the parameters over all steps, "
             "and how the error grows: bounded / random walk / linear):", "",
             "| case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in results:
        lines.append(f"| {r.case} | " + " | ".join(cells.get((r.case, c), "-") for c in columns) + " |")
    return "\n".join(lines)


def markdown(results: Sequence[TrajectoryResult]) -> str:
    passed = all(r.passed() for r in results)
    failures = [row for row in summary_rows(results) if not row["pass"]]
    lines = [f"**{'PASS' if passed else 'FAIL'}**: {len(results)} case(s), "
             f"{sum(len(r.summary) for r in results)} pairs, {len(failures)} failing.", "", matrix(results), "",
             "## Details", "",
             "| case | implementation | vs | bitwise | max ulps (param / m / v) | max abs. err. (param) "
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
    if failures:
        lines += ["", "First mismatches of failing pairs:", ""]
        for row in failures:
            where = row.get("first_nonfinite") or row["first_mismatch"]
            lines.append(f"- {row['case']}: {row['pair']}: {row['why']}; {where}")
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


def _pair_label(name: str, against: str, baseline: str) -> str:
    return name if against == baseline else f"{name} vs {against}"


def figure(results: Sequence[TrajectoryResult]):
    """One panel per case: each pair's max |param error| per step; bitwise pairs named in the panel.

    A bitwise pair has no point on a log axis, so instead of drawing nothing
    the panel says "bitwise: ...".  One colour per pair in every panel, and one
    legend for the figure, below the panels, so no legend covers a curve.
    Pairs with identical errors are drawn on one another, the first widest (so
    every colour shows), and named in the panel's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n = len(results)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    colors: dict[str, tuple] = {}  # pair label -> colour, the same in every panel
    shown: set[str] = set()  # labels with a curve somewhere (the legend's)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows + 1.2), squeeze=False)
    for ax, r in zip(axes.flat, results):
        steps = np.arange(1, r.steps + 1)
        bitwise = []
        curves: dict[bytes, list[str]] = {}  # identical errors -> the pairs that have them
        for (name, against), s in r.vs_baseline.items():
            label = _pair_label(name, against, r.baseline)
            colors.setdefault(label, plt.cm.tab10(len(colors) % 10))
            err = np.asarray(s.max_abs["param"], np.float64)
            if s.first_mismatch is None and s.first_nonfinite is None:
                bitwise.append(label)
            else:
                curves.setdefault(err.tobytes(), []).append(label)
        drawn = 0
        for key, members in curves.items():
            err = np.frombuffer(key, np.float64)
            for label in members:
                # Nearly equal or identical curves: the earlier drawn wider, so it shows around the later one.
                ax.plot(steps, np.where(err > 0, err, np.nan), lw=max(1.0, 2.6 - 0.6 * drawn), color=colors[label])
                shown.add(label)
                drawn += 1
        for name, s in r.vs_reference.items():
            if name == r.baseline:
                ax.plot(steps, s.max_abs, "k--", lw=1)
        ax.set_yscale("log")
        ax.set_xscale("log")
        title = r.case
        same = [" = ".join(members) for members in curves.values() if len(members) > 1]
        if same:
            title += "\n" + textwrap.fill("identical errors: " + "; ".join(same), 95)
        if bitwise:  # said in words: a zero error has no point on a log axis
            title += "\n" + textwrap.fill("bitwise at every step: " + ", ".join(bitwise), 95)
        ax.set_title(title, fontsize=7.5)
        ax.set_xlabel("step")
        ax.set_ylabel(f"max |param error| vs {r.baseline}", fontsize=8)
        if not ax.has_data():
            ax.text(0.5, 0.5, "all pairs bitwise", transform=ax.transAxes, ha="center", va="center")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [Line2D([], [], color=color, lw=1.5, label=label) for label, color in colors.items() if label in shown]
    handles.append(Line2D([], [], color="k", ls="--", lw=1, label="baseline vs float64 reference"))
    fig.legend(handles=handles, loc="lower center", ncol=min(2, len(handles)), fontsize=8, frameon=False)
    legend_rows = (len(handles) + 1) // 2
    fig.tight_layout(rect=(0, min(0.5, (0.2 + 0.2 * legend_rows) / (4.2 * rows + 1.2)), 1, 1))
    return fig


def plot(results: Sequence[TrajectoryResult], path: Path) -> None:
    write_report({}, path, figure(results), dpi=110)


def write(results: Sequence[TrajectoryResult], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "trajectories.png"}
    text_json, text_md = strict_json(to_json(results)), markdown(results)
    write_report({paths["json"]: text_json, paths["md"]: text_md}, paths["png"], figure(results), dpi=110)
    return paths
