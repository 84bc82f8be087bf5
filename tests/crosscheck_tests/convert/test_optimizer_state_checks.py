"""AdamW state converters refuse a step count or moment dtype they would change (issue item 9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from helpers import setup_cnn, torch_steps

import jax_impl
from crosscheck import convert
from crosscheck.convert import ConversionError


@pytest.fixture(scope="module")
def trained():
    model, optimizer, layers = setup_cnn(amsgrad=False)
    torch_steps(model, optimizer, 2, 0)
    names = convert.param_names(model, optimizer)
    return model, optimizer, layers, names, convert.params_to_flax(dict(model.named_parameters()), layers)


def _with(state_dict: dict, **entries) -> dict:
    """The state dict with every parameter's entries replaced (a function of the old value, or a value)."""
    return {"param_groups": state_dict["param_groups"],
            "state": {i: {**s, **{k: v(s[k]) if callable(v) else v for k, v in entries.items()}}
                      for i, s in state_dict["state"].items()}}


@pytest.mark.parametrize("step, shown", [
    (torch.tensor(-3.0), r"-3\.0"),  # was: count -3
    (torch.tensor(1.7), r"1\.700000047\d*"),
    (1.7, r"1\.7"),
    (torch.tensor(3e9), r"3000000000\.0"),  # was: OverflowError: Python integer 3000000000 out of bounds for int32
    (torch.tensor(float("inf")), "inf"),
    (torch.tensor(float("nan")), "nan"),
    (torch.tensor([2.0, 2.0]), r"a tensor of shape \(2,\)"),
])
def test_a_step_that_is_no_count_is_refused(trained, step, shown):
    _, optimizer, layers, names, params = trained
    with pytest.raises(ConversionError, match=rf"optimizer state: parameter 0 \('conv.weight'\): step {shown} is "
                                              r"not a whole number in 0\.\.2147483647"):
        convert.torch_optimizer_to_jax(_with(optimizer.state_dict(), step=step), layers, names, params)


def test_the_largest_int32_step_converts(trained):
    _, optimizer, layers, names, params = trained
    big = float(2 ** 31 - 128)  # a float32 torch can hold, inside int32
    state = convert.torch_optimizer_to_jax(_with(optimizer.state_dict(), step=torch.tensor(big)), layers, names,
                                           params)
    assert int(state[0].count) == big and state[0].count.dtype == jnp.int32


def test_a_moment_of_another_dtype_is_refused(trained):
    # Was: a float64 exp_avg for float32 params became float32 silently (with or without params given).
    _, optimizer, layers, names, params = trained
    doubled = _with(optimizer.state_dict(), exp_avg=lambda t: t.double())
    with pytest.raises(ConversionError, match=r"optimizer state exp_avg: conv/kernel is float64, the target holds "
                                              r"float32; converting would round it"):
        convert.torch_optimizer_to_jax(doubled, layers, names, params)
    with pytest.raises(ConversionError, match=r"optimizer state exp_avg: conv/kernel is float64, the target holds "
                                              r"float32"):
        convert.torch_optimizer_to_jax(doubled, layers, names)  # without params: what jnp.asarray would narrow
    state = convert.torch_optimizer_to_jax(doubled, layers, names, params, allow_dtype_change=True)
    assert {x.dtype for x in jax.tree.leaves(state[0].mu)} == {jnp.dtype(jnp.float32)}
    halved = _with(optimizer.state_dict(), exp_avg_sq=lambda t: t.to(torch.bfloat16))
    with pytest.raises(ConversionError, match=r"optimizer state exp_avg_sq: conv/kernel is bfloat16, the target "
                                              r"holds float32"):
        convert.torch_optimizer_to_jax(halved, layers, names, params)


@pytest.mark.parametrize("count, shown", [(-3, "-3"), (1.7, r"1\.7"), (2 ** 40, "1099511627776")])
def test_jax_counts_that_are_no_step_are_refused(trained, count, shown, x64):
    # Was: jax_optimizer_to_torch wrote step -3.0, and 1 for 1.7 (int() of it); load_nnx_optimizer_state cast too.
    model, optimizer, layers, names, params = trained
    state = convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params)
    bad = (state[0]._replace(count=jnp.asarray(count)), *state[1:])
    with pytest.raises(ConversionError, match=rf"state\[0\]\.count\) {shown} is not a whole number in "
                                              r"0\.\.2147483647"):
        convert.jax_optimizer_to_torch(bad, layers, names, optimizer.state_dict()["param_groups"])
    flax_model = nnx.Module()
    flax_model.conv = nnx.Conv(2, 4, (3, 3), padding=1, rngs=nnx.Rngs(0))
    flax_model.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    flax_model.fc = nnx.Linear(36, 3, rngs=nnx.Rngs(0))
    nnx_optimizer = nnx.Optimizer(flax_model, jax_impl.adamw(1e-2), wrt=nnx.Param)
    with pytest.raises(ConversionError, match=rf"state\[0\]\.count\) {shown} is not a whole number"):
        convert.load_nnx_optimizer_state(nnx_optimizer, bad)
    assert int(nnx_optimizer.opt_state[0].count.get_value()) == 0  # untouched
    np.testing.assert_array_equal(nnx_optimizer.opt_state[0].mu["fc"]["bias"].get_value(), np.zeros(3))


def test_state_takes_the_layout_of_like_and_sets_the_schedule_count(trained):
    """torch_optimizer_to_jax builds optax.adamw's tree; like= gives a schedule's / a mask's layout, every
    count at torch's step (the schedule reads its own); load_nnx_optimizer_state sets the schedule's too."""
    _, optimizer, layers, names, params = trained
    params = jax.tree.map(jnp.asarray, params)
    plain = convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params)
    assert jax.tree.structure(plain) == jax.tree.structure(optax.adamw(1e-2).init(params))
    tx = jax_impl.adamw(optax.linear_schedule(1e-2, 1e-3, 10), mask=jax.tree.map(lambda x: x.ndim > 1, params))
    state = convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params, like=tx.init(params))
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    assert int(state[0].count) == int(state[2].count) == 2
    jax.tree.map(np.testing.assert_array_equal, state[0], plain[0])
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)  # the layout update expects
    with pytest.raises(ConversionError, match="amsgrad differs"):
        convert.torch_optimizer_to_jax(optimizer.state_dict(), layers, names, params,
                                       like=jax_impl.adamw(amsgrad=True).init(params))

    flax_model = nnx.Module()
    flax_model.conv = nnx.Conv(2, 4, (3, 3), padding=1, rngs=nnx.Rngs(0))
    flax_model.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    flax_model.fc = nnx.Linear(36, 3, rngs=nnx.Rngs(0))
    nnx_optimizer = nnx.Optimizer(flax_model, jax_impl.adamw(optax.linear_schedule(1e-2, 1e-3, 10)), wrt=nnx.Param)
    convert.load_nnx_optimizer_state(nnx_optimizer, plain)
    assert int(nnx_optimizer.opt_state[0].count.get_value()) == int(nnx_optimizer.opt_state[2].count.get_value()) == 2
