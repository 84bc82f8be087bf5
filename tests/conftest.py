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


@pytest.fixture(scope="session")
def cifar_dir():
    """The real CIFAR-10 subset: $CROSSCHECK_CIFAR10_DIR, else ../shared/data/cifar10-subset beside the repository."""
    import os
    from pathlib import Path

    from crosscheck.cifar import data as cifar10
    path = Path(os.environ.get(cifar10.ENV_VAR) or Path(__file__).resolve().parents[1] / "../shared/data/cifar10-subset")
    if not ((path / cifar10.ARCHIVE).is_file() or (path / cifar10.FOLDER).is_dir()):
        pytest.skip(f"no CIFAR-10 data at {path} (set ${cifar10.ENV_VAR})")
    return path
