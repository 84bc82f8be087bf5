"""Writes a check's results: report.json (everything), report.md (the table), PNGs (error against step).

Every file is written to a temporary name and renamed, all of a report's
files together at the end (with SIGINT held off for the renames), so a crash
or an interrupt leaves the previous report or none, never a partial one.
Files get the mode the user's umask gives new files (``mkstemp`` would leave
them 0600).  ``report.json`` is strict JSON (RFC 8259): a NaN or infinite
float is written as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from crosscheck.trajectory import TrajectoryResult


class OutputError(ValueError):
    """An output path that cannot be written; the message names it."""


def check_output_dir(out: str | os.PathLike, option: str = "--out") -> Path:
    """Fail now, before a long run, if ``out`` cannot become a directory of reports.

    ``out`` must be a writable directory, or not exist under a writable
    directory (it is created when the report is written).  A file (``/dev/null``
    included) or a read-only folder raises :class:`OutputError` naming it.
    """
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe == out else f"cannot be created: {probe} is not a directory"
        raise OutputError(f"{option} {out} {what}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".crosscheck-write-test.")
    except OSError as err:
        raise OutputError(f"{option} {out}: cannot write in {probe} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(tmp)
    return out


def _user_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (read without changing it for long)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_for(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _user_mode())
    return tmp


def write_files(writers: Mapping[Path, Callable[[str], None]]) -> list[Path]:
    """Write each ``path`` through ``writers[path](temporary name)``, then rename them all, or none."""
    temps: dict[Path, str] = {}
    try:
        for path, write in writers.items():
            temps[Path(path)] = _temp_for(Path(path))
            write(temps[Path(path)])
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for path, tmp in temps.items():
                os.replace(tmp, path)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return list(temps)


def _atomic_write(path: Path, write) -> None:
    write_files({Path(path): write})


def write_report(texts: Mapping[Path, str], figure_path: Path, fig, dpi: int = 100) -> None:
    """The ``texts`` and ``fig`` as a PNG, all renamed into place or none (:func:`write_files`); ``fig`` closed."""
    import matplotlib.pyplot as plt

    writers = {Path(path): (lambda tmp, text=text: Path(tmp).write_text(text)) for path, text in texts.items()}
    writers[Path(figure_path)] = lambda tmp: fig.savefig(tmp, dpi=dpi, format="png")
    try:
        write_files(writers)
    finally:
        plt.close(fig)


def write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def _strict(value):
    """JSON-ready: NaN and infinities as strings, numpy scalars and arrays as Python values."""
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if value is None or isinstance(value, str):
        return value
    return str(value)  # paths, dtypes: their names


def strict_json(value) -> str:
    """``json.dumps`` that never writes the bare ``NaN``/``Infinity`` tokens strict readers reject."""
    return json.dumps(_strict(value), indent=1, allow_nan=False)


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
    the panel says "bitwise: ...".  One legend for the figure, below the
    panels, with one colour per pair in every panel, so no legend covers a curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n = len(results)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    colors: dict[str, tuple] = {}  # curve label -> colour, the same in every panel
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows + 1.2), squeeze=False)
    for ax, r in zip(axes.flat, results):
        steps = np.arange(1, r.steps + 1)
        bitwise = []
        curves: dict[bytes, list[str]] = {}  # pairs with identical errors share one curve and one label
        for (name, against), s in r.vs_baseline.items():
            label = _pair_label(name, against, r.baseline)
            err = np.asarray(s.max_abs["param"], np.float64)
            if s.first_mismatch is None and s.first_nonfinite is None:
                bitwise.append(label)
            else:
                curves.setdefault(err.tobytes(), []).append(label)
        for index, (key, members) in enumerate(curves.items()):
            label = " = ".join(members)
            color = colors.setdefault(label, plt.cm.tab10(len(colors) % 10))
            err = np.frombuffer(key, np.float64)
            # Nearly equal curves: the earlier drawn wider, so it shows around the later one.
            ax.plot(steps, np.where(err > 0, err, np.nan), lw=max(1.0, 2.6 - 0.6 * index), color=color)
        for name, s in r.vs_reference.items():
            if name == r.baseline:
                ax.plot(steps, s.max_abs, "k--", lw=1)
        ax.set_yscale("log")
        ax.set_xscale("log")
        title = r.case
        if bitwise:  # said in words: a zero error has no point on a log axis
            title += "\n" + textwrap.fill("bitwise at every step: " + ", ".join(bitwise), 95)
        ax.set_title(title, fontsize=7.5)
        ax.set_xlabel("step")
        ax.set_ylabel(f"max |param error| vs {r.baseline}", fontsize=8)
        if not ax.has_data():
            ax.text(0.5, 0.5, "all pairs bitwise", transform=ax.transAxes, ha="center", va="center")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [Line2D([], [], color=color, lw=1.5, label=label) for label, color in colors.items()]
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
