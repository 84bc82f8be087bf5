"""locate_divergence: correct ports are clean, every planted pitfall is named at its layer with its cause."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from crosscheck import assert_trajectories_match, convert, locate_divergence
from crosscheck.convert import flax_layers
from crosscheck.port import examples as port_examples
from crosscheck.convert import ConversionError

F = torch.nn.functional


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.mid(F.gelu(self.fc1(self.norm(x))))))


class TransposedLinear(nnx.Linear):
    """A hand-written port that forgot torch's (out, in) layout: x @ kernel.T."""

    def __call__(self, x):
        return x @ self.kernel[...].T + self.bias[None]


class NnxMLP(nnx.Module):
    def __init__(self, epsilon=1e-5, approximate=False, mid=nnx.Linear, stop=False):
        rngs = nnx.Rngs(0)
        self.norm = nnx.LayerNorm(8, epsilon=epsilon, rngs=rngs)
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.mid = mid(16, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)
        self.approximate, self.stop = approximate, stop

    def __call__(self, x):
        h = jax.nn.gelu(self.fc1(self.norm(x)), approximate=self.approximate)
        h = jax.lax.stop_gradient(h) if self.stop else h
        return self.fc2(nnx.relu(self.mid(h)))


def _mlp_batch():
    rng = np.random.default_rng(0)
    # small activations, as after an embedding: a LayerNorm epsilon then matters
    return (0.05 * rng.standard_normal((16, 8))).astype(np.float32), rng.integers(0, 4, 16)


def _mlp():
    torch.manual_seed(0)
    return TorchMLP()


def test_a_correct_port_has_no_divergence_and_a_band_it_stays_in():
    result = locate_divergence(_mlp(), NnxMLP(), _mlp_batch())
    assert result.ok, str(result)
    assert [m.name for m in result.modules] == ["norm", "fc1", "mid", "fc2", "(output)"]  # torch's execution order, then the model's output
    assert all(0 < m.band < 1e-4 for m in result.modules)
    assert set(result.gradients) == {"norm/scale", "norm/bias", "fc1/kernel", "fc1/bias", "mid/kernel", "mid/bias",
                                     "fc2/kernel", "fc2/bias"}


@pytest.mark.parametrize("port, first, cause", [
    (lambda: NnxMLP(epsilon=1e-6), "norm", "epsilon"),  # nnx.LayerNorm's default epsilon
    (lambda: NnxMLP(approximate=True), "mid", "gelu"),  # jax.nn.gelu's default approximate=True
    (lambda: NnxMLP(mid=TransposedLinear), "mid", "layout"),
    (lambda: NnxMLP(stop=True), "fc1/bias", "backward"),  # the last leaf before the stop
], ids=["layernorm-epsilon", "gelu-approximate", "linear-untransposed", "stop-gradient"])
def test_planted_pitfall_in_an_mlp_is_located(port, first, cause):
    result = locate_divergence(_mlp(), port(), _mlp_batch())
    print(result)
    assert (result.first, result.cause) == (first, cause), str(result)


def _resnet_port(**replace):
    example = port_examples.EXAMPLES["resnet_block"]
    torch_model, flax_model = example.pair(0)
    for name, module in replace.items():
        setattr(flax_model, name, module)
    return torch_model, flax_model, example


# The first case compiles the block (~10 s); the others reuse most of it but are kept out of the default suite.
@pytest.mark.parametrize("replace, first, cause", [
    ({"conv2": nnx.Conv(8, 8, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0))}, "conv2", "padding"),
    pytest.param({"bn1": nnx.BatchNorm(8, momentum=0.1, epsilon=1e-5, rngs=nnx.Rngs(0))}, "bn1", "momentum",
                 marks=pytest.mark.slow),
    pytest.param({"bn1": flax_layers.BatchNorm(8, use_running_average=True)}, "bn1", "running_stats",
                 marks=pytest.mark.slow),
    pytest.param({"bn2": nnx.BatchNorm(8, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0))}, "bn2", "epsilon",
                 marks=pytest.mark.slow),
], ids=["conv-padding-SAME", "batchnorm-momentum", "batchnorm-eval-vs-train", "batchnorm-epsilon"])
def test_planted_pitfall_in_a_resnet_block_is_located(replace, first, cause):
    torch_model, flax_model, example = _resnet_port(**replace)
    result = locate_divergence(torch_model, flax_model, example.batch(0), layers=example.layers(torch_model))
    print(result)
    assert (result.first, result.cause) == (first, cause), str(result)


@pytest.mark.slow
def test_missing_flatten_permutation_is_located_with_its_shape():
    example = port_examples.EXAMPLES["depthwise_dilated"]
    torch_model, flax_model = example.pair(0)
    result = locate_divergence(torch_model, flax_model, example.batch(0), layers=convert.layers_of(torch_model))
    assert (result.first, result.cause) == ("head", "flatten"), str(result)
    assert "flatten_from=(16, 4, 4)" in result.detail


def test_a_conv_transpose_of_the_other_kernel_convention_is_refused():
    torch_model = port_examples.Decoder()
    flax_model = nnx.eval_shape(lambda: port_examples.NnxDecoder(transpose_kernel=True))  # no weights computed
    with pytest.raises(ConversionError, match=r"layer 'up1': the Flax ConvTranspose at up1 has transpose_kernel=True"):
        convert.torch_to_nnx(torch_model.state_dict(), convert.layers_of(torch_model), flax_model)


@pytest.mark.slow
def test_the_other_kernel_convention_is_right_when_the_table_says_so():
    example = port_examples.EXAMPLES["decoder"]
    torch_model, _ = example.pair(0)
    flax_model = port_examples.NnxDecoder(transpose_kernel=True)
    layers = convert.layers_of(torch_model, transpose_kernel=True)
    assert locate_divergence(torch_model, flax_model, example.batch(0), layers=layers).ok


def test_parity_failure_message_says_where():
    rng = np.random.default_rng(1)
    batches = (((0.05 * rng.standard_normal((16, 8))).astype(np.float32), rng.integers(0, 4, 16)) for _ in range(9))
    with pytest.raises(AssertionError, match=r"(?s)where: first divergence at 'mid'.*\[gelu\]"):
        assert_trajectories_match(_mlp(), NnxMLP(approximate=True), batches, steps=3, logit_tol=1e-6)


def test_report_files(tmp_path):
    from crosscheck.port import locate
    result = locate_divergence(_mlp(), NnxMLP(epsilon=1e-6), _mlp_batch())
    paths = locate.write_report(result, tmp_path, "planted epsilon")
    import json

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["first"] == "norm" and data["cause"] == "epsilon" and len(data["modules"]) == 5
    assert "**outside**" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(paths) == 3


def gelu_port():
    """A factory for the CLI test: the MLP's port with jax.nn.gelu's default."""
    return NnxMLP(approximate=True)
