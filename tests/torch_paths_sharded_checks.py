"""jax_impl.adamw(torch_path="for-loop" | "foreach") sharded on 8 host CPU devices; run by
tests/jax_impl_tests/test_torch_paths.py in a subprocess (XLA_FLAGS must be set before JAX starts).

Per layout of sharded_checks.py: no collectives in the compiled step, the shardings kept, and the
params and moments equal to the single-device step bit for bit, which for bfloat16 equals torch's.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import NamedSharding

import jax_impl
from sharded_checks import COLLECTIVES, SHAPES, layouts, run_and_compare

STEPS = 5


def main() -> int:
    devices = jax.devices()
    assert len(devices) == 8, f"need 8 devices, have {len(devices)} (set XLA_FLAGS)"
    rng = np.random.default_rng(0)
    host = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    grads_host = [{name: rng.standard_normal(shape) for name, shape in SHAPES.items()} for _ in range(STEPS)]
    failures = []
    for path, dtype in (("for-loop", jnp.bfloat16), ("foreach", jnp.bfloat16), ("for-loop", jnp.float32)):
        cast = lambda tree: {k: np.asarray(v).astype(dtype) for k, v in tree.items()}  # noqa: E731
        tx = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=True, torch_path=path)
        step = jax.jit(lambda g, p, s: jax_impl.apply_exact(tx, g, s, p), donate_argnums=(1, 2))
        params = jax.tree.map(jnp.asarray, cast(host))
        state = tx.init(params)
        for grads in grads_host:
            params, state = step(jax.tree.map(jnp.asarray, cast(grads)), params, state)
        expected = jax.tree.map(np.asarray, (params, state))
        if dtype == jnp.bfloat16:  # the single-device step is torch's
            tparams = {k: torch.tensor(v, dtype=torch.bfloat16, requires_grad=True) for k, v in host.items()}
            optimizer = torch.optim.AdamW(list(tparams.values()), lr=1e-2, weight_decay=0.1, amsgrad=True,
                                          foreach=path == "foreach")
            for grads in grads_host:
                for k, t in tparams.items():
                    t.grad = torch.tensor(grads[k], dtype=torch.bfloat16)
                optimizer.step()
            for k, t in tparams.items():
                if not np.array_equal(expected[0][k].astype(np.float32), t.detach().float().numpy()):
                    failures.append(f"{path} bfloat16: params[{k}] differs from torch's")
        for name, (mesh, specs) in layouts(devices).items():
            label = f"{path}, {jnp.dtype(dtype).name}, {name}"
            shardings = {leaf: NamedSharding(mesh, spec) for leaf, spec in specs.items()}
            put = lambda tree: {k: jax.device_put(v, shardings[k]) for k, v in cast(tree).items()}  # noqa: E731
            params = put(host)
            state = jax.jit(tx.init)(params)
            text = step.lower(put(grads_host[0]), params, state).compile().as_text()
            found = [c for c in COLLECTIVES if c in text]
            if found:
                failures.append(f"{label}: the compiled step communicates: {found}")
            failures += run_and_compare(label, step, put, grads_host, params, state, shardings, expected)
            print(f"{label}: collectives: {found or 'none'}")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
