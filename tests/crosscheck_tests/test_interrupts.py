"""Ctrl-C and SIGTERM at any moment of ``python -m crosscheck``: exit 130, one line, the previous report kept.

Real signals to real processes: at the first moment crosscheck's code can act
(its handler seen in /proc), at fixed delays during the imports, in the
middle of the run and in the middle of writing the report (a marker printed
by a patched function says when).  In process: a signal that lands in a gc
callback or a ``__del__`` (where Python drops the exception) still stops the
run, and never lets the report be replaced.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crosscheck.common import interrupt, report

ROOT = Path(__file__).resolve().parents[2]
LONG_RUN = ["trajectory", "--steps", "1000000", "--impls", "jax_impl"]
SHORT_RUN = ["trajectory", "--steps", "3", "--impls", "torch_impl(fused)"]
PREVIOUS = {"report.json": b'{"previous": true}\n', "report.md": b"the previous report\n",
            "trajectories.png": b"\x89PNG the previous figure"}
LINE = {signal.SIGINT: "interrupted (no report written)",
        signal.SIGTERM: "interrupted by SIGTERM (no report written)"}

# python -c: the CLI as `python -m crosscheck` runs it (its __main__), with one function patched to print a
# marker on stdout when it is first reached, so that the test signals at a known point of the run.
MARKED = r"""
import importlib, runpy, sys, time
target, marker, then_sleep = sys.argv[1], sys.argv[2], sys.argv[3] == "sleep"
module_name, _, path = target.partition(":")
*owners, attribute = path.split(".")
owner = importlib.import_module(module_name)
for name in owners:
    owner = getattr(owner, name)
original = getattr(owner, attribute)
def marked(*args, **kwargs):
    if marker:
        print(marker, flush=True)
    if then_sleep:
        time.sleep(600)
    return original(*args, **kwargs)
