"""python -m crosscheck port: reports, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crosscheck import cli


@pytest.mark.slow
def test_port_example_passes_and_writes_the_report(tmp_path):
    rc = cli.main(["--out", str(tmp_path), "port", "--example", "frozen_buffers", "--steps", "2", "--resume", "2"])
    assert rc == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["ok"] and data["checks"]["parity"] == "pass" and data["checks"]["resume_max_ulps"] == 0
    assert (tmp_path / "errors.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Checks" in (tmp_path / "report.md").read_text()


def test_port_factories_with_a_planted_pitfall_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # --torch module:factory imports test_locate by name
    rc = cli.main(["--out", str(tmp_path), "port", "--torch", "test_locate:TorchMLP",
                   "--flax", "test_locate:gelu_port", "--input-shape", "16,8", "--classes", "4", "--steps", "0"])
    assert rc == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert (data["first"], data["cause"]) == ("mid", "gelu")
    assert "first divergence at 'mid'" in capsys.readouterr().out


def test_port_bad_usage_exits_2(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path), "port", "--example", "nope"]) == 2
    assert "--example='nope': choose from" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path), "port", "--torch", "test_locate:TorchMLP"]) == 2
    assert cli.main(["--out", str(tmp_path), "port", "--torch", "nomodule:X", "--flax", "a:b",
                     "--input-shape", "2,3"]) == 2
    assert not (tmp_path / "report.json").exists()  # nothing half-written
