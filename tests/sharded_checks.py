"""Sharded jax_impl.adamw on 8 host CPU devices; run by tests/jax_impl_tests/test_sharding.py in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX starts,
so these checks live in their own process (``python tests/sharded_checks.py``).
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_impl

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")

SHAPES = {"embed": (64, 32), "w1": (32, 128), "b1": (128,), "w2": (128, 32), "b2": (32,), "scale": (32,),
          "odd": (7,), "scalar": (), "tail_sharded": (4, 3)}


def layouts(devices):
    """name -> (mesh, {leaf: PartitionSpec})."""
    flat = Mesh(np.asarray(devices), ("data",))
    grid = Mesh(np.asarray(devices).reshape(2, 4), ("fsdp", "tp"))
    replicated = {name: P() for name in SHAPES}
    fsdp = {name: (P("data") if len(shape) and shape[0] % 8 == 0 else P()) for name, shape in SHAPES.items()}
    two_d = {name: P() for name in SHAPES}
    two_d.update(embed=P("fsdp", "tp"), w1=P("fsdp", "tp"), w2=P("tp", "fsdp"), b1=P("tp"), tail_sharded=P("tp"))
    return {"data parallel (replicated)": (flat, replicated), "FSDP (1-D mesh)": (flat, fsdp),
            "2-D mesh (fsdp x tp)": (grid, two_d)}


def run_and_compare(label, step, put, grads_host, params, state, shardings, expected) -> list[str]:
    """Steps ``params, state`` on the sharded gradients; what differs from the single-device ``expected``
    (params and state, bit for bit) or left its sharding."""
    failures = []
    for grads in grads_host:
        params, state = step(put(grads), params, state)
    for leaf, x in params.items():
        if not x.sharding.is_equivalent_to(shardings[leaf], x.ndim):
            failures.append(f"{label}: params[{leaf}] came back as {x.sharding}")
    got = jax.tree.map(np.asarray, (params, state))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
        if a.tobytes() != b.tobytes():
            failures.append(f"{label}: {jax.tree_util.keystr(path)} differs from the single-device step")
    return failures


def main() -> int:
    devices = jax.devices()
    assert len(devices) == 8, f"need 8 devices, have {len(devices)} (set XLA_FLAGS)"
    rng = np.random.default_rng(0)
    host = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    grads_host = [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
                  for _ in range(5)]
    failures = []
    for amsgrad in (False, True):
        tx = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=amsgrad)
        step = jax.jit(lambda g, p, s: jax_impl.apply_exact(tx, g, s, p), donate_argnums=(1, 2))

        # Single device: the reference.
        params, state = jax.tree.map(jnp.asarray, host), tx.init(jax.tree.map(jnp.asarray, host))
        for grads in grads_host:
            params, state = step(jax.tree.map(jnp.asarray, grads), params, state)
        expected = jax.tree.map(np.asarray, (params, state))

        for name, (mesh, specs) in layouts(devices).items():
            label = f"{name}, amsgrad={amsgrad}"
            shardings = {leaf: NamedSharding(mesh, spec) for leaf, spec in specs.items()}
            put = lambda tree: {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}  # noqa: E731
            params = put(host)
            state = jax.jit(tx.init)(params)
            for moment in ("mu", "nu", "nu_max"):
                tree = getattr(state[0], moment, None)
                for leaf, x in (tree or {}).items():
                    if not x.sharding.is_equivalent_to(shardings[leaf], x.ndim):
                        failures.append(f"{label}: jit(init) {moment}[{leaf}] has {x.sharding}, "
                                        f"param has {shardings[leaf]}")
            compiled = step.lower(put(grads_host[0]), params, state).compile()
            text = compiled.as_text()
            found = [c for c in COLLECTIVES if c in text]
            if found:
                failures.append(f"{label}: the compiled step communicates: {found}")
            copies = len(re.findall(r"= \S+ copy\(", text))
            if copies:
                failures.append(f"{label}: the compiled step has {copies} copies")
            aliased = text.count("may-alias") + text.count("must-alias")
            donated = len(jax.tree.leaves((state, params)))
            if aliased < donated - 1:  # the int32 count may be recomputed instead of aliased
                failures.append(f"{label}: only {aliased} of {donated} donated buffers are reused")
            failures += run_and_compare(label, step, put, grads_host, params, state, shardings, expected)
            print(f"{label}: {aliased}/{donated} buffers aliased, collectives: {found or 'none'}")

    mesh, specs = layouts(devices)["FSDP (1-D mesh)"]
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
    optax_state = jax.jit(optax.adamw(1e-3).init)(sharded)
    placements = {str(x.sharding.device_set if hasattr(x.sharding, "device_set") else x.sharding)
                  for x in jax.tree.leaves(optax_state)}
    print(f"for comparison, jax.jit(optax.adamw(1e-3).init) puts its moments on: {len(placements)} device set(s): "
          f"{sorted(placements)[:1]}")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
