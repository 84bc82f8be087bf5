"""The port checks on real third-party models (HF GPT-2, ViT, ResNet; a nanoGPT-style GPT; a linen ResNet via
nnx.bridge.ToNNX), each against a Flax port written the natural way: correct ports pass, every planted
pitfall fails and is named at its module with its cause.  Models and pitfalls: third_party.py."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
tp = pytest.importorskip("third_party")

from crosscheck import assert_trajectories_match, locate_divergence  # noqa: E402
from crosscheck.port import compare, locate  # noqa: E402

warnings.filterwarnings("ignore", message=".*token_id.*")

FAST: set = set()  # each case takes 10-60 s (eager dispatch of every op once, three float64 runs)
CASES = [pytest.param(model, pitfall, module, id=f"{model}-{pitfall}",
                      marks=() if (model, pitfall) in FAST else pytest.mark.slow)
         for model, pitfalls in tp.PITFALLS.items() for pitfall, module in pitfalls.items()]


@pytest.mark.parametrize("model, pitfall, module", CASES)
def test_the_locator_names_each_pitfall_at_its_module(model, pitfall, module):
    c = tp.case(model, pitfall)
    result = locate_divergence(c.torch_model, c.flax_model, c.batch(0), layers=c.layers)
    print(result)
    assert (result.first, result.cause) == (module, pitfall), str(result)


@pytest.mark.slow
@pytest.mark.parametrize("model", list(tp.MODELS))
def test_a_correct_port_has_no_divergence_and_every_submodule_is_compared(model):
    c = tp.case(model)
    result = locate_divergence(c.torch_model, c.flax_model, c.batch(0), layers=c.layers)
    assert result.ok, str(result)
    names = {m.name for m in result.modules}
    # containers and code-defined modules are compared, not only the layers with weights
    want = {"hf_gpt2": {"transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.0.attn.c_attn",
                        "transformer.h.1", "(output)"},
            "nanogpt": {"transformer.h.0.ln_1", "transformer.h.0.attn", "transformer.h.1.mlp", "(output)"},
            "hf_vit": {"vit.layers.0.attention", "vit.embeddings", "vit", "(output)"},
            "hf_resnet_linen": {"resnet.encoder.stages.1.layers.0", "resnet.embedder.embedder.normalization",
                                "classifier", "(output)"}}[model]
    assert want <= names, sorted(names)


def test_locate_takes_a_model_output_and_a_tuple():
    """HF returns a ModelOutput, nanoGPT (logits, loss): the default selector takes .logits / the first array."""
    c = tp.case("nanogpt")
    logits, loss = c.torch_model(torch.zeros(2, 4, dtype=torch.long))
    assert compare.select_output((logits, loss)) is logits
    hf = tp.case("hf_gpt2").torch_model(torch.zeros(2, 4, dtype=torch.long))
    assert compare.select_output(hf) is hf.logits and compare.select_output(hf, "logits") is hf.logits
    assert compare.select_output({"a": None, "b": (logits,)}) is logits
    assert compare.select_output((loss, logits), 1) is logits
    with pytest.raises(TypeError, match="holds no array; pass output="):
        compare.select_output({"a": None})


def test_a_bare_linen_module_is_refused_with_the_wrapping_recipe():
    c = tp.case("nanogpt")
    for check in (lambda m: locate_divergence(c.torch_model, m, c.batch(0), layers=c.layers),
                  lambda m: assert_trajectories_match(c.torch_model, m, c.batches(), layers=c.layers, steps=1)):
        with pytest.raises(TypeError, match=r"flax_model is a linen module \(LinenResNet\).*nnx.bridge.ToNNX"):
            check(tp.LinenResNet())


def test_the_epsilon_of_a_layernorm_of_its_own_is_measured():
    rng = np.random.default_rng(0)
    x = 0.01 * rng.standard_normal((6, 16))
    w, b = rng.uniform(0.5, 1.5, 16), rng.standard_normal(16)
    for eps in (1e-5, 1e-6):
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b
        assert locate.layernorm_eps(x, y, w, b) == pytest.approx(eps, rel=1e-3)
    assert locate.layernorm_eps(x, np.tanh(x), w, b) is None  # not a LayerNorm


def test_stats_messages_tell_momentum_from_the_biased_variance():
    torch_stats = {"bn/mean": np.full(4, 0.1), "bn/var": np.full(4, 1.0)}
    momentum = locate.stats_cause("bn/var", {"bn/mean": np.full(4, 0.9), "bn/var": np.full(4, 1.0)}, torch_stats)
    assert "off by 8x its scale: the momentum signature [momentum]" in momentum
    biased = locate.stats_cause("bn/var", {"bn/mean": np.full(4, 0.1), "bn/var": np.full(4, 0.9999)}, torch_stats)
    assert "biased batch variance" in biased and "momentum" not in biased


@pytest.mark.slow
@pytest.mark.parametrize("model", list(tp.MODELS))
def test_a_correct_port_passes_ten_steps_in_its_rounding_bands(model):
    c = tp.case(model)
    report = assert_trajectories_match(c.torch_model, c.flax_model, c.batches(), layers=c.layers, steps=10,
                                       **c.options)
    print(report)
    assert len(report.steps) == 10 and 0 < report.logit_gap <= report.logit_band


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hf_gpt2", "nanogpt", "hf_vit"])
def test_the_gelu_variant_fails_the_parity_check_and_says_where(model):
    c = tp.case(model, "gelu")
    with pytest.raises(AssertionError) as err:
        assert_trajectories_match(c.torch_model, c.flax_model, c.batches(), layers=c.layers, steps=10)
    text = str(err.value)
    assert "x their rounding band" in text and "the weight conversion is wrong" not in text, text
    assert "the port's code computes something else" in text
    assert text.rstrip().splitlines()[-1].startswith(f"where: first divergence at '{tp.PITFALLS[model]['gelu']}'")
    assert "[gelu]" in text.splitlines()[-1]


@pytest.mark.slow
def test_a_conv1d_weight_converted_as_a_linear_blames_the_conversion():
    c = tp.case("hf_gpt2", "layout")
    with pytest.raises(AssertionError, match=r"(?s)logits differ by .*x their rounding band.*the weight conversion "
                                             r"is wrong.*where: first divergence at 'transformer.h.0.attn.c_proj'.*"
                                             r"\[layout\].*torch stores it \(in, out\), like HF's Conv1D"):
        assert_trajectories_match(c.torch_model, c.flax_model, c.batches(), layers=c.layers, steps=2)


@pytest.mark.slow
def test_linen_batchnorm_momentum_is_named_by_its_signature():
    c = tp.case("hf_resnet_linen", "momentum")
    with pytest.raises(AssertionError, match=r"(?s)batch statistics [\w/]+/normalization/\w+ differ.*"
                                             r"/mean is off by [\d.]+x its scale: the momentum signature.*"
                                             r"where: first divergence at 'resnet.embedder.embedder.normalization'"
                                             r".*\[momentum\]"):
        assert_trajectories_match(c.torch_model, c.flax_model, c.batches(), layers=c.layers, steps=2, **c.options)
