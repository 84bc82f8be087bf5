"""Sharded jax_impl.adamw (data parallel, FSDP, 2-D mesh) on 8 host CPU devices, in a subprocess.

The checks (tests/sharded_checks.py): jit(init) gives every moment its
parameter's sharding; the jitted, donated step has no collectives and no
copies, reuses every donated buffer, keeps all shardings, and equals the
single-device step bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path


def test_sharded_step_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = Path(__file__).with_name("sharded_checks.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=script.parents[1])
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
