"""One of two ``jax.distributed`` processes saving and restoring sharded checkpoints; run by test_checkpoint_manager.py.

``python tests/checkpoint_worker.py PROCESS_ID PORT DIRECTORY``: joins the
coordinator on 127.0.0.1:PORT (process 0 runs it), builds params and a
``jax_impl.AdamWState`` sharded over the 4 CPU devices of both processes (2
each), then ``save_jax`` / ``restore_jax`` and a ``CheckpointManager`` run
(keep 2 of 3 steps, then delete one) in DIRECTORY, which both processes share.  Every
process checks the shards it holds bit for bit and prints ``ok``; any
failure exits non-zero with the error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

PROCESSES = 2


def arrays(mesh, seed: int):
    """(params, AdamWState) from numpy values: 'w' split over the devices by rows, 'b' and the count replicated."""
    import jax_impl

    rng = np.random.default_rng(seed)
    rows, replicated = NamedSharding(mesh, PartitionSpec("x")), NamedSharding(mesh, PartitionSpec())
    values = {"w": rng.standard_normal((8, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}

    def place(x, sharding):
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def tree(scale):
        return {"w": place(values["w"] * scale, rows), "b": place(values["b"] * scale, replicated)}

    count = place(np.asarray(seed, np.int32), replicated)
    return tree(np.float32(1)), jax_impl.AdamWState(count, tree(np.float32(0.5)), tree(np.float32(0.25)), None)


def check_equal(got, want, what: str) -> None:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert a.sharding == b.sharding, f"{what}{jax.tree_util.keystr(path)}: sharding {a.sharding}"
        for x, y in zip(a.addressable_shards, b.addressable_shards, strict=True):
            assert np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes(), f"{what}{jax.tree_util.keystr(path)}"


def main() -> None:
    process_id, port, directory = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=process_id,
                               initialization_timeout=60)
    from crosscheck.convert import checkpoint

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    params, state = arrays(mesh, seed=7)
    checkpoint.save_jax(directory / "ckpt", params, state)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (params, state))
    check_equal(checkpoint.restore_jax(directory / "ckpt", *like), (params, state), "restore_jax")

    manager = checkpoint.CheckpointManager(directory / "run", max_to_keep=2)
    for step in (1, 2, 3):
        manager.save(step, *arrays(mesh, seed=step))
    assert manager.all_steps() == [2, 3], manager.all_steps()
    assert manager.latest_step() == 3
    check_equal(manager.restore(None, *like), arrays(mesh, seed=3), "manager.restore")
    manager.delete(2)
    assert manager.all_steps() == [3], manager.all_steps()
    print(f"process {process_id}: ok", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
