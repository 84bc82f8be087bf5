"""Checkpoints: orbax and torch.save round trips continue bit for bit, across frameworks too; misfits are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_impl
from crosscheck import convert
from crosscheck.convert import checkpoint
from crosscheck.convert.checkpoint import CheckpointError
from helpers import continue_in_torch, jax_steps, setup_cnn, torch_steps


def _jax_run(tx, params, state, steps, seed):
    step = jax.jit(lambda g, p, s: jax_impl.apply_exact(tx, g, s, p))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
        params, state = step(grads, params, state)
    return params, state


def _params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "b": jnp.zeros(3, jnp.bfloat16),
            "scale": jnp.ones((), jnp.float32)}


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_orbax_round_trip_continues_bit_for_bit(tmp_path):
    tx = jax_impl.adamw(1e-2, amsgrad=True)
    params, state = _jax_run(tx, _params(), tx.init(_params()), 5, seed=1)
    checkpoint.save_jax(tmp_path / "ckpt", params, state)
    straight = _jax_run(tx, params, state, 5, seed=2)
    restored = checkpoint.restore_jax(tmp_path / "ckpt", *jax.tree.map(jnp.zeros_like, (params, state)))
    assert int(restored[1].count) == 5
    _assert_trees_equal(_jax_run(tx, *restored, 5, seed=2), straight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial directory left


def test_orbax_misfits_are_refused(tmp_path):
    tx = jax_impl.adamw(amsgrad=True)
    params = _params()
    checkpoint.save_jax(tmp_path / "ckpt", params, tx.init(params))
    cases = [({**params, "w": jnp.zeros((5, 4))}, r"\['w'\] has shape \(5, 3\) in the checkpoint, \(5, 4\) running"),
             ({**params, "w": jnp.zeros((5, 3), jnp.float16)}, r"\['w'\] has dtype float32 in the checkpoint, "
                                                               r"float16 running"),
             ({**params, "extra": jnp.zeros(2)}, r"the checkpoint has no \['opt_state'\]\['exp_avg'\]\['extra'\]"),
             ({"w": params["w"], "b": params["b"]}, r"the checkpoint has \['opt_state'\]\['exp_avg'\]\['scale'\], "
                                                    r"which the running state has not")]
    for like, message in cases:
        running = tx.init(like)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.restore_jax(tmp_path / "ckpt", like, running)
        assert not any(x.is_deleted() for x in jax.tree.leaves((like, running)))  # untouched
    with pytest.raises(CheckpointError, match="exists"):
        checkpoint.save_jax(tmp_path / "ckpt", params, tx.init(params))


def test_torch_round_trip_continues_bit_for_bit(tmp_path):
    model, optimizer, _ = setup_cnn(amsgrad=True)
    torch_steps(model, optimizer, 4, 0)
    checkpoint.save_torch(tmp_path / "ckpt.pt", model, optimizer)
    torch_steps(model, optimizer, 4, 4)
    fresh_model, fresh_optimizer, _ = setup_cnn(amsgrad=True)
    checkpoint.restore_torch(tmp_path / "ckpt.pt", fresh_model, fresh_optimizer)
    torch_steps(fresh_model, fresh_optimizer, 4, 4)
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_torch_misfits_are_refused_and_leave_the_state(tmp_path):
    model, optimizer, _ = setup_cnn(amsgrad=False)
    torch_steps(model, optimizer, 2, 0)
    checkpoint.save_torch(tmp_path / "ckpt.pt", model, optimizer)

    def running(change):
        m, o, _ = setup_cnn(amsgrad=False)
        change(m)
        o = torch.optim.AdamW(m.parameters(), fused=True)
        return m, o

    cases = [(lambda m: setattr(m, "fc", torch.nn.Linear(36, 4)), r"model: \['fc.bias'\] has shape \(3,\) in the "
                                                                   r"checkpoint, \(4,\) running"),
             (lambda m: m.double(), r"model: \['bn.bias'\] has dtype float32 in the checkpoint, float64 running"),
             (lambda m: setattr(m, "head", torch.nn.Linear(3, 3)), r"model: the checkpoint has no \['head.bias'\]")]
    for change, message in cases:
        m, o = running(change)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(CheckpointError, match=message):
            checkpoint.restore_torch(tmp_path / "ckpt.pt", m, o)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        assert o.state_dict()["state"] == {}
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad.pt: not a readable torch checkpoint"):
        checkpoint.restore_torch(tmp_path / "bad.pt", model, optimizer)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_cross_framework_checkpoints_keep_the_trajectory(amsgrad, tmp_path):
    """torch checkpoint -> JAX, and orbax checkpoint -> torch: bitwise the run that never switched."""
    k = 5
    model, optimizer, layers = setup_cnn(amsgrad)
    torch_steps(model, optimizer, 2 * k, 0)
    never_switched = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = convert.torch_layout(model, layers)
    tx = jax_impl.adamw(1e-2, weight_decay=0.1, amsgrad=amsgrad, torch_layout=layout)

    # torch checkpoint -> JAX
    model, optimizer, layers = setup_cnn(amsgrad)
    torch_steps(model, optimizer, k, 0)
    checkpoint.save_torch(tmp_path / "torch.pt", model, optimizer)
    saved = torch.load(tmp_path / "torch.pt", weights_only=True)
    names = convert.param_names(model, optimizer)
    params = jax.tree.map(jnp.asarray, convert.params_to_flax(
        {name: saved["model"][name] for name in names}, layers))
    state = convert.torch_optimizer_to_jax(saved["optimizer"], layers, names, params)
    params, _ = jax_steps(model, layers, names, params, state, tx, k, k)
    for name, value in convert.params_to_torch(params, layers, names).items():
        assert torch.equal(value, never_switched[name]), name

    # JAX (orbax) checkpoint -> torch
    model, optimizer, layers = setup_cnn(amsgrad)
    params = jax.tree.map(jnp.asarray, convert.params_to_flax(dict(model.named_parameters()), layers))
    params, state = jax_steps(model, layers, names, params, tx.init(params), tx, k, 0)
    checkpoint.save_jax(tmp_path / "jax", params, state)
    params, state = checkpoint.restore_jax(tmp_path / "jax", params, state)
    continue_in_torch(model, optimizer, layers, names, params, state, k, k)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), never_switched[name]), name
