"""Host-side bias-correction tables, computed in double as torch computes them.

torch evaluates ``1 - beta ** step`` in C double (``std::pow`` in the fused
kernel, Python's ``float.__pow__`` in the for-loop and foreach paths; both call
libm's ``pow``) and only then rounds the step size to the parameter dtype.
Inside ``jax.jit`` the step count is traced and, without ``jax_enable_x64``,
no float64 exists on the device, so the per-step scalars are tabulated here
once and looked up by the count.  The tables end where ``1 - beta**t`` has
become exactly 1.0 in double: every later step uses that last entry.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# 2**22 steps (32 MiB of float64) covers beta <= 0.99999; closer to 1 the steps
# beyond the table are computed in the graph, in float64 as torch does (see
# ``step_scalars`` in _adamw.py).
MAX_TABLE_STEPS = 1 << 22


# torch keeps ``step`` in a float32 tensor and adds 1 each update: at 2**24 the
# sum rounds back to 2**24, so a run's step stops there.
TORCH_STEP_LIMIT = 1 << 24


def torch_step_value(t: int) -> float:
    """The ``step`` torch's update ``t`` reads (as a double): ``t``, up to 2**24, where torch's float32 count stops."""
    return float(np.float32(min(t, TORCH_STEP_LIMIT)))


@functools.lru_cache(maxsize=32)
def bias_correction(beta: float) -> np.ndarray:
    """``1 - beta**t`` for t = 1, 2, ... until it is exactly 1.0, in float64.

    Entry ``i`` holds step ``t = i + 1``.
    """
    values = []
    for t in range(1, MAX_TABLE_STEPS + 1):
        value = 1.0 - math.pow(beta, torch_step_value(t))
        values.append(value)
        if value == 1.0:
            break
    table = np.asarray(values, dtype=np.float64)
    table.setflags(write=False)
    return table


def is_saturated(table: np.ndarray) -> bool:
    """True when the table reached 1.0, so its last entry holds for every later step."""
    return bool(table[-1] == 1.0)
