"""``python -m crosscheck gpu``: no GPU -> exit 2 in one line; --dry-run runs every part on the CPU and writes
a valid report; a failing or overrunning part is recorded and the others go on.

What the GPU run itself measures cannot be tested here (see README, "GPU").
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from crosscheck import cli
from crosscheck.gpu import command as gpu


def _strict_json(path):
    def reject(token):
        raise ValueError(f"non-strict JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_no_gpu_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["gpu", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: no GPU:"), err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert cli.main(["gpu", "--dry-run", "--parts", "parity,nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["gpu", "--dry-run", "--budget", "-1", "--out", str(tmp_path)]) == 2
    assert "--budget" in capsys.readouterr().err


def test_dry_run_parity_and_cifar(tmp_path, cifar_dir):
    """The parity part (suite cases, contraction candidates, NumPy emulation, pow check) and CIFAR-10, on the CPU."""
    rc = cli.main(["--no-progress", "gpu", "--dry-run", "--parts", "parity,cifar10", "--data-dir", str(cifar_dir),
                   "--out", str(tmp_path)])
    report = _strict_json(tmp_path / "report.json")
    assert report["dry_run"] and set(report["parts"]) == {"parity", "cifar10"}
    parity = report["parts"]["parity"]
    # On the CPU, jax_impl (the CPU model) must equal torch's fused CPU kernel bit for bit.
    assert parity["status"] == "pass", parity
    assert [c["bitwise"] for c in parity["cases"]] == [True]
    emulation = parity["contraction"]["by_dtype"]["float32"]["reference(torch-cuda emulation)"]
    model = parity["contraction"]["by_dtype"]["float32"][parity["contraction"]["default_candidate"]]
    assert emulation == model  # the NumPy emulation and the JAX CUDA model agree, also re-synced
    # Double pow: torch CPU and Python call the same libm pow.  (torch CPU powf may differ from the host table.)
    assert all(v["bc1_steps_differing"] == 0 for k, v in parity["bias_corrections"].items() if k.startswith("double"))
    cifar = report["parts"]["cifar10"]
    assert cifar["status"] == "pass" and cifar["steps"] == 5 and cifar["max_ulps"] == 0
    assert (tmp_path / "parity" / "report.json").is_file()
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "## (a) Parity" in (tmp_path / "report.md").read_text()
    assert rc == 0


def test_dry_run_benchmarks_and_a_failing_part(tmp_path, monkeypatch):
    """step_time rows with the copy bandwidth; a part that raises is recorded (with what it had), the others run."""
    def broken(settings, out, clock, partial):
        partial["rows"] = ["kept"]
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu, "part_train_step", broken)
    rc = cli.main(["--no-progress", "gpu", "--dry-run", "--parts", "train_step,step_time", "--budget", "300",
                   "--out", str(tmp_path)])
    assert rc == 1
    parts = _strict_json(tmp_path / "report.json")["parts"]
    assert parts["train_step"]["status"] == "error" and "boom" in parts["train_step"]["error"]
    assert parts["train_step"]["rows"] == ["kept"]
    step_time = parts["step_time"]
    assert step_time["status"] == "pass"
    names = {r["implementation"] for r in step_time["rows"]}
    assert {"jax_impl.adamw", "torch.optim.AdamW(fused)", "optax.adamw", "(device-to-device copy)"} <= names
    assert {r["layout"] for r in step_time["rows"]} == {"one", "many"}
    assert all(r["fraction_of_copy_bandwidth"] > 0 for r in step_time["rows"])
    assert (tmp_path / "step_time.png").read_bytes()[:4] == b"\x89PNG"


def test_a_part_past_its_budget_is_stopped(tmp_path, monkeypatch):
    def stuck(settings, out, clock, partial):
        partial["steps"] = 3
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(gpu, "part_cifar10", stuck)
    monkeypatch.setattr(gpu, "ALARM_GRACE_S", 0.0)
    started = time.monotonic()
    assert cli.main(["--no-progress", "gpu", "--dry-run", "--parts", "cifar10", "--budget", "0.4",
                     "--out", str(tmp_path)]) == 1
    assert time.monotonic() - started < 30
    part = _strict_json(tmp_path / "report.json")["parts"]["cifar10"]
    assert part["status"] == "timeout" and part["steps"] == 3


@pytest.mark.slow
def test_full_dry_run(tmp_path, cifar_dir):
    rc = cli.main(["--no-progress", "gpu", "--dry-run", "--data-dir", str(cifar_dir), "--out", str(tmp_path)])
    report = _strict_json(tmp_path / "report.json")
    assert set(report["parts"]) == set(gpu.PARTS)
    train = report["parts"]["train_step"]
    assert {r["model"] for r in train["rows"]} == {"SimpleCNN", "transformer"}
    assert rc == 0, report
