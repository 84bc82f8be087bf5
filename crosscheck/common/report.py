"""Writes a check's results: report.json (everything), report.md (the table), PNGs (error against step).

A report is all or nothing: every file is written to a temporary name beside
it, then all are renamed into place together (SIGINT and SIGTERM held off for
the renames); when one cannot be (a directory in its way, a full disk), the
ones already renamed are put back, so the folder holds the previous report or
the new one, never a mix.  Temporary names carry the writer's process id
(``.report.json.<pid>.<random>.tmp``): a later write into the same folder
removes those of processes that no longer run (killed with ``kill -9``).
Files get the mode the user's umask gives new files (``mkstemp`` would leave
them 0600).  ``report.json`` is strict JSON (RFC 8259): a NaN or infinite
float is written as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from crosscheck.common import interrupt

PROBE_PREFIX = ".crosscheck-write-test."
# What this module leaves behind if its process dies: temporaries, backups, the --out probe.
_LEFTOVER = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]+\.(tmp|old)$|^" + re.escape(PROBE_PREFIX)
                       + r"(?P<probe_pid>\d+)\.[a-z0-9_]+$")


class OutputError(ValueError):
    """An output path that cannot be written; the message names it."""


def check_output_dir(out: str | os.PathLike, option: str = "--out") -> Path:
    """Fail now, before a long run, if ``out`` cannot become a directory of reports.

    ``out`` must be a writable directory, or not exist under a writable
    directory (it is created when the report is written).  An empty path, a
    file (``/dev/null`` included) or a read-only folder raises
    :class:`OutputError` naming it.
    """
    if os.fspath(out) == "":
        raise OutputError(f"{option} '': empty path (give a directory; '.' for the current one)")
    out = Path(out)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a directory" if probe == out else f"cannot be created: {probe} is not a directory"
        raise OutputError(f"{option} {out} {what}")
    remove_leftovers(probe)
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=f"{PROBE_PREFIX}{os.getpid()}.")
    except OSError as err:
        raise OutputError(f"{option} {out}: cannot write in {probe} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(tmp)
    return out


@contextlib.contextmanager
def report_errors(out: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """An ``OSError`` writing the report under ``out`` becomes an :class:`OutputError` naming ``option`` (exit 2)."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"{option} {out}: cannot write the report ({err}); the previous report, if any, "
                          "is unchanged") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries, backups and probes that dead processes left in ``directory``; the paths removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _LEFTOVER.match(name)
        if match is None:
            continue
        pid = int(match.group("pid") or match.group("probe_pid"))
        if pid == os.getpid() or _alive(pid):
            continue  # a live writer's: it renames or removes it itself
        path = Path(directory) / name
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            path.unlink()
            removed.append(path)
    return removed


def _user_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (read without changing it for long)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def _sibling(path: Path, suffix: str) -> str:
    """A new empty file beside ``path``, named for this process: ``.name.<pid>.<random><suffix>``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=suffix)
    os.close(fd)
    return tmp


def _temp_for(path: Path) -> str:
    tmp = _sibling(path, ".tmp")
    os.chmod(tmp, _user_mode())
    return tmp


def _commit(temps: Mapping[Path, str]) -> None:
    """Rename every temporary onto its path, or, if one rename fails, put back those done and raise."""
    for path in temps:
        if path.is_dir():  # os.replace would fail on it, after the others: refuse before any rename
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(path))
    backups: dict[Path, str] = {}
    done: list[Path] = []
    try:
        for path in temps:
            if os.path.lexists(path):
                backups[path] = _sibling(path, ".old")
                try:
                    os.unlink(backups[path])
                    os.link(path, backups[path], follow_symlinks=False)
                except OSError:  # no hard links here (some network or FUSE file systems): a copy
                    shutil.copy2(path, backups[path], follow_symlinks=False)
        for path, tmp in temps.items():
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                os.unlink(path)
        raise
    finally:
        for backup in backups.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(backup)


def write_files(writers: Mapping[Path, Callable[[str], None]]) -> list[Path]:
    """Write each ``path`` through ``writers[path](temporary name)``, then rename them all, or none."""
    paths = [Path(path) for path in writers]
    for folder in dict.fromkeys(path.parent for path in paths):
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder)
    temps: dict[Path, str] = {}
    try:
        for path, write in zip(paths, writers.values()):
            temps[path] = _temp_for(path)
            write(temps[path])
        interrupt.check()  # a signal Python dropped during the run: the previous report stays
        with interrupt.held():
            _commit(temps)
            interrupt.wrote(paths)
    finally:
        with interrupt.held():
            for tmp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    return paths


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
