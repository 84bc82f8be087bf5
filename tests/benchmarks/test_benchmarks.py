"""Smoke runs of both benchmarks (tiny sizes; no timing assertions: timings belong to the benchmarks)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow   # ~30 s: every implementation, compiled in a fresh process
def test_step_time_smoke(tmp_path):
    done = _run("step_time.py", "--sizes", "2000", "--repeats", "3", "--no-progress", "--out", str(tmp_path),
                "--impls", "jax_impl.adamw,jax_impl.adamw[xla],optax.adamw,torch.optim.AdamW(fused),"
                           "torch_impl.AdamW(foreach)")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())
    assert {r["layout"] for r in rows} == {"one", "many"}
    assert {r["leaves"] for r in rows} == {1, 300}
    assert all(r["ms"] > 0 and r["state_bytes_per_param"] >= 0 for r in rows)
    assert (tmp_path / "step_time.png").stat().st_size > 0
    assert _run("step_time.py", "--impls", "sgd").returncode == 2
    assert _run("step_time.py", "--layouts", "one,tree").returncode == 2


@pytest.mark.slow
def test_step_time_flax_rows_smoke(tmp_path):
    """The Flax containers' rows (nnx.Optimizer, ExactOptimizer, TrainState) on the 16-layer layout, one size."""
    flax_rows = ["nnx.Optimizer(jax_impl.adamw) [nnx.jit]", "nnx.Optimizer(jax_impl.adamw) [split]",
                 "ExactOptimizer [split]", "ExactOptimizer [cached_partial]", "ExactOptimizer [leaves]",
                 "nnx.Optimizer(jax_impl.adamw) [leaves]",
                 "TrainState.apply_gradients(jax_impl.adamw)", "jax_impl.apply_gradients_exact(TrainState)"]
    done = _run("step_time.py", "--sizes", "4000", "--repeats", "3", "--no-progress", "--out", str(tmp_path),
                "--layouts", "layers16", "--pairs", "--impls", ",".join(flax_rows + ["torch.optim.AdamW(fused)"]))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())
    # --pairs: each row timed with torch fused alone; torch's own row once, from the first pair.
    assert [r["implementation"] for r in rows] == [flax_rows[0], "torch.optim.AdamW(fused)"] + flax_rows[1:]
    assert {r["leaves"] for r in rows} == {32}
    # Every row's moments: 8 B/param, the container's own bookkeeping not counted.
    assert all(r["state_bytes_per_param"] == 8 and r["vs_torch_fused"] > 0 for r in rows), rows
    assert (tmp_path / "step_time.png").stat().st_size > 0


def test_plot_styles_tell_every_series_apart():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import IMPLS, series_styles

    styles = series_styles(list(IMPLS))
    looks = [(s["color"], s["marker"], s["linestyle"]) for s in styles.values()]
    assert len(set(looks)) == len(looks)
    assert len({s["color"] for s in styles.values()}) == min(20, len(looks))


def test_train_step_smoke(tmp_path):
    done = _run("train_step.py", "--batch-sizes", "4", "--repeats", "3", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())
    assert [r["framework"] for r in rows] == ["torch", "flax"]
    assert all(0 < r["optimizer_share"] for r in rows)
