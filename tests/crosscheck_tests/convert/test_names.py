"""Placing torch layers in a port whose names differ: conventions, structure, refusals, the CLI's mapping file."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import name_models as nm
import numpy as np
import pytest
import torch
from flax import nnx

from crosscheck import cli, convert
from crosscheck.convert import ConversionError


def round_trip(torch_model, flax_model, layers):
    """torch -> nnx -> torch, bitwise, every key; returns the converted nnx model."""
    nnx.update(flax_model, convert.torch_to_nnx(torch_model.state_dict(), layers, flax_model))
    back = convert.nnx_to_torch(flax_model, layers, reference=torch_model.state_dict())
    assert list(back) == list(torch_model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in torch_model.state_dict().items())
    return flax_model


def gap(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.slow  # importing transformers: ~10 s
def test_hf_gpt2_into_a_port_without_the_transformer_prefix():
    torch_model, flax_model = nm.tiny_gpt2(), nm.NnxGPT2()
    with pytest.raises(ConversionError, match=r"missing h/0/attn/c_attn/bias \(48,\), h/0/attn/c_attn/kernel"):
        convert.torch_to_nnx(torch_model.state_dict(), convert.layers_of(torch_model), flax_model)
    matching = convert.match(torch_model, flax_model)
    rows = {r.torch_name: r for r in matching.rows}
    assert rows["transformer.h.1.attn.c_attn"].flax_path == ("h", 1, "attn", "c_attn")
    assert rows["transformer.h.1.attn.c_attn"].kind == "linear_in_out"  # HF Conv1D: (in, out) already
    assert "prefix 'transformer' dropped" in rows["transformer.wte"].how
    round_trip(torch_model, flax_model, matching.layers)
    tokens = np.random.default_rng(0).integers(0, 32, (2, 8))
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(tokens)).logits.numpy()
    # float32 rounding through two blocks (measured 4.5e-8); a wrong layout is of order 1
    assert gap(logits, flax_model(jnp.asarray(tokens))) < 1e-5


def test_sequential_downsample_is_nnx_sequential_layers():
    torch_model, flax_model = nm.BasicBlock(), nnx.eval_shape(nm.make_nnx_basic_block)  # shapes only: fast
    layers = convert.layers_of(torch_model, like=flax_model)
    assert {l.torch_name: l.flax_path for l in layers}["downsample.0"] == ("downsample", "layers", 0)
    round_trip(torch_model, flax_model, layers)


def test_a_models_own_layernorm_weight_is_nnx_scale():
    torch_model, flax_model = nm.OwnNormMLP(), nm.NnxOwnNormMLP()
    with pytest.raises(ConversionError, match=r"missing norm/scale"):
        convert.torch_to_nnx(torch_model.state_dict(), convert.layers_of(torch_model), flax_model)
    matching = convert.match(torch_model, flax_model)
    assert {r.torch_name: r.how for r in matching.rows}["norm.weight"] == "name, weight -> scale"
    round_trip(torch_model, flax_model, matching.layers)
    x = nm.numpy_batch((4, 6))
    with torch.no_grad():
        assert gap(torch_model(torch.from_numpy(x)), flax_model(jnp.asarray(x))) < 1e-5  # rounding (~1e-7)


def test_linen_automatic_names_by_shape_and_call_order(capsys):
    torch_model, variables = nm.SmallResNet(), nm.linen_small_resnet_variables()
    layers = convert.layers_of(torch_model, like=variables)
    table = capsys.readouterr().out  # placed by structure: the table is printed for review
    assert "a_bn" in table and "BatchNorm_1" in table and "order + shape (torch definition vs linen's" in table
    got = {l.torch_name: l.flax_path for l in layers}
    assert got == {"stem": ("Conv_0",), "stem_bn": ("BatchNorm_0",), "a": ("Conv_1",), "a_bn": ("BatchNorm_1",),
                   "b": ("Conv_2",), "b_bn": ("BatchNorm_2",), "up": ("Conv_3",), "up_bn": ("BatchNorm_3",),
                   "head": ("Dense_0",)}
    converted = convert.torch_to_linen(torch_model.state_dict(), layers, variables)
    back = convert.linen_to_torch(converted, layers, reference=torch_model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in torch_model.state_dict().items())


@pytest.mark.slow  # initializing a ResNet-18 compiles it: ~15 s
def test_torchvision_resnet18_names_into_flaxmodels_linen_resnet18():
    pytest.importorskip("flaxmodels")  # optional: only this test uses it
    torch_model = nm.TorchvisionResNet18()
    variables = nm.flaxmodels_resnet18_variables()
    layers = convert.layers_of(torch_model, like=variables, show_table=False)
    got = {l.torch_name: l.flax_path for l in layers}
    assert (got["bn1"], got["layer1.1.bn2"]) == (("BatchNorm_0",), ("BasicBlock_1", "BatchNorm_1"))
    assert got["layer3.0.downsample.1"] == ("BasicBlock_4", "BatchNorm_2")
    converted = convert.torch_to_linen(torch_model.state_dict(), layers, variables)
    back = convert.linen_to_torch(converted, layers, reference=torch_model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in torch_model.state_dict().items())


def test_sorted_linen_variables_lose_the_call_order_across_families():
    pytest.importorskip("flaxmodels")
    # BatchNorm_0 (the stem) and BasicBlock_0/BatchNorm_0 hold the same shapes; sorted, which ran first is unknown
    with pytest.raises(ConversionError, match=r"ambiguous: torch bn1, layer1.0.bn1, .* BatchNorm_0 have the same "
                                              r"shapes; the Flax order is lost"):
        convert.layers_of(nm.TorchvisionResNet18(), like=nm.flaxmodels_resnet18_variables(init=False))


def test_a_non_persistent_buffer_converts_both_ways():
    torch_model, flax_model = nm.PositionalMLP(), nm.NnxPositionalMLP()
    assert "pe" not in torch_model.state_dict()
    layers = convert.layers_of(torch_model)  # read from the module's buffers, not the state_dict
    round_trip(torch_model, flax_model, layers)  # and not put back into the state_dict
    assert torch.equal(torch.from_numpy(np.array(flax_model.pe[...])), torch_model.pe)
    flax_model.pe[...] = jnp.zeros_like(flax_model.pe[...])
    nnx.update(flax_model, convert.torch_to_nnx(torch_model, layers, flax_model))  # the module itself works too
    assert torch.equal(torch.from_numpy(np.array(flax_model.pe[...])), torch_model.pe)
    # a port that computes its table instead of holding it needs none
    proj_only = nm.NnxPositionalMLP()
    del proj_only.pe
    round_trip(torch_model, proj_only, convert.layers_of(torch_model, like=proj_only))


def test_conv_transpose_kernel_convention_is_read_from_the_port():
    torch_model, flax_model = nm.Upsampler(), nm.NnxUpsampler()
    with pytest.raises(ConversionError, match="transpose_kernel=True"):
        convert.torch_to_nnx(torch_model.state_dict(), convert.layers_of(torch_model), flax_model)
    layers = convert.layers_of(torch_model, like=flax_model)
    assert layers[0].transpose_kernel is True
    round_trip(torch_model, flax_model, layers)
    x = nm.numpy_batch((2, 4, 5, 5))
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    assert gap(want, flax_model(jnp.asarray(x.transpose(0, 2, 3, 1)))) < 1e-5  # rounding (~1e-7)


def test_same_shaped_layers_without_an_execution_order_are_refused_naming_the_candidates(capsys):
    torch_model, flax_model = nm.TwoSame(), nm.NnxTwoSame()
    with pytest.raises(ConversionError, match=r"ambiguous: torch second, first \(linear: kernel \(8, 8\), "
                                              r"bias \(8,\)\) and Flax dense_a, dense_b have the same shapes; only "
                                              r"definition orders are known"):
        convert.layers_of(torch_model, like=flax_model)
    # torch's forward order (first, then second) settles it; the table says so
    layers = convert.layers_of(torch_model, like=flax_model, example=torch.zeros(1, 8))
    assert "order + shape (torch forward vs Flax's definition order)" in capsys.readouterr().out
    assert {l.torch_name: l.flax_path for l in layers} == {"first": ("dense_a",), "second": ("dense_b",),
                                                           "out": ("logits",)}
    round_trip(torch_model, flax_model, layers)


def test_conversion_error_lists_both_sides_and_the_closest_matches():
    torch_model, flax_model = nm.BasicBlock(), nnx.eval_shape(nm.make_nnx_basic_block)
    with pytest.raises(ConversionError) as err:
        convert.torch_to_nnx(torch_model.state_dict(), convert.layers_of(torch_model), flax_model)
    message = str(err.value)
    assert "missing downsample/layers/0/kernel (1, 1, 3, 8)" in message  # the Flax leaves without a value
    assert "extra downsample.0.weight -> downsample/0/kernel (1, 1, 3, 8)" in message  # torch entries without a home
    assert "closest to downsample.0.weight -> downsample/0/kernel (1, 1, 3, 8): downsample/layers/0/kernel " \
           "(same shape)" in message
    # the matcher: a torch layer the port lacks, and a Flax module no torch layer fills
    flax_model.extra = nnx.Linear(5, 7, rngs=nnx.Rngs(1))
    del flax_model.fc
    with pytest.raises(ConversionError) as err:
        convert.layers_of(torch_model, like=flax_model)
    message = str(err.value)
    assert "torch entries without a Flax home: fc (linear: kernel (8, 10), bias (10,))" in message
    assert "Flax leaves without a torch entry: extra (kernel (5, 7), bias (7,))" in message
    assert "closest to torch fc: extra (same kind)" in message


def test_rename_takes_prefixes_and_string_paths_with_indices():
    torch_model, flax_model = nm.BasicBlock(), nnx.eval_shape(nm.make_nnx_basic_block)
    layers = convert.layers_of(torch_model, rename={"downsample": "downsample/layers"})
    assert {l.torch_name: l.flax_path for l in layers}["downsample.1"] == ("downsample", "layers", 1)
    round_trip(torch_model, flax_model, layers)
    with pytest.raises(ConversionError, match=r"the mapping puts 'fc' \(linear: kernel \(8, 10\), bias \(10,\)\) "
                                              r"at conv1, where the Flax model holds kernel \(3, 3, 3, 8\)"):
        convert.layers_of(torch_model, like=flax_model, rename={"fc": "conv1"})


# ---------------------------------------------------------------- python -m crosscheck port

TWO_SAME = ["--torch", "name_models:TwoSame", "--input-shape", "16,8", "--classes", "3", "--steps", "1"]


@pytest.fixture
def importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))  # --torch module:factory imports tests/name_models


def test_port_print_mapping_prints_the_table_and_stops(tmp_path, capsys, importable):
    rc = cli.main(["--out", str(tmp_path), "port", "--torch", "name_models:BasicBlock",
                   "--flax", "name_models:abstract_nnx_basic_block", "--input-shape", "2,3,8,8", "--print-mapping"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "downsample.0  ->  downsample/layers/0  conv       name, nnx.Sequential 'layers'" in out
    assert not (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_port_mapping_file_places_what_definition_order_gets_wrong(tmp_path, capsys, importable):
    swapped = [*TWO_SAME, "--flax", "name_models:make_nnx_two_same_swapped"]
    assert cli.main(["--out", str(tmp_path), "port", *swapped]) == 1  # by order: first -> dense_b, wrong
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"first": "dense_a", "second": "dense_b"}))
    assert cli.main(["--out", str(tmp_path), "port", *swapped, "--mapping", str(mapping)]) == 0
    assert "first       ->  dense_a    linear  mapping" in capsys.readouterr().out


def test_port_bad_or_refused_mapping_exits_2(tmp_path, capsys, importable):
    swapped = [*TWO_SAME, "--flax", "name_models:make_nnx_two_same_swapped"]
    mapping = tmp_path / "names.json"
    mapping.write_text("[1, 2]")
    assert cli.main(["--out", str(tmp_path), "port", *swapped, "--mapping", str(mapping)]) == 2
    assert "expected a JSON object of torch name -> Flax path, got list" in capsys.readouterr().err
    mapping.write_text(json.dumps({"first": "nowhere"}))
    assert cli.main(["--out", str(tmp_path), "port", *swapped, "--mapping", str(mapping), "--print-mapping"]) == 2
    assert "conversion refused: the mapping puts 'first'" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_torch_layout_by_label_inside_multi_transform():
    import jax
    import optax

    import jax_impl

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    layers = convert.layers_of(model)
    params = jax.tree.map(jnp.asarray, convert.params_to_flax(dict(model.named_parameters()), layers))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    labels = {0: {"kernel": "adamw", "bias": "sgd"}, 1: {"kernel": "adamw", "bias": "sgd"}}
    layouts = convert.torch_layout(model, layers, labels=labels)
    tx = optax.multi_transform({"adamw": jax_impl.adamw(1e-2, torch_layout=layouts["adamw"]),
                                "sgd": optax.sgd(1e-2)}, labels)
    new, _ = jax_impl.apply_exact(tx, grads, tx.init(params), params)
    whole = jax_impl.adamw(1e-2, torch_layout=convert.torch_layout(model, layers))
    alone, _ = jax_impl.apply_exact(whole, grads, whole.init(params), params)
    for i in (0, 1):  # the AdamW leaves step as they do without multi_transform, bit for bit
        assert np.array_equal(new[i]["kernel"], alone[i]["kernel"])
    with pytest.raises(ConversionError, match="labels do not have the params' tree structure"):
        convert.torch_layout(model, layers, labels={0: "adamw"})
