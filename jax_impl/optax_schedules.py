"""optax schedules as exact inputs: tabulated on the host, as the torch scheduler twins are.

An optax schedule (``optax.warmup_cosine_decay_schedule``, ...) computes its lr
in float32 (also under ``jax_enable_x64``, where the count is int32).  Given to
:func:`jax_impl.adamw` directly, the traced lr then feeds the step's scalars in
float32: ``-lr / (1 - b1**t)`` is rounded twice, where torch, driven with the
same lr values (``group["lr"] = float(schedule(t))``), computes in double and
rounds once.  :func:`tabulate` evaluates the schedule once on the host and
returns a :class:`jax_impl.schedules.TorchSchedule` holding those float32
values as doubles, from which ``adamw`` derives every step's scalars in double,
as torch does: bitwise.  The README gives the measured cost of the direct use.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.schedules import TorchSchedule


def tabulate(schedule: Callable[[jax.Array], jax.Array], horizon: int, name: str | None = None, *,
             eager: bool = False) -> TorchSchedule:
    """``schedule(0 .. horizon - 1)`` evaluated once, as an exact ``adamw`` learning rate.

    Past ``horizon`` the last value holds (as ``TorchSchedule`` does): pick the
    number of optimizer steps of the run.  Drive torch with the same floats
    (``group["lr"] = float(table.table[t])``) for a bitwise pair.  A schedule
    evaluated eagerly, ``float(schedule(t))`` op by op, and the same schedule
    compiled can differ in the last bit (XLA fuses the cosine's float32
    arithmetic; measured: 8 of 30 steps of ``warmup_cosine_decay_schedule``):
    ``eager=True`` tabulates the op-by-op values, for torch code that already
    reads ``float(schedule(t))`` (slower: one dispatch per step).
    """
    if not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"tabulate: horizon must be an int >= 1, got {horizon!r}")
    if eager:
        values = np.asarray([float(schedule(jnp.asarray(t, jnp.int32))) for t in range(int(horizon))])
    else:
        counts = jnp.arange(int(horizon), dtype=jnp.int32)
        values = np.asarray(jax.jit(jax.vmap(schedule))(counts), dtype=np.float64)
    if values.shape != (horizon,) or not np.all(np.isfinite(values)):
        raise ValueError(f"tabulate: the schedule must map a count to one finite lr (got shape {values.shape})")
    return TorchSchedule(name or getattr(schedule, "__name__", "optax schedule"), values)
