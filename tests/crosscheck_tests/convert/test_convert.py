"""Weights and AdamW state between torch and Flax: exact round trips, layouts, errors, resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen, nnx

import jax_impl
import torch_impl
from crosscheck import convert
from crosscheck.cifar import models
from crosscheck.convert import ConversionError
from crosscheck.common.metrics import as_numpy
from helpers import TorchCNN, continue_in_torch, jax_steps, setup_cnn, shared_gradient, torch_steps


class TorchZoo(torch.nn.Module):
    """Every layer kind the converter knows, bias=False, nested and list children."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.conv1d = torch.nn.Conv1d(6, 5, 3, padding=1, bias=False)
        self.norm = torch.nn.LayerNorm(5)
        self.block = torch.nn.ModuleList([torch.nn.Linear(5, 5), torch.nn.Linear(5, 4)])
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.gn = torch.nn.GroupNorm(1, 3)

    def forward(self, tokens, image):
        x = self.conv1d(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        x = self.block[1](torch.relu(self.block[0](self.norm(x))))
        y = self.gn(torch.relu(self.bn(self.conv(image))))
        return x.sum(1), y.mean((2, 3))


class NnxZoo(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 6, rngs=rngs)
        self.conv1d = nnx.Conv(6, 5, (3,), padding=((1, 1),), use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(5, epsilon=1e-5, rngs=rngs)
        self.block = nnx.List([nnx.Linear(5, 5, rngs=rngs), nnx.Linear(5, 4, rngs=rngs)])
        self.conv = nnx.Conv(1, 3, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn = nnx.BatchNorm(3, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)
        self.gn = nnx.GroupNorm(3, num_groups=1, epsilon=1e-5, rngs=rngs)

    def __call__(self, tokens, image):
        x = self.conv1d(self.embed(tokens))
        x = self.block[1](nnx.relu(self.block[0](self.norm(x))))
        y = self.gn(nnx.relu(self.bn(self.conv(image))))
        return x.sum(1), y.mean((1, 2))


def _trained_zoo() -> TorchZoo:
    """Random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = TorchZoo()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model(torch.randint(0, 11, (4, 7)), torch.randn(4, 1, 6, 6))  # updates running stats
        model.bn.num_batches_tracked.fill_(17)
    return model.eval()


def _zoo_inputs():
    rng = np.random.default_rng(1)
    return rng.integers(0, 11, (4, 7)), rng.standard_normal((4, 1, 6, 6)).astype(np.float32)


def _assert_state_dicts_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_every_layer_kind_round_trips_exactly_and_computes_the_same():
    model = _trained_zoo()
    layers = convert.layers_of(model)
    assert [(layer.torch_name, layer.kind) for layer in layers] == [
        ("embed", "embedding"), ("conv1d", "conv"), ("norm", "layernorm"), ("block.0", "linear"),
        ("block.1", "linear"), ("conv", "conv"), ("bn", "batchnorm"), ("gn", "groupnorm")]
    flax_model = NnxZoo(nnx.Rngs(0))
    nnx.update(flax_model, convert.torch_to_nnx(model.state_dict(), layers, flax_model))
    _assert_state_dicts_equal(convert.nnx_to_torch(flax_model, layers, reference=model.state_dict()),
                              model.state_dict())

    tokens, image = _zoo_inputs()
    with torch.no_grad():
        expected = [as_numpy(t) for t in model(torch.from_numpy(tokens), torch.from_numpy(image))]
    got = flax_model(jnp.asarray(tokens), jnp.asarray(models.nchw_to_nhwc(image)))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(np.asarray(g), e, rtol=0, atol=2e-6)  # float32 sums in other orders


def test_torch_to_nnx_leaves_the_model_untouched_until_update():
    model = _trained_zoo()
    flax_model = NnxZoo(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(flax_model))
    convert.torch_to_nnx(model.state_dict(), convert.layers_of(model), flax_model)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(flax_model)), before)


class LinenCNN(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        x = linen.Conv(4, (3, 3), padding=1, name="Conv_0")(x)
        x = linen.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="BatchNorm_0")(x)
        x = linen.max_pool(linen.relu(x), (2, 2), (2, 2))
        return linen.Dense(3, name="Dense_0")(x.reshape(x.shape[0], -1))


def test_linen_round_trip_with_renames_and_nchw_flatten():
    torch.manual_seed(0)
    model = TorchCNN().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    layers = convert.layers_of(model, rename={"conv": "Conv_0", "bn": "BatchNorm_0", "fc": "Dense_0"},
                               flatten_from={"fc": (4, 3, 3)})
    x = np.random.default_rng(0).standard_normal((5, 2, 6, 6)).astype(np.float32)
    template = LinenCNN().init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
    variables = convert.torch_to_linen(model.state_dict(), layers, template)
    assert set(variables) == {"params", "batch_stats"}
    _assert_state_dicts_equal(convert.linen_to_torch(variables, layers, reference=model.state_dict()),
                              model.state_dict())
    got = LinenCNN().apply(variables, jnp.asarray(models.nchw_to_nhwc(x)))
    expected = as_numpy(model(torch.from_numpy(x)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)


def test_simple_cnn_needs_the_flatten_permutation():
    """The seed's CNN: with fc1's rows permuted the port agrees to float rounding, without it it is wrong."""
    torch_model, flax_model = models.simple_cnn_pair(seed=0)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32)
    expected = as_numpy(torch_model(torch.from_numpy(x)))
    right = np.max(np.abs(models.flax_logits(flax_model, x) - expected))

    naive = [layer if layer.torch_name != "fc1" else convert.Layer("fc1", "linear", ("fc1",))
             for layer in models.simple_cnn_layers()]
    nnx.update(flax_model, convert.torch_to_nnx(torch_model.state_dict(), naive, flax_model))
    wrong = np.max(np.abs(models.flax_logits(flax_model, x) - expected))
    print(f"SimpleCNN logit gap: {right:.3g} with the NCHW permutation, {wrong:.3g} naive NHWC")
    assert right < 1e-6  # measured 1.8e-7: float32 rounding of two convolutions and two matmuls
    assert wrong > 1e-2  # measured ~0.1: a real porting bug, 5 orders of magnitude above rounding


def test_errors_name_the_entry():
    model = _trained_zoo()
    layers = convert.layers_of(model)
    flax_model = NnxZoo(nnx.Rngs(0))
    state = model.state_dict()

    missing = dict(state)
    del missing["norm.weight"]
    with pytest.raises(ConversionError, match=r"missing norm\.weight"):
        convert.torch_to_nnx(missing, layers, flax_model)
    with pytest.raises(ConversionError, match=r"extra stray\.weight"):
        convert.torch_to_nnx({**state, "stray.weight": torch.zeros(1)}, layers, flax_model)
    with pytest.raises(ConversionError, match=r"conv/kernel converts to shape \(3, 3, 1, 2\), the target holds "
                                              r"\(3, 3, 1, 3\)"):
        convert.torch_to_nnx({**state, "conv.weight": torch.zeros(2, 1, 3, 3), "conv.bias": torch.zeros(2)},
                             layers, flax_model)
    with pytest.raises(ConversionError, match=r"block\.0\.weight has shape \(5,\), not a linear weight"):
        convert.torch_to_nnx({**state, "block.0.weight": torch.zeros(5)}, layers, flax_model)
    with pytest.raises(ConversionError, match=r"fc1\.weight has shape \(128, 4096\).*prod\(32, 8, 8\)"):
        convert.torch_to_nnx(models.TorchSimpleCNN().state_dict(),
                             convert.layers_of(models.TorchSimpleCNN(), flatten_from={"fc1": (32, 8, 8)}),
                             models.NnxSimpleCNN(nnx.Rngs(0)))
    with pytest.raises(ConversionError, match=r"missing bn/mean"):
        convert.nnx_to_torch({"bn": {"scale": 1}}, [convert.Layer("bn", "batchnorm", ("bn",))])
    with pytest.raises(ConversionError, match=r"module 'rnn' \(RNN\) holds parameters"):
        convert.layers_of(torch.nn.ModuleDict({"rnn": torch.nn.RNN(2, 2)}))
    with pytest.raises(ConversionError, match=r"rename names modules the model does not have: \['nope'\]"):
        convert.layers_of(model, rename={"nope": "x"})
    with pytest.raises(ConversionError, match=r"unknown kind 'rnn'"):
        convert.Layer("x", "rnn", ("x",))


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch_impl.AdamW], ids=["torch.optim", "torch_impl"])
def test_optimizer_state_round_trips_exactly(amsgrad, cls):
    model, optimizer, layers = setup_cnn(amsgrad, cls)
    torch_steps(model, optimizer, 5, 0)
    names = convert.param_names(model, optimizer)
    params = convert.params_to_flax(dict(model.named_parameters()), layers)
    state = convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params)
    assert int(state[0].count) == 5 and isinstance(state[0], optax.ScaleByAmsgradState) == amsgrad
    back = convert.jax_optimizer_to_torch(state, layers, names, optimizer.state_dict()["param_groups"])
    original = optimizer.state_dict()
    assert back["param_groups"] == original["param_groups"]
    assert back["state"].keys() == original["state"].keys()
    for index, entry in original["state"].items():
        assert back["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert back["state"][index][key].dtype == value.dtype and torch.equal(back["state"][index][key], value)
    fresh = cls(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, fused=True)
    fresh.load_state_dict(back)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_resume_across_frameworks_equals_the_run_that_never_switched(amsgrad):
    """k steps in torch, convert, k in JAX (and JAX first, then torch): bitwise the 2k-step torch run."""
    k = 6
    model, optimizer, layers = setup_cnn(amsgrad)
    torch_steps(model, optimizer, 2 * k, 0)
    never_switched = {n: p.detach().clone() for n, p in model.named_parameters()}
    # fc.weight has 108 elements: torch's tail is its last 4, which in the
    # transposed Flax kernel lie elsewhere.
    tx = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=amsgrad, torch_layout=convert.torch_layout(model, layers))

    # torch -> JAX
    model, optimizer, layers = setup_cnn(amsgrad)
    torch_steps(model, optimizer, k, 0)
    names = convert.param_names(model, optimizer)
    params = convert.params_to_flax(dict(model.named_parameters()), layers)
    state = convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params)
    params, _ = jax_steps(model, layers, names, jax.tree.map(jnp.asarray, params), state, tx, k, k)
    for name, value in convert.params_to_torch(params, layers, names).items():
        assert torch.equal(value, never_switched[name]), name

    # JAX -> torch
    model, optimizer, layers = setup_cnn(amsgrad)
    params = jax.tree.map(jnp.asarray, convert.params_to_flax(dict(model.named_parameters()), layers))
    params, state = jax_steps(model, layers, names, params, tx.init(params), tx, k, 0)
    continue_in_torch(model, optimizer, layers, names, params, state, k, k)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), never_switched[name]), name


def test_optimizer_state_into_nnx_optimizer_and_back():
    model, optimizer, layers = setup_cnn(amsgrad=True)
    torch_steps(model, optimizer, 3, 0)
    names = convert.param_names(model, optimizer)
    flax_model = nnx.Module()
    flax_model.conv = nnx.Conv(2, 4, (3, 3), padding=1, rngs=nnx.Rngs(0))
    flax_model.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    flax_model.fc = nnx.Linear(36, 3, rngs=nnx.Rngs(0))
    nnx.update(flax_model, convert.torch_to_nnx(model.state_dict(), layers, flax_model))
    nnx_optimizer = nnx.Optimizer(flax_model, jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=True), wrt=nnx.Param)
    convert.load_nnx_optimizer_state(nnx_optimizer,
                                     convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names))
    assert int(nnx_optimizer.opt_state[0].count.get_value()) == 3
    back = convert.jax_optimizer_to_torch(nnx.as_pure(nnx_optimizer.opt_state), layers, names,
                                          optimizer.state_dict()["param_groups"])
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][index][key], value), (index, key)


def test_optimizer_state_errors_name_the_parameter():
    model, optimizer, layers = setup_cnn(amsgrad=False)
    torch_steps(model, optimizer, 2, 0)
    names = convert.param_names(model, optimizer)
    state = optimizer.state_dict()
    skewed = {"state": {i: {**s, "step": torch.tensor(3.0 if i == 0 else 2.0)} for i, s in state["state"].items()}}
    with pytest.raises(ConversionError, match=r"steps .* are not one integer count"):
        convert.torch_optimizer_to_jax(skewed, layers, names)
    with pytest.raises(ConversionError, match=r"extra parameter indices \[9\]"):
        convert.torch_optimizer_to_jax({"state": {**state["state"], 9: state["state"][0]}}, layers, names)
    with pytest.raises(ConversionError, match=r"optimizer parameter 0 \('conv.weight'\) is in no layer"):
        convert.torch_optimizer_to_jax(state, layers[1:], names)
    wrong = jax.tree.map(lambda x: x, convert.params_to_flax(dict(model.named_parameters()), layers))
    wrong["fc"]["kernel"] = np.zeros((3, 3))
    with pytest.raises(ConversionError, match=r"fc/kernel converts to shape \(36, 3\), the target holds \(3, 3\)"):
        convert.torch_optimizer_to_jax(state, layers, names, wrong)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_frozen_parameters_have_no_state_both_ways_and_the_resume_is_bitwise(amsgrad):
    """A torch optimizer over model.parameters() with a frozen one (requires_grad=False): torch's step skips it
    and keeps no state for it; converted, it has no moments, the JAX run over the trainable params continues
    bitwise, and back in torch it has no state again."""
    k = 3

    def frozen_cnn():
        model, optimizer, layers = setup_cnn(amsgrad)
        model.bn.weight.requires_grad_(False)
        return model, optimizer, layers

    model, optimizer, layers = frozen_cnn()
    torch_steps(model, optimizer, 2 * k, 0)
    never_switched = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, optimizer, layers = frozen_cnn()
    torch_steps(model, optimizer, k, 0)
    names = convert.param_names(model, optimizer)
    assert "bn.weight" in names and names.index("bn.weight") not in optimizer.state_dict()["state"]
    trainable = [n for n in names if model.get_parameter(n).requires_grad]
    named = dict(model.named_parameters())
    params = jax.tree.map(jnp.asarray, convert.params_to_flax({n: named[n] for n in trainable}, layers))
    state = convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params)
    assert "scale" not in state[0].mu["bn"] and int(state[0].count) == k
    everything = convert.params_to_flax(named, layers)
    with pytest.raises(ConversionError, match=r"\['bn.weight'\] have no AdamW state \(frozen"):
        convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, everything)

    back = convert.jax_optimizer_to_torch(state, layers, names, optimizer.state_dict()["param_groups"])
    assert back["state"].keys() == optimizer.state_dict()["state"].keys()
    for index, entry in optimizer.state_dict()["state"].items():
        assert all(torch.equal(back["state"][index][key], value) for key, value in entry.items())

    tx = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=amsgrad, torch_layout=convert.torch_layout(model, layers))
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for t in range(k, 2 * k):
        with torch.no_grad():
            for name, value in convert.params_to_torch(params, layers, trainable).items():
                model.get_parameter(name).copy_(value)
        shared_gradient(model, t)
        grads = convert.params_to_flax({n: named[n].grad for n in trainable}, layers)
        params, state = step(jax.tree.map(jnp.asarray, grads), state, params)
    for name, value in convert.params_to_torch(params, layers, trainable).items():
        assert torch.equal(value, never_switched[name]), name
    assert torch.equal(named["bn.weight"].detach(), never_switched["bn.weight"])  # never stepped, either run

    resumed = type(optimizer)(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, fused=True)
    resumed.load_state_dict(convert.jax_optimizer_to_torch(state, layers, names, optimizer.state_dict()["param_groups"]))
    assert names.index("bn.weight") not in resumed.state_dict()["state"]
    assert int(resumed.state_dict()["state"][0]["step"]) == 2 * k


@pytest.mark.parametrize("amsgrad", [False, True])
def test_transposed_params_are_bitwise_with_torch_layout(amsgrad):
    """jax_impl on Flax-layout leaves equals torch's fused kernel on torch-layout tensors, given torch_layout.

    Without it, the elements torch leaves to its scalar tail (last numel % 8)
    are others in the transposed leaf and round differently (1 ulp, now and then).
    """
    model = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 5, 3), "fc": torch.nn.Linear(36, 3),
                                 "flat": torch.nn.Linear(4 * 3 * 3, 7)})
    layers = convert.layers_of(model, flatten_from={"flat": (4, 3, 3)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad, fused=True)
    names = convert.param_names(model, optimizer)
    params = jax.tree.map(jnp.asarray, convert.params_to_flax(dict(model.named_parameters()), layers))
    runs = {}
    for with_layout in (True, False):
        layout = convert.torch_layout(model, layers) if with_layout else None
        tx = jax_impl.adamw(1e-2, amsgrad=amsgrad, torch_layout=layout)
        runs[with_layout] = [params, tx.init(params), jax.jit(lambda g, s, p, tx=tx: jax_impl.apply_exact(tx, g, s, p))]
    rng = np.random.default_rng(0)
    for _ in range(300):
        for p in model.parameters():
            p.grad = torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32))
        optimizer.step()
        grads = jax.tree.map(jnp.asarray, convert.params_to_flax({n: p.grad for n, p in model.named_parameters()},
                                                                 layers))
        for run in runs.values():
            run[0], run[1] = run[2](grads, run[1], run[0])
    expected = dict(model.named_parameters())
    for name, value in convert.params_to_torch(runs[True][0], layers, names).items():
        assert torch.equal(value, expected[name].detach()), name
    differing = sum(int((value != expected[name].detach()).sum())
                    for name, value in convert.params_to_torch(runs[False][0], layers, names).items())
    assert differing > 0  # the option is what makes the tail elements agree