setattr(owner, attribute, marked)
sys.argv = ["crosscheck", *sys.argv[4:]]
runpy.run_module("crosscheck", run_name="__main__", alter_sys=True)
"""


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _previous_report(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in PREVIOUS.items():
        (out / name).write_bytes(data)
    return _contents(out)


def _contents(out: Path) -> dict[str, str]:
    """Every entry of ``out`` (temporaries too) with a digest of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def _signal_handled(pid: int, signum: int) -> bool:
    """The process has a handler for ``signum`` (SigCgt in /proc): crosscheck's code is running."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _check_interrupted(rc: int, err: str, out_dir: Path, before: dict, signum: int) -> None:
    assert rc == 130, err
    assert err.splitlines() == [LINE[signum]], err  # one line: no traceback, no "Exception ignored"
    assert _contents(out_dir) == before  # the previous report byte for byte, and nothing beside it


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_the_first_moment_crosscheck_runs(tmp_path, signum):
    # Was: a Ctrl-C in crosscheck/__init__'s imports gave a traceback and status -2 (SIGTERM: -15, no line).
    out = tmp_path / "r"
    before = _previous_report(out)
    proc = subprocess.Popen([sys.executable, "-m", "crosscheck", "--out", str(out), *LONG_RUN], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # SIGTERM's handler is crosscheck's alone (Python installs one for SIGINT itself): poll until it is there.
    for _ in range(100_000):
        if _signal_handled(proc.pid, signal.SIGTERM) or proc.poll() is not None:
            break
    if not _signal_handled(proc.pid, signal.SIGTERM):
        proc.kill()
        _finish(proc)
        pytest.fail("crosscheck installed no SIGTERM handler")
    proc.send_signal(signum)
    rc, _, err = _finish(proc)
    _check_interrupted(rc, err, out, before, signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_signal_while_torch_and_jax_import(tmp_path, signum, delay):
    # Was: "Exception ignored in _xla_gc_callback" and a traceback before the line, an ImportError from
    # jaxlib, a segmentation fault; in the tries also status 0 and a replaced report.
    out = tmp_path / "r"
    before = _previous_report(out)
    proc = subprocess.Popen([sys.executable, "-m", "crosscheck", "--out", str(out), *LONG_RUN], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signum)
    rc, _, err = _finish(proc)
    _check_interrupted(rc, err, out, before, signum)


def _marked_run(tmp_path: Path, target: str, marker: str, sleep: bool, args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", MARKED, target, marker, "sleep" if sleep else "-", *args],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the run prints its table before the report is written
        if line.strip() == marker:
            return proc
    pytest.fail(f"no {marker!r} from the run: {proc.stderr.read()}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_the_middle_of_the_run(tmp_path, signum):
    # Was, for SIGTERM: status -15 and no line (the previous report survived: still so).
    out = tmp_path / "r"
    before = _previous_report(out)
    proc = _marked_run(tmp_path, "crosscheck.common.interrupt:check", "stepping", False,
                       ["--out", str(out), *LONG_RUN])
    proc.send_signal(signum)
    rc, _, err = _finish(proc)
    _check_interrupted(rc, err, out, before, signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_the_report_is_written(tmp_path, signum):
    # The figure is saved last, after report.json and report.md went to their temporaries.
    # Was, for SIGTERM: status -15 and three .*.tmp files left beside the previous report.
    out = tmp_path / "r"
    before = _previous_report(out)
    proc = _marked_run(tmp_path, "matplotlib.figure:Figure.savefig", "saving", True, ["--out", str(out), *SHORT_RUN])
    assert any(name.endswith(".tmp") for name in os.listdir(out))  # the signal lands mid-write
    proc.send_signal(signum)
    rc, _, err = _finish(proc)
    _check_interrupted(rc, err, out, before, signum)


def test_gomp_spincount_is_set_before_torch_loads(tmp_path):
    # libgomp reads GOMP_SPINCOUNT once, when torch loads it: __main__ must set it first, keeping the user's.
    spy = ("import os, runpy, sys\n"
           "class Spy:\n"
           "    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'torch':  # what torch would see; no need to load it\n"
           "            print('GOMP_SPINCOUNT', os.environ.get('GOMP_SPINCOUNT'), flush=True)\n"
           "            os._exit(0)\n"
           "sys.meta_path.insert(0, Spy())\n"
           "sys.argv = ['crosscheck', '--help']\n"
           "runpy.run_module('crosscheck', run_name='__main__', alter_sys=True)\n")
    env = _env()
    env.pop("GOMP_SPINCOUNT", None)
    for user, seen in ((None, "10000"), ("123", "123")):
        if user is not None:
            env["GOMP_SPINCOUNT"] = user
        done = subprocess.run([sys.executable, "-c", spy], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == f"GOMP_SPINCOUNT {seen}"


def _wait_for_keyboard_interrupt() -> None:
    """Bytecodes to run on until the re-delivered signal raises (bounded: a lost interrupt fails, it does not hang)."""
    for _ in range(2000):
        time.sleep(0.005)
    pytest.fail("the interrupt was lost")


def test_a_signal_inside_a_gc_callback_still_stops_the_run(capfd):
    # Was: the handler saw the gc callback and raised nothing; only interrupt.check() (which the recipes
    # and port commands never call) would have stopped the run.
    armed = [True]

    def callback(phase, info):
        if phase == "start" and armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the handler runs here, inside the callback, where Python drops its exception

    gc.callbacks.append(callback)
    try:
        with interrupt.handling():
            with pytest.raises(KeyboardInterrupt):
                gc.collect()
                _wait_for_keyboard_interrupt()
    finally:
        gc.callbacks.remove(callback)
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_signal_inside_a_del_still_stops_the_run(capfd):
    class Bomb:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))

    with interrupt.handling():
        with pytest.raises(KeyboardInterrupt):
            Bomb()
            _wait_for_keyboard_interrupt()
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_dropped_signal_keeps_the_previous_report(tmp_path, monkeypatch):
    # Even before the signal is delivered again, a report is not renamed into place after an interrupt.
    monkeypatch.setattr(interrupt, "REDELIVERY_S", 30.0)
    before = _previous_report(tmp_path)

    class Bomb:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))

    with interrupt.handling():
        Bomb()
        with pytest.raises(KeyboardInterrupt):
            report.write_files({tmp_path / "report.json": lambda tmp: Path(tmp).write_text("new")})
    assert _contents(tmp_path) == before


def test_sigterm_is_an_interrupt_in_process():
    with interrupt.handling():
        with pytest.raises(interrupt.Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for_keyboard_interrupt()
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
    assert interrupt.message(info.value) == LINE[signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
