"""A report is all or nothing: a failed rename, a full disk, a killed writer, a bad --out.

The full disk is a real 64 KiB tmpfs (mounted here as root); where mounting is
not allowed, the write that would not fit raises ENOSPC instead.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crosscheck import cli
from crosscheck.common import report
from crosscheck.gpu import command as gpu_command
from crosscheck.recipes import training as recipes

ROOT = Path(__file__).resolve().parents[2]
SHORT_RUN = ["trajectory", "--steps", "2", "--impls", "torch_impl(fused)"]
PREVIOUS = {"report.json": b'{"previous": true}\n', "report.md": b"the previous report\n",
            "trajectories.png": b"\x89PNG the previous figure"}


def _previous_report(out: Path, names=PREVIOUS) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).write_bytes(PREVIOUS.get(name, b"previous " + name.encode()))
    return _contents(out)


def _contents(out: Path) -> dict[str, str]:
    """Every entry of ``out`` (temporaries and directories too) with a digest of a file's bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(out.iterdir())}


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- item 2: every file of a report is the new one, or none is -------------------------------------------

def test_a_directory_in_the_way_replaces_nothing(tmp_path, capsys):
    # Was: report.json and report.md replaced, then "cannot write the report" and exit 2.
    out = tmp_path / "r"
    _previous_report(out, ["report.json", "report.md"])
    (out / "trajectories.png").mkdir()
    before = _contents(out)
    assert cli.main(["--out", str(out), *SHORT_RUN]) == 2
    assert _contents(out) == before
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out}: cannot write the report (") and "trajectories.png" in line
    assert "the previous report, if any, is unchanged" in line


def test_a_failing_rename_puts_back_the_files_already_renamed(tmp_path, monkeypatch):
    before = _previous_report(tmp_path)
    real_replace, renames = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # a rename of the new report (not of a backup put back)
            renames.append(dst)
            if len(renames) == 3:
                raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", replace)
    with pytest.raises(OSError):
        report.write_files({tmp_path / name: (lambda tmp: Path(tmp).write_text("new")) for name in PREVIOUS})
    assert len(renames) == 3
    assert _contents(tmp_path) == before  # the first two are the previous files again; no temporary, no backup


def test_a_new_file_is_removed_again_when_a_later_rename_fails(tmp_path, monkeypatch):
    (tmp_path / "b.png").mkdir()  # b.png cannot be replaced: a.json, new here, must not stay
    with pytest.raises(IsADirectoryError):
        report.write_files({tmp_path / "a.json": lambda tmp: Path(tmp).write_text("new"),
                            tmp_path / "b.png": lambda tmp: Path(tmp).write_bytes(b"png")})
    assert _contents(tmp_path) == {"b.png": "dir"}


# --- item 3: a killed writer's temporaries are removed by the next write -----------------------------------

WRITER = r"""
import sys, time
from pathlib import Path
from crosscheck.common import report
def slow(tmp):
    Path(tmp).write_text("half")
    print("writing", flush=True)
    time.sleep(600)
report.write_files({Path(sys.argv[1]) / "report.json": slow, Path(sys.argv[1]) / "report.md": slow})
"""


def _killed_writer(out: Path) -> list[str]:
    """Run a writer, kill -9 it in the middle of writing; the temporaries it left."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer runs
    left = sorted(name for name in os.listdir(out) if name.startswith("."))
    assert left and all(name.startswith(".report.json.") and name.endswith(".tmp") for name in left)
    return left


def test_the_next_write_removes_a_killed_writers_temporaries(tmp_path):
    # Was: .report.json.*.tmp stayed for ever; later runs never removed it.
    out = tmp_path / "r"
    before = _previous_report(out, ["report.json", "report.md"])
    _killed_writer(out)
    assert {k: v for k, v in _contents(out).items() if not k.startswith(".")} == before  # the previous report
    report.write_files({out / "report.json": lambda tmp: Path(tmp).write_text("new")})
    assert sorted(os.listdir(out)) == ["report.json", "report.md"]
    assert (out / "report.json").read_text() == "new"


def test_checking_out_removes_them_too_and_keeps_a_live_writers(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    _killed_writer(out)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        mine = out / f".report.md.{live.pid}.abcd1234.tmp"  # a running process's temporary: not touched
        mine.write_text("in progress")
        report.check_output_dir(out)
        assert os.listdir(out) == [mine.name]
    finally:
        live.kill()
        live.wait()
    report.check_output_dir(out)
    assert os.listdir(out) == []  # dead now: removed


# --- item 4: a full disk, and --out checked before every command runs ---------------------------------------

@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder with room for a few KiB: a 64 KiB tmpfs, nearly filled; else ENOSPC injected for a PNG."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode == 0:
        yield mount
        subprocess.run(["umount", str(mount)], check=True)
        return
    real_write = report.write_files  # no tmpfs here: ENOSPC from the PNG's write

    def no_space(writers):
        def fail(tmp):
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
        return real_write({path: (fail if Path(path).suffix == ".png" else write) for path, write in writers.items()})

    monkeypatch.setattr(report, "write_files", no_space)
    yield mount


def _fake_recipe_rows(steps: int) -> list[dict]:
    # The write is what is tested here: one row as measure() gives it, without the minutes of compiling.
    return [{"recipe": "bare adamw, apply_exact", "expected_exact": True, "steps": steps, "bitwise": True,
             "equal_elements": 1.0, "max_ulps": 0.0, "max_abs": 0.0, "max_rel": 0.0, "passed": True}]


@pytest.mark.parametrize("command, figure", [
    (["recipes", "--steps", "1"], "recipes.png"),
    (["port", "--example", "frozen_buffers", "--steps", "0"], "errors.png"),  # the issue: resnet_block (slower)
    (SHORT_RUN, "trajectories.png"),
])
def test_a_full_disk_is_exit_2_with_one_line(full_disk, capsys, monkeypatch, command, figure):
    # Was: recipes and port ended in an OSError traceback with exit 1 (the code of a mismatch).
    monkeypatch.setattr(recipes, "measure", _fake_recipe_rows)
    out = full_disk / "r"
    _previous_report(out, ["report.json", "report.md", figure])
    if os.path.ismount(full_disk):
        # Leave ~8 KiB: the text files of a report fit, its PNG (tens of KiB) does not.
        room = os.statvfs(full_disk)
        (full_disk / "filler").write_bytes(b"\0" * max(0, room.f_bavail * room.f_frsize - 8192))
    before = _contents(out)
    assert cli.main(["--out", str(out), *command]) == 2
    assert _contents(out) == before  # byte for byte, no temporary left
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out}: cannot write the report (") and "No space left on device" in line


def test_gpu_checks_out_before_it_runs(capsys, monkeypatch):
    # Was: the dry run ran every part, then failed with FileExistsError and exit 1.
    monkeypatch.setattr(gpu_command, "_run_part", lambda *a, **k: pytest.fail("a part ran"))
    assert cli.main(["--out", "/dev/null", "gpu", "--dry-run"]) == 2
    assert _one_line(capsys.readouterr().err) == "error: --out /dev/null is not a directory"


@pytest.mark.parametrize("command", [SHORT_RUN, ["suite"], ["schedules"], ["recipes"], ["cifar10"],
                                     ["port", "--example", "resnet_block"], ["gpu", "--dry-run"]])
@pytest.mark.parametrize("where", ["before", "after"])
def test_an_empty_out_is_a_usage_error(tmp_path, capsys, monkeypatch, command, where):
    # Was: --out '' meant the current folder: the run wrote report.json, report.md and the PNG there, exit 0.
    monkeypatch.chdir(tmp_path)
    argv = ["--out", "", *command] if where == "before" else [*command, "--out", ""]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "argument --out: expected a directory, got ''" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
