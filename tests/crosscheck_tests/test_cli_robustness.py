"""Exit codes, interrupts and outputs of ``python -m crosscheck``: nothing silent, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crosscheck import cli
from crosscheck.common import report
from crosscheck.trajectory import report as trajectory_report

ROOT = Path(__file__).resolve().parents[2]


def _strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("command", [["schedules"], ["trajectory", "--steps", "3"], ["suite"],
                                     ["cifar10", "--max-steps", "1"]])
@pytest.mark.parametrize("out", ["/dev/null", "a-file", "a-file/below"])
def test_unwritable_out_is_a_usage_error_before_the_run(tmp_path, capsys, monkeypatch, command, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    # The run must not start: a check that started would call this.
    monkeypatch.setattr(cli, "run_case", lambda *a, **k: pytest.fail("the run started"))
    assert cli.main(["--out", out, *command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out}") and "not a directory" in err and "\n" not in err


def test_read_only_out_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # The tests run as root here, where chmod 555 does not stop writes: refuse the probe file instead.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(report.tempfile, "mkstemp", refuse)
    assert cli.main(["--out", str(tmp_path / "r"), "schedules"]) == 2
    assert "cannot write in" in capsys.readouterr().err
    if os.geteuid() != 0:
        monkeypatch.undo()
        (tmp_path / "ro").mkdir(mode=0o555)
        assert cli.main(["--out", str(tmp_path / "ro" / "r"), "schedules"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--impls", ""], "--impls '': nothing to compare with the baseline"),
    (["--impls", "torch.AdamW(fused)"], "nothing to compare with the baseline torch.AdamW(fused)"),
    (["--impls", "reference64"], "nothing to compare"),
    (["--baseline", "reference64"], "--baseline reference64: the float64 reference is compared with every run"),
])
def test_trajectory_without_a_comparison_is_refused(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["--out", str(tmp_path), "trajectory", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_subcommand_help_has_text_and_defaults(capsys):
    for command in ("trajectory", "cifar10", "schedules", "suite"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # help wraps lines
        assert "--no-progress" in text and "--out" in text
        if command == "trajectory":
            assert "(default: 500)" in text and "optimizer steps" in text and "(default: 0.999)" in text
        if command == "cifar10":
            assert "(default: independent)" in text and "(default: 32)" in text


def test_no_progress_after_the_subcommand_and_no_bars_off_a_terminal(tmp_path, capsys):
    args = cli._parser().parse_args(["trajectory", "--no-progress"])
    assert args.no_progress
    assert cli.main(["--out", str(tmp_path), "trajectory", "--steps", "4", "--impls", "torch_impl(fused)"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out  # stderr is not a terminal under pytest


def test_report_files_strict_json_umask_and_all_or_nothing(tmp_path):
    old = os.umask(0o027)
    try:
        report.write_files({tmp_path / "a.json": lambda tmp: Path(tmp).write_text(report.strict_json(
            {"x": float("nan"), "y": [np.float32(np.inf), -np.inf], "z": np.float64(1.5)}))})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    finally:
        os.umask(old)
    assert _strict_loads((tmp_path / "a.json").read_text()) == {"x": "NaN", "y": ["Infinity", "-Infinity"], "z": 1.5}

    def fail(tmp):
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        report.write_files({tmp_path / "one.md": lambda tmp: Path(tmp).write_text("x"), tmp_path / "two.png": fail})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # neither file, no temporary left


def test_sigint_stops_the_run_with_130_and_one_line(tmp_path):
    # A long run interrupted after it started stepping: exit 130, one line on stderr, no report.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "crosscheck", "--out", str(tmp_path / "r"), "trajectory",
                             "--steps", "1000000", "--impls", "jax_impl"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted (no report written)"
    assert not (tmp_path / "r").exists()


def test_nan_in_both_runs_is_reported_and_fails():
    # Was: NaN in every run counted as bitwise equal, and the check passed.
    from crosscheck.trajectory import harness as trajectory
    from crosscheck.trajectory import implementations, sources
    names, params = sources.param_set("flat", 0)
    gaussian = sources.synthetic("gaussian", 0)

    def grads(t, current):
        g = gaussian(t, current)
        if t == 2:
            g[0] = np.full_like(g[0], np.nan)
        return g
    result = trajectory.run(["torch_impl(fused)"], hyper=implementations.Hyper(), names=names, params=params,
                            grad_source=grads, steps=4)
    row = result.summary["torch_impl(fused) vs torch.AdamW(fused)"]
    assert row["bitwise"] and not row["pass"]  # the NaNs are equal bits; that proves nothing
    assert row["why"].startswith(f"NaN/inf from step 3 (param of {names[0]}")
    assert row["first_nonfinite"]["step"] == 3
    assert "NaN/inf from step 3" in trajectory_report.markdown([result])
    assert _strict_loads(report.strict_json(trajectory_report.to_json([result])))["passed"] is False


def test_cifar_checks_fail_on_nan_losses():
    # The checks alone (the real run below is slow): equal NaN losses and "bitwise" params must fail.
    from crosscheck.cifar.parity import Config, Result, _checks

    result = Result({}, "subset", ["torch", "flax"], 0.0, step_loss={"torch": [2.3, float("nan")],
                                                                    "flax": [2.3, float("nan")]},
                    shared_max_ulps=[0, 0])
    checks = _checks(Config(mode="shared-grads"), result, "torch", ["flax"], [], 1017)
    failed = [c for c in checks if not c["pass"]]
    assert [c["check"] for c in failed] == ["torch: finite losses", "flax: finite losses"]
    assert failed[0]["first_failing_step"] == 2


@pytest.mark.slow
def test_cifar_shared_grads_with_nan_losses_fails(cifar_dir):
    from crosscheck.cifar import data as cifar10
    from crosscheck.cifar.parity import Config, run

    data = cifar10.load(cifar_dir)
    result = run(Config(mode="shared-grads", lr=1e6, max_steps=12, replicas=0), data, progress=False)
    losses = np.asarray(result.step_loss[result.runs[0]])
    assert not np.isfinite(losses).all()  # lr=1e6 diverges within a few steps
    assert not result.passed
    failed = [c for c in result.checks if not c["pass"]]
    assert any(c["check"].endswith("finite losses") for c in failed)


def test_report_matrix_and_figure_say_bitwise(tmp_path):
    from crosscheck.trajectory import harness as trajectory
    from crosscheck.trajectory import implementations, sources
    names, params = sources.param_set("flat", 0)
    result = trajectory.run(["torch_impl(fused)", "torch.AdamW(foreach)", "torch_impl(foreach)"],
                            hyper=implementations.Hyper(), names=names, params=params,
                            grad_source=sources.synthetic("gaussian", 0), steps=5, case="small")
    text = trajectory_report.markdown([result])
    # The matrix first: one row per case, one column per implementation.
    matrix = text.split("## Details")[0]
    assert "| case | torch_impl(fused) | torch.AdamW(foreach) | torch_impl(foreach) | " \
           "torch_impl(foreach) vs torch.AdamW(foreach) |" in matrix
    row = next(line for line in matrix.splitlines() if line.startswith("| small |"))
    assert row.split(" | ")[1] == "**bitwise**" and "ulps" in row.split(" | ")[2]
    fig = trajectory_report.figure([result])
    ax = fig.axes[0]
    assert "bitwise at every step: torch_impl(fused)" in ax.get_title()
    assert ax.get_legend() is None and fig.legends  # the legend is the figure's, below the panels
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    # Identical errors: one legend entry and one colour per pair (as in every other panel), named in the title.
    assert "torch.AdamW(foreach)" in labels and "torch_impl(foreach)" in labels
    assert "identical errors: torch.AdamW(foreach) = torch_impl(foreach)" in ax.get_title()
    colors = {str(line.get_color()) for line in ax.get_lines() if line.get_linestyle() == "-"}
    assert len(colors) == 2
    legend_top = fig.legends[0].get_window_extent(fig.canvas.get_renderer()).y1
    assert legend_top <= ax.get_window_extent().y0  # below the panel, not on the curves


def _exit_status(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse's usage errors
        return stop.code


@pytest.mark.parametrize("argv, message", [
    (["trajectory", "--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
    (["cifar10", "--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
    (["port", "--example", "resnet_block", "--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
    (["port", "--example", "resnet_block", "--steps", "-1"],
     "argument --steps: expected a non-negative integer, got -1"),
    (["port", "--example", "resnet_block", "--resume", "-1"],
     "argument --resume: expected a non-negative integer, got -1"),
    (["port", "--example", "nosuch"], "--example='nosuch': choose from ["),
])
def test_bad_values_name_their_option_on_stderr(tmp_path, capsys, argv, message):
    # Was: --seed -1 said "expected non-negative integer" (numpy's words, no option; a traceback for cifar10
    # and port); port's own errors went to stdout.
    assert _exit_status(["--out", str(tmp_path / "r"), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert not (tmp_path / "r").exists()


def _cifar_result(mode: str):
    from crosscheck.cifar.parity import Result

    steps = list(range(1, 31))
    loss = list(np.linspace(2.3, 1.9, 30))
    record = {"train_loss": 2.0, "test_loss": 1.9, "accuracy": 0.3, "seconds": 1.0}
    if mode == "shared-grads":
        runs = ["torch_impl.AdamW", "jax_impl.adamw"]
        step_loss = {"torch_impl.AdamW": loss, "jax_impl.adamw": loss,
                     "jax_impl.adamw (Flax forward)": [x + 1e-6 for x in loss]}
        divergence = {"jax_impl.adamw": {"conv1.weight": [0.0] * 30, "fc.bias": [0.0] * 30}}
    else:
        runs = ["torch_impl.AdamW", "jax_impl.adamw", "torch replica 1", "torch replica 2"]
        step_loss = {name: [x + 1e-3 * i for x in loss] for i, name in enumerate(runs)}
        divergence = {name: {"conv1.weight": list(np.geomspace(1e-7, 1e-2, 30) * (i + 1))}
                      for i, name in enumerate(runs[1:])}
    epochs = [{"epoch": e, "steps": 15 * e, **{name: record for name in runs}} for e in (1, 2)]
    return Result({"mode": mode}, "test", runs, 0.0, step_loss=step_loss, epochs=epochs, divergence_steps=steps,
                  divergence=divergence)


def _line_colors(ax) -> dict[str, str]:
    from matplotlib.colors import to_hex

    return {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_cifar_figure_one_colour_per_implementation_and_bitwise_in_words():
    # Was: in independent mode jax_impl.adamw orange in two panels and blue (torch_impl's colour) in the
    # third; in shared-grads mode an empty log axis, without a word that the runs are bitwise.
    from crosscheck.cifar import report as cifar_report

    fig = cifar_report.figure(_cifar_result("independent"))
    panels = [_line_colors(ax) for ax in fig.axes]
    jax_colors = {colors["jax_impl.adamw"] for colors in panels}
    assert len(jax_colors) == 1 and "jax_impl.adamw" in panels[2]
    assert {colors["torch_impl.AdamW"] for colors in panels[:2]} != jax_colors
    assert not [t for t in fig.axes[2].texts if "bitwise" in t.get_text()]

    fig = cifar_report.figure(_cifar_result("shared-grads"))
    loss, acc, div = (_line_colors(ax) for ax in fig.axes)
    assert loss["jax_impl.adamw"] == loss["jax_impl.adamw (Flax forward)"] == acc["jax_impl.adamw"]
    assert loss["torch_impl.AdamW"] == acc["torch_impl.AdamW"] != acc["jax_impl.adamw"]
    widths = {line.get_label(): line.get_linewidth() for line in fig.axes[0].get_lines()}
    assert widths["torch_impl.AdamW"] > widths["jax_impl.adamw"]  # the same loss: both colours show
    texts = [t.get_text() for t in fig.axes[2].texts]
    assert texts == ["bitwise at every step:\njax_impl.adamw = torch_impl.AdamW"]
    assert not div and fig.axes[2].get_yscale() == "linear"  # no empty log axis


def test_schedules_and_gpu_figures_one_colour_per_implementation():
    # Was: schedules' lower panels drew |optax - torch| in torch's colour and |jax_impl - torch| in optax's;
    # the gpu summary gave each implementation two colours (one per layout).
    from crosscheck.gpu import report as gpu_report
    from crosscheck.recipes import schedules

    fig = schedules.figure([schedules.compare(schedules.CASES[0], 200)])
    top, bottom = _line_colors(fig.axes[0]), _line_colors(fig.axes[4])  # a case's values, and its differences
    assert bottom["|jax_impl - torch|"] == top["jax_impl.schedules"]
    assert bottom["|optax - torch|"] == next(c for label, c in top.items() if label.startswith("optax."))
    assert len(set(top.values())) == 3

    rows = [{"implementation": impl, "layout": layout, "params": n, "ms": 1.0 + n / 1e6}
            for impl in ("jax_impl", "torch fused") for layout in ("one", "many") for n in (1e6, 1e7)]
    fig = gpu_report.summary_figure({"dry_run": True, "parts": {"step_time": {"rows": rows}}})
    colors = _line_colors(fig.axes[0])
    assert colors["jax_impl (one)"] == colors["jax_impl (many)"] != colors["torch fused (one)"]
    assert colors["torch fused (one)"] == colors["torch fused (many)"]
