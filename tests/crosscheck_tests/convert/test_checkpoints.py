"""Checkpoints: orbax and torch.save round trips continue bit for bit, across frameworks too; misfits are refused."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import continue_in_torch, jax_steps, setup_cnn, torch_steps

import jax_impl
from crosscheck import convert
from crosscheck.convert import checkpoint
from crosscheck.convert.checkpoint import CheckpointError


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
    assert int(restored[1][0].count) == 5
    _assert_trees_equal(_jax_run(tx, *restored, 5, seed=2), straight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial directory left


def test_orbax_misfits_are_refused(tmp_path):
    tx = jax_impl.adamw(amsgrad=True)
    params = _params()
    checkpoint.save_jax(tmp_path / "ckpt", params, tx.init(params))
    cases = [({**params, "w": jnp.zeros((5, 4))}, r"\['w'\] has shape \(5, 3\) in the checkpoint, \(5, 4\) running"),
             ({**params, "w": jnp.zeros((5, 3), jnp.float16)}, r"\['w'\] has dtype float32 in the checkpoint, "
                                                               r"float16 running"),
             ({**params, "extra": jnp.zeros(2)}, r"the checkpoint has no \['opt_state'\]\['0'\]\['mu'\]\['extra'\]"),
             ({"w": params["w"], "b": params["b"]}, r"the checkpoint has \['opt_state'\]\['0'\]\['mu'\]\['scale'\], "
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


def _manifest_version(change):
    """Rewrite an orbax checkpoint's manifest with ``change(manifest)`` applied."""
    def rewrite(path):
        manifest = json.loads((path / checkpoint.MANIFEST).read_text())
        change(manifest)
        (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return rewrite


def test_a_format_version_is_written_and_an_unknown_one_is_refused(tmp_path):
    # Was: "format_version": 99 in either manifest loaded silently; nothing wrote a version.
    tx = jax_impl.adamw()
    params = _params()
    checkpoint.save_jax(tmp_path / "j", params, tx.init(params))
    assert json.loads((tmp_path / "j" / checkpoint.MANIFEST).read_text())["format_version"] == 1
    for version in (99, "1", True, None):
        _manifest_version(lambda m: m.update(format_version=version))(tmp_path / "j")
        with pytest.raises(CheckpointError, match=rf"{checkpoint.MANIFEST}: format_version {version!r}, this "
                                                  r"crosscheck reads format_version 1 \(saved by a newer"):
            checkpoint.restore_jax(tmp_path / "j", params, tx.init(params))
    _manifest_version(lambda m: m.pop("format_version"))(tmp_path / "j")  # written before versions: format 1
    checkpoint.restore_jax(tmp_path / "j", params, tx.init(params))

    model, optimizer, _ = setup_cnn(amsgrad=False)
    torch_steps(model, optimizer, 1, 0)
    checkpoint.save_torch(tmp_path / "t.pt", model, optimizer)
    content = torch.load(tmp_path / "t.pt", weights_only=True)
    assert content["manifest"]["format_version"] == 1
    content["manifest"]["format_version"] = 99
    torch.save(content, tmp_path / "t.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"t.pt: manifest: format_version 99, this crosscheck reads "
                                              r"format_version 1"):
        checkpoint.restore_torch(tmp_path / "t.pt", model, optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_torch_into_a_missing_folder_or_onto_a_directory(tmp_path):
    # Was: FileNotFoundError / IsADirectoryError naming the hidden temporary file (.c.pt.h0rmb2gp.partial).
    model, optimizer, _ = setup_cnn(amsgrad=False)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/nope/c.pt: cannot save, the folder {tmp_path}/nope "
                                              r"does not exist \(create it first\)"):
        checkpoint.save_torch(tmp_path / "nope" / "c.pt", model, optimizer)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"the folder .*/file is not a directory"):
        checkpoint.save_torch(tmp_path / "file" / "c.pt", model, optimizer)
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/d is a directory; save_torch writes a file"):
        checkpoint.save_torch(tmp_path / "d", model, optimizer)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "file"]  # nothing half-written
    assert sorted(p.name for p in tmp_path.parent.glob(f".{tmp_path.name}*")) == []


def _nnx_pair(seed: int):
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)), nnx.Linear(4, 2, rngs=nnx.Rngs(seed + 1)))
    return model, nnx.Optimizer(model, jax_impl.adamw(1e-2, amsgrad=True), wrt=nnx.Param)


def _nnx_steps(model, optimizer, steps: int, first: int) -> None:
    from flax import nnx

    for t in range(first, first + steps):
        x = jnp.asarray(np.random.default_rng(t).standard_normal((5, 3)), jnp.float32)
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)


def test_nnx_states_round_trip_both_ways(tmp_path):
    # Was: restore_jax refused the nnx templates it was saved from ("the checkpoint has no
    # ['opt_state']['count'].value (and 12 more)"), while orbax restored that folder.
    from flax import nnx

    model, optimizer = _nnx_pair(0)
    _nnx_steps(model, optimizer, 3, 0)
    checkpoint.save_jax(tmp_path / "nnx", nnx.state(model, nnx.Param), optimizer.opt_state)
    checkpoint.save_jax(tmp_path / "pure", nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                        jax.tree.map(lambda v: v, nnx.as_pure(optimizer.opt_state)))
    _nnx_steps(model, optimizer, 3, 3)
    for saved in ("nnx", "pure"):
        fresh, fresh_optimizer = _nnx_pair(5)
        params, opt_state = checkpoint.restore_jax(tmp_path / saved, nnx.state(fresh, nnx.Param),
                                                   fresh_optimizer.opt_state)
        assert isinstance(params, nnx.State) and isinstance(opt_state[0].mu, nnx.State)
        nnx.update(fresh, params)
        convert.load_nnx_optimizer_state(fresh_optimizer, opt_state)  # also sets the optimizer's step
        assert int(fresh_optimizer.opt_state[0].count.get_value()) == int(fresh_optimizer.step.get_value()) == 3
        _nnx_steps(fresh, fresh_optimizer, 3, 3)
        _assert_trees_equal(nnx.state(fresh, nnx.Param), nnx.state(model, nnx.Param))  # bitwise the run that went on
        # ... and pure templates from an nnx checkpoint.
        pure = checkpoint.restore_jax(tmp_path / saved, nnx.to_pure_dict(nnx.state(fresh, nnx.Param)),
                                      nnx.as_pure(fresh_optimizer.opt_state))
        assert isinstance(pure[0], dict) and int(pure[1][0].count) == 3
    wrong, wrong_optimizer = _nnx_pair(0)
    wrong.layers[1] = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"JAX checkpoint nnx: \['opt_state'\]\['0'\]\['mu'\]\['layers'\]\['1'\]"
                                              r"\['bias'\] has shape \(2,\) in the checkpoint, \(3,\) running"):
        checkpoint.restore_jax(tmp_path / "nnx", nnx.state(wrong, nnx.Param),
                               nnx.Optimizer(wrong, jax_impl.adamw(1e-2, amsgrad=True), wrt=nnx.Param).opt_state)
