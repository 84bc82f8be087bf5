"""Real models and their Flax ports: convert and round trip bitwise, agree to rounding, pass the parity check.

The table in the README ("Porting") is what ``test_port_table`` prints (slow):
    PYTHONPATH=. python -m pytest tests/crosscheck_tests/port/test_ports.py -m slow -k table -s
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_impl
from crosscheck import assert_trajectories_match, convert
from crosscheck.convert import flax_layers
from crosscheck.port import examples as port_examples
from crosscheck.convert import ConversionError
from crosscheck.common.metrics import as_numpy
from crosscheck.port.command import resume_check
from crosscheck.port import compare
from crosscheck.common import losses

EXAMPLES = port_examples.EXAMPLES


def _converted(name: str, seed: int = 0):
    example = EXAMPLES[name]
    torch_model, flax_model = example.pair(seed)
    layers = example.layers(torch_model)
    nnx.update(flax_model, convert.torch_to_nnx(torch_model.state_dict(), layers, flax_model))
    return example, torch_model, flax_model, layers


def _logit_gap(example, torch_model, flax_model) -> float:
    x, _ = example.batch(0)
    expected = as_numpy(torch_model(torch.from_numpy(x)))
    got = np.asarray(nnx.jit(lambda m, v: m(v))(flax_model, jnp.asarray(compare.channels_last(x))))
    return float(np.max(np.abs(compare.align_to_flax(expected, got) - got)))


# one fast model per family (conv + BatchNorm, ConvTranspose, attention with tied/bare/buffer, recurrent);
# the others are in the slow sweep below and in test_port_table
FAST = ("resnet_block", "decoder", "transformer", "lstm_gru_rmsnorm")


@pytest.mark.parametrize("name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
                                  for name in EXAMPLES])
def test_example_round_trips_bitwise_and_agrees_to_rounding(name):
    example, torch_model, flax_model, layers = _converted(name)
    back = convert.nnx_to_torch(flax_model, layers, reference=torch_model.state_dict())
    assert list(back) == list(torch_model.state_dict())
    for key, value in torch_model.state_dict().items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    gap = _logit_gap(example, torch_model, flax_model)
    print(f"{name}: logit gap {gap:.3g}")
    # measured 3e-8 .. 5.7e-6 (the transformer: softmax and three LayerNorms in float32); a wrong
    # conversion is >= 1e-2 (test_convert.py, test_locate.py)
    assert gap < 2e-5


@pytest.mark.parametrize("name", ["resnet_block", "frozen_buffers"])
def test_example_passes_parity_fast(name):  # frozen_buffers: frozen, bare parameter and buffer in the loop
    example, torch_model, flax_model, layers = _converted(name)
    report = assert_trajectories_match(torch_model, flax_model, port_examples.batches(example), layers=layers,
                                       steps=3)
    print(report)
    assert all(r.param_max_ulps == 0 for r in report.steps)


def test_zero_gradient_leaves_need_the_floor():
    """resnet_block's conv biases feed train-mode BatchNorms: their true gradient is 0 and both frameworks
    hold rounding noise (~5e-8), off by ~1 of its own scale; against the global floor it is ~3e-4.  With a
    fixed grad_tol the floor is what keeps them in; the rounding bands hold them to torch's own noise."""
    example, torch_model, flax_model, layers = _converted("resnet_block")
    with pytest.raises(AssertionError, match=r"gradient conv\d/bias differs by"):
        assert_trajectories_match(torch_model, flax_model, port_examples.batches(example), layers=layers, steps=1,
                                  grad_tol=1e-2, grad_floor=0.0, locate=False)
    example, torch_model, flax_model, layers = _converted("resnet_block")
    # per-leaf overrides: without the floor, the two noise-only leaves pass only when told to expect noise
    report = assert_trajectories_match(torch_model, flax_model, port_examples.batches(example), layers=layers,
                                       steps=1, grad_tol=1e-2, grad_floor=0.0,
                                       grad_tol_by_leaf={"conv1/bias": 10, "conv2/bias": 10}, locate=False)
    assert report.steps[0].grad_leaf in ("conv1/bias", "conv2/bias") and report.steps[0].grad_gap > 0.1


def test_flax_batchnorm_running_var_is_caught_and_named():
    """nnx.BatchNorm (right momentum 0.9, right epsilon) stores the biased variance: the port's forward is
    right in train mode, its running_var is not; flax_layers.BatchNorm matches torch."""
    example, torch_model, _, layers = _converted("resnet_block")
    flax_model = port_examples.NnxResNetBlock()
    flax_model.bn1 = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    with pytest.raises(AssertionError, match=r"step \d: batch statistics bn1/var differ by .*bn1/mean agrees, "
                                             r"bn1/var is off by .* the biased batch variance"):
        assert_trajectories_match(torch_model, flax_model, port_examples.batches(example), layers=layers, steps=3,
                                  locate=False)


