"""The ``cifar10`` command: load and verify the data, run both trainings, print and write the report."""

from __future__ import annotations

import sys
import time

from crosscheck.cifar import data as cifar10
from crosscheck.cifar import report as cifar_report
from crosscheck.cifar.parity import Config, run
from crosscheck.common.report import report_errors


def main_run(cfg: Config, data_dir=None, download: bool = False, out=None, progress: bool = True) -> int:
    """The CLI's ``cifar10`` command: 0 pass, 1 mismatch, 2 bad usage or data."""
    try:
        cfg.validate()
        if download:
            cifar10.download(data_dir)
        data = cifar10.load(data_dir)
    except (ValueError, cifar10.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = run(cfg, data, progress)
    print(cifar_report.markdown(result))
    print(f"{len(result.step_loss[result.runs[0]])} steps in {time.perf_counter() - started:.0f} s")
    if out is not None:
        with report_errors(out):
            paths = cifar_report.write(result, out)
        print("report: " + ", ".join(str(p) for p in paths))
    for check in result.checks:
        if not check["pass"]:
            print(f"MISMATCH: {check['check']}: {check['value']:.4g} > {check['bound']:.4g}", file=sys.stderr)
    return 0 if result.passed else 1
