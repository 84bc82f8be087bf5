"""Float64 for one computation, whatever the global ``jax_enable_x64``."""

import contextlib

import jax


def x64_scope():
    """A context in which float64 exists, whatever the global jax_enable_x64 (jax 0.4.x to 0.11)."""
    if jax.config.jax_enable_x64:
        return contextlib.nullcontext()
    state = getattr(jax, "enable_x64", None)
    if state is not None and callable(state):
        return state(True)
    from jax.experimental import enable_x64  # jax < 0.7

    return enable_x64()
