"""CheckpointManager (latest valid step, keep-N, leftovers), save_jax(force=True), and two-process saves."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_impl
from crosscheck.convert import checkpoint
from crosscheck.convert.checkpoint import CheckpointError, CheckpointManager


def _state(seed: int):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    state = jax_impl.adamw().init(params)
    return params, jax_impl.from_torch_view(state, jax_impl.torch_view(state)._replace(
        count=jnp.asarray(seed, jnp.int32)))


def _count(restored) -> int:
    return int(restored[1][0].count)


def test_latest_valid_step_and_keep_n(tmp_path):
    manager = CheckpointManager(tmp_path / "run", max_to_keep=2)
    assert manager.all_steps() == [] and manager.latest_step() is None
    with pytest.raises(CheckpointError, match=r"run: no valid checkpoint \(steps found: \[\]\)"):
        manager.restore(None, *_state(0))
    for step in (1, 2, 3, 4):
        assert manager.save(step, *_state(step)) == tmp_path / "run" / str(step)
    assert manager.all_steps() == [3, 4] and manager.latest_step() == 4
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["3", "4"]  # nothing hidden left
    assert _count(manager.restore(None, *_state(0))) == 4
    assert _count(manager.restore(3, *_state(0))) == 3
    with pytest.raises(CheckpointError, match=r"run: no step 1 \(steps found: \[3, 4\]\)"):
        manager.restore(1, *_state(0))
    # The newest one damaged (a flipped byte), or unfinished (no manifest): skipped, with a warning naming it.
    biggest = max((p for p in (tmp_path / "run" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    raw[len(raw) // 2] ^= 1
    biggest.write_bytes(bytes(raw))
    (tmp_path / "run" / "5").mkdir()
    with pytest.warns(UserWarning) as caught:
        assert manager.latest_step() == 3
    assert [str(w.message).split(":")[0] for w in caught] == ["skipping step 5", "skipping step 4"]
    assert "no crosscheck-manifest.json" in str(caught[0].message)
    assert "checksum mismatch" in str(caught[1].message)
    with pytest.warns(UserWarning, match="skipping step [45]") as caught:
        assert _count(manager.restore(None, *_state(0))) == 3
    assert len(caught) == 2
    with pytest.raises(CheckpointError, match=r"checksum mismatch"):
        manager.restore(4, *_state(0))  # asked for by number: refused, not replaced by another
    manager.delete(4)
    assert manager.all_steps() == [3, 5] and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["3", "5"]


def test_save_refuses_an_existing_step_unless_forced(tmp_path):
    # Was: save_jax refused an existing path, with no way to replace it.
    manager = CheckpointManager(tmp_path)
    manager.save(7, *_state(1))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: step 7 already exists \(pass force=True"):
        manager.save(7, *_state(2))
    assert _count(manager.restore(7, *_state(0))) == 1
    manager.save(7, *_state(2), force=True)
    assert _count(manager.restore(7, *_state(0))) == 2 and manager.all_steps() == [7]
    checkpoint.save_jax(tmp_path / "single", *_state(3))
    with pytest.raises(CheckpointError, match=r"single exists; choose a new checkpoint path \(or pass force=True"):
        checkpoint.save_jax(tmp_path / "single", *_state(4))
    checkpoint.save_jax(tmp_path / "single", *_state(4), force=True)
    assert _count(checkpoint.restore_jax(tmp_path / "single", *_state(0))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7", "single"]


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    # Was: a killed save's .partial was removed only by a later save to the same name.
    manager = CheckpointManager(tmp_path, max_to_keep=3)
    manager.save(1, *_state(1))
    # What a save killed at each stage leaves: orbax's temporary folder, our partial (complete, even with its
    # manifest: killed before the rename), a replaced step not yet removed, a deletion not finished.
    shutil.copytree(tmp_path / "1", tmp_path / ".2.partial")
    (tmp_path / ".3.partial.orbax-checkpoint-tmp-1733300000").mkdir()
    shutil.copytree(tmp_path / "1", tmp_path / ".1.replaced.partial")
    shutil.copytree(tmp_path / "1", tmp_path / ".0.deleted.partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.all_steps() == [1] and manager.latest_step() == 1  # leftovers are never steps
    with pytest.warns(UserWarning, match=r"removing .*: a partial checkpoint left by an interrupted save") as caught:
        manager.save(4, *_state(4))
    assert len(caught) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "4"]


def test_bad_arguments_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file is not a directory"):
        CheckpointManager(tmp_path / "file")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"max_to_keep must be None \(keep all\) or an integer >= 1, "
                                             rf"got {bad!r}"):
            CheckpointManager(tmp_path, max_to_keep=bad)
    manager = CheckpointManager(tmp_path / "run")
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=rf"step must be an integer >= 0, got {bad!r}"):
            manager.save(bad, *_state(0))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CheckpointError, match=r"file exists and is not a checkpoint directory"):
        checkpoint.save_jax(tmp_path / "file", *_state(0), force=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_save_and_restore_sharded_checkpoints(tmp_path):
    # Was: both processes wrote the manifest and renamed the partial folder: one failed (FileNotFoundError on
    # the manifest), the other hung in the next barrier until killed.
    worker = Path(__file__).parents[2] / "checkpoint_worker.py"
    port = _free_port()
    processes = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(tmp_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  cwd=worker.parents[1]) for i in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=240)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for i, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0 and f"process {i}: ok" in output, output[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["3"]
    # Both processes' shards are in the one manifest, and a single process reads the checkpoint back.
    params, state = checkpoint.restore_jax(tmp_path / "ckpt", *jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _worker_shapes()))
    rng = np.random.default_rng(7)
    assert np.array_equal(np.asarray(params["w"]), rng.standard_normal((8, 3)).astype(np.float32))
    assert int(state.count) == 7


def _worker_shapes():
    params = {"w": np.zeros((8, 3), np.float32), "b": np.zeros(3, np.float32)}
    return params, jax_impl.AdamWState(np.zeros((), np.int32), params, params, None)
