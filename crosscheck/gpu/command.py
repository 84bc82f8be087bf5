"""``python -m crosscheck gpu --out DIR``: everything the GPU half of the project needs measured, in one command.

Parts, each under its share of ``--budget`` (seconds), each recorded in the
report whether it passed, failed, ran out of time or raised (the others go on):

* ``parity``: trajectory parity on the device of ``jax_impl.adamw`` (its
  default rounding: torch's CUDA kernel's on a GPU) against
  ``torch.optim.AdamW(fused=True)`` on CUDA, with foreach, for-loop,
  optax.adamw and the float64 reference, for the suite's cases and dtypes
  (``crosscheck.suite.SUITE`` through ``suite.run_case``); then, re-synced each
  step, every nvcc contraction candidate (``jax_impl.CudaRounding``) and the
  NumPy emulation against torch, per dtype: the bitwise ones are the model;
  and the device's ``pow`` bias corrections against the host tables.
* ``step_time``: ``benchmarks/step_time.py`` on the device, 1e6..1e9 params,
  one tensor and ~300 leaves, with a device-to-device copy in the same
  interleaved rounds (the HBM bandwidth): ms/step, % of bandwidth, compile s.
* ``train_step``: SimpleCNN and a small transformer, forward + backward +
  AdamW: Flax (XLA) against torch eager and torch.compile (CUDA).
* ``cifar10``: the CIFAR-10 shared-gradients run on the device (torch
  computes each step's gradients on CUDA, torch's fused CUDA AdamW and
  ``jax_impl.adamw`` step on them: bitwise at every step, or the first step
  that is not).  Skipped, with a line saying so, without data.

Without a GPU (torch without CUDA, or JAX without a GPU backend) it says so
and exits 2; ``--dry-run`` runs every part on the CPU at tiny sizes instead,
so CI tests the plumbing.  Exit status: 0 every part ran and parity held, 1 a
mismatch or a part that failed or ran out of time, 2 usage, no GPU or an
``--out`` that cannot be written (checked before any part runs), 130
interrupted (Ctrl-C or SIGTERM: the report so far is written, and one line
on stderr says where).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

from crosscheck.common import interrupt
from crosscheck.gpu.cifar import part_cifar10
from crosscheck.gpu.parity import part_parity
from crosscheck.gpu.report import markdown, write_report
from crosscheck.gpu.settings import (Clock, PartTimeout, Settings,
                                     free_device_memory, say)
from crosscheck.gpu.speed import part_step_time
from crosscheck.gpu.training import part_train_step

PARTS = ("parity", "step_time", "train_step", "cifar10")
# Share of the budget per part; time a part leaves unused goes to the later ones.
SHARES = {"parity": 0.3, "step_time": 0.35, "train_step": 0.15, "cifar10": 0.2}
DEFAULT_BUDGET = 1500.0
ALARM_GRACE_S = 30.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("gpu", help="parity with torch's CUDA AdamW, step time vs HBM bandwidth, training "
                                          "steps and CIFAR-10 on a GPU (one command)",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help="seconds for all parts together (default %(default)g); shares: "
                        + ", ".join(f"{k} {int(100 * v)}%" for k, v in SHARES.items()))
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--data-dir", type=Path, default=None, help="CIFAR-10 (else $CROSSCHECK_CIFAR10_DIR)")
    p.add_argument("--dry-run", action="store_true", help="run every part on the CPU at tiny sizes, to test the plumbing (on a GPU machine: with JAX_PLATFORMS=cpu)")
    return p


def _no_gpu_reason() -> str | None:
    import jax
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if jax.default_backend() != "gpu":
        return f"JAX {jax.__version__} has no GPU backend (default backend: {jax.default_backend()})"
    return None


def run(args) -> int:
    """The ``gpu`` command: 0 pass, 1 mismatch or failed part, 2 usage or no GPU, 130 interrupted."""
    # Before JAX touches the device: torch and JAX share it, so JAX must not take 75% of it up front,
    # and must give freed buffers back (the 1e9 benchmarks need the memory in turn).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    from crosscheck.common.report import check_output_dir, report_errors

    out = args.out if args.out != Path("crosscheck-report") else Path("crosscheck-report/gpu")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        print(f"error: --parts: unknown part(s) {unknown or args.parts!r}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    if not (args.budget > 0 and math.isfinite(args.budget)):
        print(f"error: --budget must be a positive number of seconds, got {args.budget}", file=sys.stderr)
        return 2
    if not args.dry_run:
        reason = _no_gpu_reason()
        if reason is not None:
            print(f"error: no GPU: {reason}; nothing measured (--dry-run runs the plumbing on the CPU)",
                  file=sys.stderr)
            return 2
    check_output_dir(out)  # the CLI did; gpu.run(args) may be called directly
    settings = Settings("cpu" if args.dry_run else "cuda", args.dry_run,
                        progress=not args.no_progress and sys.stderr.isatty(), data_dir=args.data_dir)
    report = {"command": "python -m crosscheck gpu", "dry_run": args.dry_run, "budget_s": args.budget,
              "environment": _environment(settings), "parts": {}}
    started = time.monotonic()
    end = started + args.budget
    interrupted = False
    for i, name in enumerate(parts):
        remaining_share = sum(SHARES[p] for p in parts[i:])
        seconds = max(0.0, (end - time.monotonic()) * SHARES[name] / remaining_share)
        say(f"part {name}: budget {seconds:.0f} s")
        try:
            report["parts"][name] = _run_part(name, settings, out, Clock(time.monotonic() + seconds), seconds)
        except KeyboardInterrupt:
            interrupt.acknowledge()  # handled: the report so far is written (a second signal stops that too)
            report["parts"][name] = {"status": "interrupted"}
            interrupted = True
            break
        say(f"part {name}: {report['parts'][name]['status']} in {report['parts'][name].get('seconds', 0):.0f} s")
    report["seconds"] = time.monotonic() - started
    report["passed"] = all(p.get("status") in ("pass", "skipped") for p in report["parts"].values())
    with report_errors(out):
        paths = write_report(report, out)
    print(markdown(report))
    print("report: " + ", ".join(str(p) for p in paths))
    if interrupted:
        print(f"interrupted (the report so far is in {out})", file=sys.stderr)
        return 130
    return 0 if report["passed"] else 1


def _environment(settings: Settings) -> dict:
    import jax
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
           "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
           "torch_device": settings.device}
    if settings.device == "cuda":
        env["torch_cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


@contextlib.contextmanager
def _alarm(seconds: float):
    """A backstop for a part stuck in one long unit: PartTimeout once ``seconds`` have passed (main thread, Unix)."""
    usable = hasattr(signal, "SIGALRM") and threading_is_main()
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise PartTimeout(f"still running {seconds:.0f} s after its start")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_part(name: str, settings: Settings, out: Path, clock: Clock, seconds: float) -> dict:
    """Run one part: its result, with status pass / mismatch / error / timeout / skipped and its seconds."""
    fn = {"parity": part_parity, "step_time": part_step_time, "train_step": part_train_step,
          "cifar10": part_cifar10}[name]
    started = time.monotonic()
    partial: dict = {}
    try:
        # Parts stop themselves at the deadline; the alarm (deadline + 25% + grace) catches one long unit.
        with _alarm(1.25 * seconds + ALARM_GRACE_S):
            result = fn(settings, out, clock, partial)
    except PartTimeout as err:
        result = {**partial, "status": "timeout", "error": str(err)}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001  -- one part failing must not stop the others
        result = {**partial, "status": "error", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=8)}
    finally:
        gc.collect()
        free_device_memory(settings)
    result["seconds"] = time.monotonic() - started
    result["budget_s"] = seconds
    return result
