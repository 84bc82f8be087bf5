"""Sharded jax_impl.adamw (data parallel, FSDP, 2-D mesh) on 8 host CPU devices, in a subprocess.

The checks (tests/sharded_checks.py): jit(init) gives every moment its
parameter's sharding; the jitted, donated step has no collectives and no
copies, reuses every donated buffer, keeps all shardings, and equals the
single-device step bit for bit.
"""

from helpers import run_on_8_cpu_devices


def test_sharded_step_on_8_cpu_devices():
    run_on_8_cpu_devices("sharded_checks.py")
