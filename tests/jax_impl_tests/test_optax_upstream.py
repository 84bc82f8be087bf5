"""A CI subset of optax's own optimizer tests, run against jax_impl.adamw (issue 11).

``tests/optax_upstream.py`` patches optax 0.2.8's test files so that
``jax_impl.adamw`` is their optimizer under test; the whole suites (stock vs
ours, the table in the README) take minutes, so CI runs the quick test
methods here: every one except the long convergence runs (``test_optimization``:
10,000 steps per case, ``test_optimizers``: 30,000) and contrib's copies of
alias_test's dtype tests (the same code on the same optimizer), which the full run covers.
"""

import importlib.util
import io
import unittest

import pytest

import optax_upstream

# (suite, class, test-method prefix): each prefix selects all of absl's parameterized cases of that test.
SELECTED = [
    ("alias_test", "AliasTest", "test_optimizers_accept_extra_args"),
    ("alias_test", "AliasTest", "test_optimizers_can_be_wrapped_in_inject_hyperparams"),
    ("alias_test", "AliasTest", "test_explicit_dtype"),
    ("alias_test", "AliasTest", "test_preserve_dtype"),
    ("alias_test", "AliasTest", "test_state_shape_dtype_shard_stability"),
    ("alias_test", "AliasTest", "test_gradient_accumulation"),
    ("contrib/_common_test", "ContribTest", "test_optimizers_accept_extra_args"),
    ("contrib/_common_test", "ContribTest", "test_optimizers_can_be_wrapped_in_inject_hyperparams"),
    ("contrib/_common_test", "ContribTest", "test_optimizers_accept_learning_rate_schedule"),
    ("float64_test", "Float64Test", "test_mixed_dtype_input_outputs"),
    ("tree_utils/_state_utils_test", "StateUtilsTest", "test_inject_hparams"),
]


def _deliberate(prefix: str, description: str, trace: str) -> bool:
    """The one deliberate difference these tests meet (README, "Drop-in conventions"): a real mu_dtype for a
    complex parameter is refused (optax casts the moment to it and drops its imaginary part)."""
    return (prefix == "test_explicit_dtype" and "params_dtype='complex64'" in description
            and ("state_dtype='float32'" in description or "state_dtype='bfloat16'" in description)
            and "cannot hold the first moment of complex parameter" in trace)


@pytest.fixture(scope="module")
def ours_modules(tmp_path_factory):
    directory = tmp_path_factory.mktemp("optax_upstream")
    modules = {}

    def load(suite):
        if suite not in modules:
            path = optax_upstream.write_suite(suite, "ours", directory)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules[suite] = module
        return modules[suite]

    return load


@pytest.mark.parametrize("suite, cls, prefix", SELECTED, ids=[f"{s}::{p}" for s, _, p in SELECTED])
def test_upstream_optax_test_passes_with_jax_impl(ours_modules, suite, cls, prefix):
    import jax

    # optax's tests may broadcast on purpose; our conftest's strict rank promotion is for our own code.
    previous = jax.config.jax_numpy_rank_promotion
    jax.config.update("jax_numpy_rank_promotion", "allow")
    try:
        test_class = getattr(ours_modules(suite), cls)
        names = sorted(n for n in dir(test_class) if n.startswith(prefix))
        assert names, f"no test {prefix}* in {suite}"
        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
            unittest.TestSuite(test_class(n) for n in names))
    finally:
        jax.config.update("jax_numpy_rank_promotion", previous)
        jax.config.update("jax_enable_x64", False)
    problems = [f"{test}: {trace}" for test, trace in result.failures + result.errors
                if not _deliberate(prefix, str(test), trace)]
    assert not problems, "\n\n".join(problems)
    refused = len(result.failures + result.errors) - len(problems)
    assert refused == (2 if (suite, prefix) == ("alias_test", "test_explicit_dtype") else 0)
    assert result.testsRun == len(names)


def test_upstream_sharding_tests_pass_with_jax_impl(tmp_path):
    """optax's sharding tests need 8 host devices, so they run in their own process."""
    counts = optax_upstream.run_suite("sharding_test", "ours", tmp_path, pytest_args=["-k", "not microbatch"])
    assert counts["failed"] == 0, counts["failures"]
    # init with abstract input and two sharding-in-types tests (8 devices, explicit mesh axes).
    assert counts["passed"] == 3, counts
