"""The trajectory harness and its CLI: exit codes, reports, drift classification, metrics."""

import json

import numpy as np
import pytest

from crosscheck import cli
from crosscheck.common import metrics
from crosscheck.trajectory import harness as trajectory


@pytest.mark.parametrize("series, expected", [
    (np.zeros(200), "none"),
    (np.full(200, 3e-8), "bounded"),
    (1e-8 * np.sqrt(np.arange(1, 201)), "random walk (~sqrt t)"),
    (1e-8 * np.arange(1, 201), "linear (~t)"),
])
def test_classify_drift(series, expected):
    assert trajectory.classify_drift(series) == expected


def test_distance_counts_ulps_and_bits():
    a = np.array([1.0, 0.0, -0.0, np.nan, 2.0], np.float32)
    b = np.array([np.nextafter(np.float32(1), np.float32(2)), -0.0, -0.0, np.nan, 2.0], np.float32)
    d = metrics.distance(a, b)
    assert d.max_ulps == 1.0  # +0 and -0 are 0 ulps apart, but not bitwise equal
    assert d.bitwise_equal == pytest.approx(3 / 5)
    assert d.first_mismatch == 0
    assert metrics.distance(np.array([np.nan], np.float32), np.array([1.0], np.float32)).max_ulps == np.inf


def test_trajectory_command_writes_report(tmp_path, capsys):
    rc = cli.main(["--no-progress", "trajectory", "--steps", "30", "--params", "cnn", "--amsgrad", "--mask",
                   "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is True
    summary = report["cases"][0]["summary"]
    assert summary["jax_impl vs torch.AdamW(fused)"]["bitwise"] is True
    assert summary["torch_impl(foreach) vs torch.AdamW(foreach)"]["bitwise"] is True
    assert (tmp_path / "trajectories.png").stat().st_size > 10_000
    assert "| jax_impl | torch.AdamW(fused) | **yes**" in (tmp_path / "report.md").read_text()


def test_resync_mode_and_real_gradients(tmp_path):
    rc = cli.main(["--no-progress", "trajectory", "--steps", "10", "--params", "model", "--grads", "model",
                   "--mode", "resync", "--impls", "jax_impl,torch.AdamW(foreach)", "--out", str(tmp_path)])
    assert rc == 0


def test_mismatch_exits_1_naming_step_leaf_element(tmp_path, capsys, monkeypatch):
    # Demand bitwise parity of a pair that is not bitwise (torch's foreach uses MKL's sqrt).
    monkeypatch.setattr(trajectory, "BITWISE_PAIRS",
                        trajectory.BITWISE_PAIRS | {("torch.AdamW(foreach)", "torch.AdamW(fused)")})
    rc = cli.main(["--no-progress", "trajectory", "--steps", "20", "--impls", "torch.AdamW(foreach)",
                   "--out", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "MISMATCH" in err and "'step': " in err and "'leaf': 'w'" in err and "'element': " in err


@pytest.mark.parametrize("argv", [
    ["trajectory", "--impls", "nonsense"],
    ["trajectory", "--steps", "0"],
    ["trajectory", "--dtype", "int8"],
])
def test_bad_usage_exits_2(argv, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--out", str(tmp_path)])
    assert info.value.code == 2


def test_invalid_hyperparameter_exits_2(tmp_path, capsys):
    assert cli.main(["trajectory", "--lr", "-1", "--out", str(tmp_path)]) == 2
    assert "Invalid learning rate: -1.0" in capsys.readouterr().err


@pytest.mark.parametrize("case", [c for c in __import__("crosscheck.trajectory.suite", fromlist=["SUITE"]).SUITE
                                  if c.mode == "free"], ids=lambda c: c.name)
def test_every_builtin_case_passes_a_short_run(case):
    """Each case of `python -m crosscheck` with every default implementation, 12 steps: the runners'
    state trees (optax's chain under maximize), and each loop model held to the torch path it copies."""
    from dataclasses import replace

    from crosscheck.trajectory import suite

    result = suite.run_case(replace(case, steps=12), progress=False)
    failing = {pair: row["why"] for pair, row in trajectory.summarize(result).items() if not row["pass"]}
    assert not failing, failing
