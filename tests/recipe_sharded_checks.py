"""Accumulation on 8 host CPU devices; run by tests/crosscheck_tests/recipes/test_recipes.py in a subprocess (XLA_FLAGS set before JAX starts).

torch_accumulation + apply_exact must give the single-device params bit for bit
on every layout.  With --measure-multisteps, optax.MultiSteps (Welford mean) is
measured against its own single-device run and printed (README).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

import jax_impl
from jax_impl.accumulation import torch_accumulation
from sharded_checks import SHAPES, layouts  # this script runs from tests/

K, WINDOWS = 4, 3


def run(tx, grads_host, put):
    params = put({k: jnp.asarray(np.random.default_rng(0).standard_normal(s).astype(np.float32) * 0.02)
                  for k, s in SHAPES.items()})
    state = jax.jit(tx.init)(params)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for grads in grads_host:
        params, state = step(put(grads), state, params)
    return {k: np.asarray(v) for k, v in params.items()}


def main() -> int:
    devices = jax.devices()
    assert len(devices) == 8, f"need 8 devices, have {len(devices)} (set XLA_FLAGS)"
    rng = np.random.default_rng(1)
    grads_host = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
                  for _ in range(K * WINDOWS)]
    scaled = [{k: v / np.float32(K) for k, v in g.items()} for g in grads_host]  # grads of loss / K (exact: K = 4)
    one_device = lambda tree: {k: jnp.asarray(v) for k, v in tree.items()}  # noqa: E731
    adamw = jax_impl.adamw(1e-2, weight_decay=0.1)
    recipes = {"torch_accumulation": (torch_accumulation(adamw, K), scaled)}
    if "--measure-multisteps" in sys.argv:  # the README's measurement, not part of the test
        recipes["optax.MultiSteps"] = (optax.MultiSteps(adamw, K), grads_host)
    failures = []
    for recipe, (tx, stream) in recipes.items():
        expected = run(tx, stream, one_device)
        for name, (mesh, specs) in layouts(devices).items():
            shardings = {leaf: NamedSharding(mesh, spec) for leaf, spec in specs.items()}
            put = lambda tree: {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}  # noqa: E731
            got = run(tx, stream, put)
            differ = sum(int((got[k].view(np.uint32) != expected[k].view(np.uint32)).sum()) for k in got)
            total = sum(v.size for v in got.values())
            print(f"{recipe:20s} {name:28s} elements differing from one device: {differ}/{total}")
            if recipe == "torch_accumulation" and differ:
                failures.append(f"{recipe} on {name}")
    if failures:
        print("FAIL:", failures)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
