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
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np


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


def atomic_write(path: Path, write) -> None:
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
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


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
