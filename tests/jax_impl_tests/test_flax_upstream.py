"""Flax 0.12.8's ``tests/nnx/optimizer_test.py`` with ``jax_impl.adamw`` and ``jax_impl.ExactOptimizer`` swapped in.

``tests/flax_upstream.py`` does the swap (and nothing else) on an unmodified copy of the
upstream file; without a copy (it is not part of this repository) these tests skip.
Among them: ``test_sharding_propagation`` reads ``state['opt_state'][0]['mu']['kernel']``
(optax's tree), ``test_update_returns_updates`` checks what ``update`` returns.
"""

import importlib.util
import io
import unittest

import pytest

import flax_upstream

# The quick methods; the jit and linesearch products (18 + 6 cases) run in the full table (tests/flax_upstream.py).
SELECTED = ("test_update", "test_sharding_propagation", "test_update_returns_updates",
            "test_update_backward_compatible", "test_wrt_update", "test_wrt_update_functional", "test_split_merge")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    if flax_upstream.upstream_source() is None:
        pytest.skip(f"no copy of Flax's tests/nnx/optimizer_test.py at {flax_upstream.source_path()} "
                    "(tests/flax_upstream.py says how to get it)")
    path = flax_upstream.write("ours", tmp_path_factory.mktemp("flax_upstream"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prefix", SELECTED)
def test_upstream_flax_optimizer_test_passes_with_jax_impl(ours, prefix):
    import jax

    assert "jax_impl.adamw(" in open(ours.__file__).read()  # the swap took place
    previous = jax.config.jax_numpy_rank_promotion
    jax.config.update("jax_numpy_rank_promotion", "allow")  # Flax's tests may broadcast; our conftest forbids it
    try:
        names = sorted(n for n in dir(ours.TestOptimizer)
                       if n == prefix or (n.startswith(prefix) and n[len(prefix):].lstrip("_").isdigit()))
        assert names, f"no test {prefix} in Flax's optimizer_test.py"
        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
            unittest.TestSuite(ours.TestOptimizer(n) for n in names))
    finally:
        jax.config.update("jax_numpy_rank_promotion", previous)
    problems = [f"{test}: {trace}" for test, trace in result.failures + result.errors]
    assert not problems, "\n\n".join(problems)
    assert result.testsRun == len(names)
