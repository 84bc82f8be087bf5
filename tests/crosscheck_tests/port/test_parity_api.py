"""crosscheck.assert_trajectories_match: passes on a correct port, names the defect of a wrong one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from crosscheck import assert_trajectories_match, convert
from crosscheck.cifar import models
from crosscheck.common import losses


def _batches(seed=0, n=32):
    rng = np.random.default_rng(seed)
    while True:
        yield rng.uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, n)


def test_simple_cnn_port_passes():
    torch_model, flax_model = models.simple_cnn_pair(seed=1)
    report = assert_trajectories_match(torch_model, flax_model, _batches(), layers=models.simple_cnn_layers(),
                                       steps=6)
    print(report)
    assert len(report.steps) == 6
    assert all(r.param_max_ulps == 0 for r in report.steps)


def test_wrong_flatten_order_is_caught_before_training():
    torch_model, flax_model = models.simple_cnn_pair(seed=1)
    with pytest.raises(AssertionError, match="(?s)logits differ by .*the weight conversion is wrong"):
        assert_trajectories_match(torch_model, flax_model, _batches(), layers=convert.layers_of(torch_model))


def test_a_different_loss_is_caught():
    torch_model, flax_model = models.simple_cnn_pair(seed=1)
    summed = lambda logits, labels: losses.flax_cross_entropy(logits, labels) * 1.001  # noqa: E731
    with pytest.raises(AssertionError, match=r"step 1: loss differs by 0.001 relative"):
        assert_trajectories_match(torch_model, flax_model, _batches(), layers=models.simple_cnn_layers(),
                                  flax_loss=summed)


class FrozenConvs(models.NnxSimpleCNN):
    """A port whose forward is right but whose backward stops at fc1 (a stop_gradient left in)."""

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = jax.lax.stop_gradient(nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2)))
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def test_a_wrong_gradient_is_caught():
    torch_model, _ = models.simple_cnn_pair(seed=1)
    with pytest.raises(AssertionError, match=r"step 1: gradient conv\d/\w+ differs by [\d.e-]+, [\d.e+]+x its rounding band"):
        assert_trajectories_match(torch_model, FrozenConvs(nnx.Rngs(0)), _batches(),
                                  layers=models.simple_cnn_layers())


def test_too_few_batches():
    torch_model, flax_model = models.simple_cnn_pair(seed=1)
    batches = _batches()
    batches = [next(batches), next(batches)]
    with pytest.raises(ValueError, match="batches ran out after 2 of steps=3"):
        assert_trajectories_match(torch_model, flax_model, batches, layers=models.simple_cnn_layers(), steps=3)