def test_torch_semantics_batchnorm_tracks_torch():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=0.2)
    flax_bn = flax_layers.BatchNorm(3, momentum=0.2)
    layers = [convert.Layer("", "batchnorm", ())]
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 2 + 1
        y = as_numpy(bn(torch.from_numpy(x)))
        got = np.asarray(flax_bn(jnp.asarray(compare.channels_last(x))))
        np.testing.assert_allclose(got, np.moveaxis(y, 1, -1), rtol=0, atol=2e-6)  # measured 9.5e-7
    back = convert.nnx_to_torch(flax_bn, [convert.Layer("bn", "batchnorm", ())],
                                reference={f"bn.{k}": v for k, v in bn.state_dict().items()})
    assert int(back["bn.num_batches_tracked"]) == 5
    # unbiased running variance as torch's: rounding only (measured 1.2e-7 relative)
    np.testing.assert_allclose(back["bn.running_var"].numpy(), bn.running_var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(back["bn.running_mean"].numpy(), bn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    del layers


def test_frozen_parameters_are_skipped_and_named_when_missing():
    example, torch_model, flax_model, layers = _converted("frozen_buffers")
    optimizer = torch.optim.AdamW([p for p in torch_model.parameters() if p.requires_grad])
    names = convert.param_names(torch_model, optimizer)
    assert "frozen.weight" not in names and names[0] == "gamma"
    x, y = example.batch(0)
    losses.torch_cross_entropy(torch_model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    with pytest.raises(ConversionError, match=r"frozen\.weight is None \(a parameter without a gradient: frozen"):
        convert.params_to_flax({n: p.grad for n, p in torch_model.named_parameters()}, layers)


def test_tied_weights_buffers_and_bare_params_in_the_table():
    _, torch_model, flax_model, layers = _converted("transformer")
    by_name = {layer.torch_name: layer for layer in layers}
    assert by_name["head"].tied == (("weight", "embed.weight"),)
    assert by_name["pos"].kind == "param" and by_name["mask"].kind == "buffer"
    assert by_name["attn"].kind == "mha" and by_name["attn"].num_heads == 2
    state = dict(torch_model.state_dict())
    state["head.weight"] = state["head.weight"] + 1
    with pytest.raises(ConversionError, match=r"head\.weight is tied to embed\.weight in the model but holds other"):
        convert.torch_to_nnx(state, layers, flax_model)


def test_dtype_changes_are_refused_unless_asked():
    _, torch_model, flax_model, layers = _converted("frozen_buffers")
    doubled = {k: v.double() for k, v in torch_model.state_dict().items()}
    with pytest.raises(ConversionError, match=r"nnx state: \w+ is float64, the target holds float32; converting"):
        convert.torch_to_nnx(doubled, layers, flax_model)
    state = convert.torch_to_nnx(doubled, layers, flax_model, allow_dtype_change=True)
    assert state["head"]["kernel"].get_value().dtype == jnp.float32
    with pytest.raises(ConversionError, match=r"torch state_dict: [\w.]+ is float32, the target holds float64"):
        convert.nnx_to_torch(flax_model, layers, reference=doubled)
    torch_model.register_buffer("ids", torch.arange(3))  # int64 into a model without x64
    with pytest.raises(ConversionError, match=r"ids is int64, the target holds int32"):
        convert.torch_to_linen(torch_model.state_dict(), convert.layers_of(torch_model))


def test_flax_lstm_cell_is_refused_with_the_reason():
    torch_model = port_examples.Recurrent()
    flax_model = port_examples.NnxRecurrent()
    flax_model.lstm = nnx.OptimizedLSTMCell(12, 12, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"layer 'lstm' is a torch lstm, but the Flax model holds an "
                                              r"OptimizedLSTMCell.*one bias per gate.*flax_layers\.LSTM"):
        convert.torch_to_nnx(torch_model.state_dict(), convert.layers_of(torch_model), flax_model)


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose_1d_3d_both_conventions(dims, transpose_kernel):
    torch.manual_seed(0)
    cls = {1: torch.nn.ConvTranspose1d, 3: torch.nn.ConvTranspose3d}[dims]
    module = cls(3, 4, 3, stride=2, padding=1, output_padding=1, dilation=1)
    model = torch.nn.ModuleDict({"up": module})
    flax = nnx.Module()
    flax.up = nnx.ConvTranspose(3, 4, (3,) * dims, strides=2, padding=convert.conv_transpose_padding(module),
                                transpose_kernel=transpose_kernel, rngs=nnx.Rngs(0))
    layers = convert.layers_of(model, transpose_kernel=transpose_kernel)
    nnx.update(flax, convert.torch_to_nnx(model.state_dict(), layers, flax))
    back = convert.nnx_to_torch(flax, layers, reference=model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    x = np.random.default_rng(0).standard_normal((2, 3, *(5,) * dims)).astype(np.float32)
    expected = np.moveaxis(as_numpy(module(torch.from_numpy(x))), 1, -1)
    np.testing.assert_allclose(np.asarray(flax.up(jnp.asarray(np.moveaxis(x, 1, -1)))), expected, rtol=0,
                               atol=1e-6)  # measured <= 2.4e-7


def test_conv_transpose_as_a_plain_conv_is_refused():
    model = torch.nn.ModuleDict({"up": torch.nn.ConvTranspose2d(4, 4, 3)})
    flax = nnx.Module()
    flax.up = nnx.ConvTranspose(4, 4, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"layer 'up' is a torch conv, but the Flax model holds an "
                                              r"ConvTranspose.*needs kind 'conv_transpose'"):
        convert.torch_to_nnx(model.state_dict(), [convert.Layer("up", "conv", ("up",))], flax)


def test_torch_layout_state_works_with_nnx_optimizers_and_state_load_is_atomic():
    _, torch_model, flax_model, layers = _converted("depthwise_dilated")
    layout = convert.torch_layout(torch_model, layers, like=flax_model)
    assert isinstance(layout, nnx.State)
    tx = jax_impl.adamw(1e-3, torch_layout=layout)
    for cls in (nnx.Optimizer, jax_impl.ExactOptimizer):
        optimizer = cls(flax_model, tx, wrt=nnx.Param)
    torch_optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, fused=True)
    for p in torch_model.parameters():
        p.grad = torch.ones_like(p)
    torch_optimizer.step()
    torch_optimizer.step()
    names = convert.param_names(torch_model, torch_optimizer)
    state = convert.torch_optimizer_to_jax(torch_optimizer.state_dict(), layers, names)
    convert.load_nnx_optimizer_state(optimizer, state)
    assert int(optimizer.step.get_value()) == 2 and int(optimizer.opt_state[0].count.get_value()) == 2
    before = nnx.to_pure_dict(nnx.state(optimizer))
    # exp_avg is valid (zeros) and comes first; exp_avg_sq has a wrong shape: nothing may be written
    view = jax_impl.torch_view(state)  # load_nnx_optimizer_state takes the torch-named view too
    zeros = {layer: {leaf: np.zeros_like(v) for leaf, v in leaves.items()} for layer, leaves in view.exp_avg.items()}
    wrong = {**view.exp_avg_sq, "head": {"kernel": np.zeros((1, 1), np.float32),
                                         "bias": view.exp_avg_sq["head"]["bias"]}}
    zeroed = view._replace(exp_avg=zeros, exp_avg_sq=wrong)
    with pytest.raises(ConversionError, match=r"exp_avg_sq: head/kernel converts to shape \(1, 1\)"):
        convert.load_nnx_optimizer_state(optimizer, zeroed)
    after = nnx.to_pure_dict(nnx.state(optimizer))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # exp_avg was not half-written


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_passes_parity_and_resumes(name):
    example, torch_model, flax_model, layers = _converted(name)
    report = assert_trajectories_match(torch_model, flax_model, port_examples.batches(example), layers=layers)
    assert len(report.steps) == 10 and all(r.param_max_ulps == 0 for r in report.steps)
    example, torch_model, _, layers = _converted(name)
    assert resume_check(torch_model, layers, example.batch, 3) == 0


@pytest.mark.slow
def test_port_table():
    """The README table: model x (converts, logits gap, parity check over 10 steps, resume)."""
    rows = ["| model | converts (round trip) | logits gap | parity, 10 steps (max grad gap, ulps) | resume 5+5 |",
            "|---|---|---|---|---|"]
    for name in EXAMPLES:
        example, torch_model, flax_model, layers = _converted(name)
        back = convert.nnx_to_torch(flax_model, layers, reference=torch_model.state_dict())
        exact = all(torch.equal(back[k], v) for k, v in torch_model.state_dict().items())
        gap = _logit_gap(example, torch_model, flax_model)
        example, torch_model, flax_model, layers = _converted(name)
        try:
            report = assert_trajectories_match(torch_model, flax_model, port_examples.batches(example),
                                               layers=layers)
            parity_cell = (f"pass ({max(r.grad_gap for r in report.steps):.2g}, "
                           f"{max(r.param_max_ulps for r in report.steps)})")
        except AssertionError as err:
            parity_cell = f"FAIL {str(err).splitlines()[0]}"
        example, torch_model, _, layers = _converted(name)
        ulps = resume_check(torch_model, layers, example.batch, 5)
        rows.append(f"| {name} | {'bitwise' if exact else 'NO'} | {gap:.2g} | {parity_cell} | "
                    f"{'bitwise' if ulps == 0 else f'{ulps} ulps'} |")
    print("\n".join(rows))
    assert all("FAIL" not in row and "| NO |" not in row for row in rows)
