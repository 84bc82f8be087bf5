import jax
import pytest

# Strict shapes: a (3, 1) gradient must not broadcast onto a (3,) parameter.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run a test with jax_enable_x64 on (float64 params, float64 schedules), restoring it after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
