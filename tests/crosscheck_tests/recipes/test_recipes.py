"""Training recipes against torch on shared gradients: accumulation, param groups, schedules, mixed precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import run_on_8_cpu_devices
from recipe_helpers import (add_grads, gradients, initial_params, mismatches,
                            to_jax, torch_params)

import jax_impl
from crosscheck.common.metrics import distance
from jax_impl.accumulation import torch_accumulation

LR, WD = 1e-2, 0.1


def run_jax(tx, grads_of_step, steps, params=None):
    params = to_jax(initial_params()) if params is None else params
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for t in range(steps):
        params, state = step(to_jax(grads_of_step(t)), state, params)
    return params, state


def torch_accumulated(k, steps, scale):
    """torch's recipe: (loss / k).backward() k times (.grad written, then added to), step, zero_grad."""
    tparams = torch_params(initial_params())
    optimizer = torch.optim.AdamW(tparams.values(), lr=LR, weight_decay=WD, fused=True)
    for t in range(steps):
        add_grads(tparams, gradients(t, scale))
        if (t + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()
    return tparams


# ---------------------------------------------------------------- accumulation

@pytest.mark.parametrize("k", [3, 4])
def test_torch_accumulation_is_torch_bitwise(k):
    steps = 5 * k
    params, state = run_jax(torch_accumulation(jax_impl.adamw(LR, weight_decay=WD), k),
                            lambda t: gradients(t, 1 / k), steps)
    assert int(state.inner_opt_state[0].count) == 5
    assert mismatches(params, torch_accumulated(k, steps, 1 / k)) == {}


def test_multisteps_mean_is_not_torch_accumulation():
    # Measured (README): MultiSteps' Welford mean of the unscaled gradients parts from the sum of the
    # loss/4 gradients on the first window; 25 windows: max 1.7e-8 absolute, 3.7e-5 relative near zero.
    k, steps = 4, 4 * 25
    params, _ = run_jax(optax.MultiSteps(jax_impl.adamw(LR, weight_decay=WD), k), lambda t: gradients(t), steps)
    tparams = torch_accumulated(k, steps, 1 / k)  # loss / 4: the scaled gradients are exact quarters
    assert mismatches(params, tparams)
    for name, p in tparams.items():
        d = distance(np.asarray(params[name]), p.detach().numpy())
        assert d.max_abs < 5e-8, (name, d)


def test_torch_accumulation_is_the_same_on_every_sharding():
    run_on_8_cpu_devices("recipe_sharded_checks.py")


def test_torch_accumulation_rejects_bad_every_k():
    with pytest.raises(ValueError, match="every_k"):
        torch_accumulation(jax_impl.adamw(), 0)


# ---------------------------------------------------------------- param groups

GROUPS = [{"weight_decay": 0.1},
          {"weight_decay": 0.0, "lr": 3e-2, "eps": 1e-6},
          {"lr": 5e-3, "betas": (0.8, 0.99), "amsgrad": True, "maximize": True}]
LABELS = {"w": 0, "b": 1, "head": 2}


def torch_groups(tparams, groups=GROUPS, labels=LABELS, **defaults):
    return torch.optim.AdamW([{"params": [tparams[k] for k, g in labels.items() if g == i], **group}
                              for i, group in enumerate(groups)], fused=True, **defaults)


def test_param_groups_are_torch_bitwise():
    steps = 15
    tx = jax_impl.param_groups(GROUPS, LABELS, lr=1e-2)
    params, _ = run_jax(tx, gradients, steps)
    tparams = torch_params(initial_params())
    optimizer = torch_groups(tparams, lr=1e-2)
    for t in range(steps):
        for k, p in tparams.items():
            p.grad = torch.from_numpy(gradients(t)[k])
        optimizer.step()
    assert mismatches(params, tparams) == {}


def test_param_group_schedule_is_torch_bitwise():
    # A torch lr scheduler on one group (LambdaLR with a per-group lambda) = a TorchSchedule for that group.
    steps = 12
    schedule = jax_impl.schedules.step_lr(3e-2, step_size=4, gamma=0.5)
    groups = [{"weight_decay": 0.1}, {"lr": schedule}, {"lr": 5e-3, "amsgrad": True}]
    params, _ = run_jax(jax_impl.param_groups(groups, LABELS, lr=1e-2), gradients, steps)
    tparams = torch_params(initial_params())
    optimizer = torch_groups(tparams, [{"weight_decay": 0.1}, {"lr": 3e-2}, {"lr": 5e-3, "amsgrad": True}], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda e: 1.0, lambda e: 0.5 ** (e // 4), lambda e: 1.0])
    for t in range(steps):
        for k, p in tparams.items():
            p.grad = torch.from_numpy(gradients(t)[k])
        optimizer.step()
        scheduler.step()
    assert mismatches(params, tparams) == {}


def test_add_param_group_mid_run_is_torch_bitwise():
    first, later = {"w": 0, "b": 1}, {"w": 0, "b": 1, "head": 2}
    groups = GROUPS[:2]
    init = initial_params()
    params = to_jax({k: init[k] for k in first})
    tx = jax_impl.param_groups(groups, first, lr=1e-2)
    state = tx.init(params)
    tparams = torch_params(init)
    optimizer = torch_groups(tparams, groups, first, lr=1e-2)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for t in range(10):
        if t == 5:
            optimizer.add_param_group({"params": [tparams["head"]], **GROUPS[2]})
            params = {**params, "head": jnp.asarray(init["head"])}
            tx, state = jax_impl.add_param_group(groups, later, state, params, GROUPS[2], lr=1e-2)
            step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
        grads = {k: v for k, v in gradients(t).items() if k in params}
        params, state = step(to_jax(grads), state, params)
        for k, p in tparams.items():
            p.grad = torch.from_numpy(gradients(t)[k]) if k in grads else None
        optimizer.step()
    assert mismatches(params, tparams) == {}
    assert [int(s.inner_state[0].count) for s in state.inner_states.values()] == [10, 10, 5]


def test_param_groups_state_converts_both_ways():
    from helpers import TorchCNN, shared_gradient

    from crosscheck import convert

    torch.manual_seed(0)
    model = TorchCNN()
    layers = convert.layers_of(model, flatten_from={"fc": (4, 3, 3)})
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    groups = [{"weight_decay": 0.1}, {"weight_decay": 0.0, "lr": 3e-2, "amsgrad": True}]
    optimizer = torch.optim.AdamW([{"params": decay, **groups[0]}, {"params": rest, **groups[1]}], lr=1e-2,
                                  fused=True)
    for t in range(3):
        shared_gradient(model, t)
        optimizer.step()
    names = convert.param_names(model, optimizer)
    params = convert.params_to_flax({n: p.detach() for n, p in model.named_parameters()}, layers)
    params = jax.tree.map(jnp.asarray, params)
    labels = jax.tree.map(lambda x: 0 if x.ndim > 1 else 1, params)
    tx = jax_impl.param_groups(groups, labels, lr=1e-2)
    state = convert.torch_optimizer_groups_to_jax(optimizer.state_dict(), layers, names, tx, params)
    assert [int(s.inner_state[0].count) for s in state.inner_states.values()] == [3, 3]
    back = convert.jax_optimizer_groups_to_torch(state, layers, names, optimizer.state_dict()["param_groups"])
    original = optimizer.state_dict()
    assert set(back["state"]) == set(original["state"])
    for i, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][i][key], value), (i, key)


# ---------------------------------------------------------------- optax schedules

def _torch_driven_by(values, steps):
    tparams = torch_params(initial_params())
    optimizer = torch.optim.AdamW(tparams.values(), lr=float(values[0]), weight_decay=WD, fused=True)
    for t in range(steps):
        optimizer.param_groups[0]["lr"] = float(values[t])
        for k, p in tparams.items():
            p.grad = torch.from_numpy(gradients(t)[k])
        optimizer.step()
    return tparams


def test_tabulated_optax_schedule_is_torch_bitwise_and_the_direct_one_is_not():
    from jax_impl.optax_schedules import tabulate

    steps = 30
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-2, warmup_steps=5, decay_steps=steps, end_value=1e-3)
    table = tabulate(schedule, steps)
    exact, _ = run_jax(jax_impl.adamw(table, weight_decay=WD), gradients, steps)
    assert mismatches(exact, _torch_driven_by(table.table, steps)) == {}
    # torch code reading float(schedule(t)) op by op: eager=True tabulates those floats.
    tparams = _torch_driven_by([float(schedule(t)) for t in range(steps)], steps)
    exact, _ = run_jax(jax_impl.adamw(tabulate(schedule, steps, eager=True), weight_decay=WD), gradients, steps)
    assert mismatches(exact, tparams) == {}
    direct, _ = run_jax(jax_impl.adamw(schedule, weight_decay=WD), gradients, steps)
    # The direct schedule rounds -lr/bc1 twice in float32: measured (README) a few ulps on some elements.
    assert mismatches(direct, tparams)
    for k, p in tparams.items():
        assert distance(np.asarray(direct[k]), p.detach().numpy()).max_rel < 1e-5


def test_tabulate_rejects_bad_horizon():
    from jax_impl.optax_schedules import tabulate

    with pytest.raises(ValueError, match="horizon"):
        tabulate(optax.constant_schedule(1e-3), 0)


# ---------------------------------------------------------------- mixed precision

def test_autocast_recipe_shared_gradients_are_torch_bitwise():
    # torch: float32 model under autocast(bfloat16); nnx: param_dtype=float32, dtype=bfloat16.  The optimizer
    # sees float32 master weights and float32 gradients in both (autocast's backward casts up): shared, bitwise.
    from flax import nnx

    torch.manual_seed(0)
    # An (8, 4) kernel: a multiple of torch's 8-float vector, so transposing it moves no scalar-tail element.
    torch_model = torch.nn.Linear(8, 4)
    flax_model = nnx.Linear(8, 4, param_dtype=jnp.float32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    flax_model.kernel[...] = jnp.asarray(torch_model.weight.detach().numpy().T)
    flax_model.bias[...] = jnp.asarray(torch_model.bias.detach().numpy())
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=LR, weight_decay=WD, fused=True)
    nnx_optimizer = jax_impl.ExactOptimizer(flax_model, jax_impl.adamw(LR, weight_decay=WD), wrt=nnx.Param)
    x_all = np.random.default_rng(0).standard_normal((6, 5, 8)).astype(np.float32)
    for x in x_all:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch_model(torch.from_numpy(x))
        assert y.dtype == torch.bfloat16
        optimizer.zero_grad()
        y.float().square().mean().backward()
        assert torch_model.weight.grad.dtype == torch.float32
        grads = nnx.State({"kernel": nnx.Param(jnp.asarray(torch_model.weight.grad.numpy().T)),
                           "bias": nnx.Param(jnp.asarray(torch_model.bias.grad.numpy()))})
        optimizer.step()
        nnx_optimizer.update(flax_model, grads)
        assert flax_model(jnp.asarray(x)).dtype == jnp.bfloat16
    assert mismatches({"w": np.asarray(flax_model.kernel[...]).T, "b": flax_model.bias[...]},
                      {"w": torch_model.weight, "b": torch_model.bias}) == {}


def test_bfloat16_gradients_for_float32_params_are_cast_as_torch_does():
    """torch refuses a .grad of another dtype, so its user casts bfloat16 gradients up; so does the exact path."""
    steps = 8
    bf16 = lambda t: {k: jnp.asarray(v, jnp.bfloat16) for k, v in gradients(t).items()}  # noqa: E731
    with pytest.raises(RuntimeError, match="has dtype bfloat16, the parameter has dtype float32"):
        run_jax(jax_impl.adamw(LR, weight_decay=WD), bf16, 1)
    cast_up = lambda t: {k: g.astype(jnp.float32) for k, g in bf16(t).items()}  # noqa: E731
    params, _ = run_jax(jax_impl.adamw(LR, weight_decay=WD), cast_up, steps)
    tparams = torch_params(initial_params())
    optimizer = torch.optim.AdamW(tparams.values(), lr=LR, weight_decay=WD, fused=True)
    for t in range(steps):
        for k, p in tparams.items():
            p.grad = torch.from_numpy(gradients(t)[k]).bfloat16().float()
        optimizer.step()
    assert mismatches(params, tparams) == {}


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_twin_skips_the_steps_torch_skips(unscale_first):
    from jax_impl import clipping
    from jax_impl.loss_scale import grad_scaler

    steps, bad = 14, {2, 3, 9}
    adamw = jax_impl.adamw(LR, weight_decay=WD)
    inner = optax.chain(clipping.clip_grad_norm(1.0, order=[2, 0, 1]), adamw) if unscale_first else adamw
    tx = grad_scaler(inner, init_scale=2.0 ** 10, growth_interval=3, unscale_first=unscale_first)
    params = to_jax(initial_params())
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    tparams = torch_params(initial_params())
    optimizer = torch.optim.AdamW(tparams.values(), lr=LR, weight_decay=WD, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    scaler.scale(torch.ones(()))  # creates the scale, as scaler.scale(loss) does
    scales = []
    for t in range(steps):
        assert float(state.scale) == scaler.get_scale()
        scales.append(scaler.get_scale())
        scaled = {k: v * np.float32(scaler.get_scale()) for k, v in gradients(t).items()}  # d(loss * scale)
        if t in bad:
            scaled["w"][1, 2] = np.inf
        params, state = step(to_jax(scaled), state, params)
        for k, p in tparams.items():
            p.grad = torch.from_numpy(scaled[k].copy())
        if unscale_first:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([tparams[k] for k in ("head", "w", "b")], 1.0)
        scaler.step(optimizer)
        scaler.update()
        assert bool(state.found_inf) == (t in bad)
    assert len(set(scales)) > 2  # the scale backed off and grew
    assert int(state.inner_opt_state[-1][0].count if unscale_first else state.inner_opt_state[0].count) == steps - len(bad)
    assert mismatches(params, tparams) == {}


# ---------------------------------------------------------------- the measuring command

def test_recipes_command_rejects_bad_steps(tmp_path):
    from crosscheck.cli import main

    assert main(["--out", str(tmp_path), "recipes", "--steps", "0"]) == 2


@pytest.mark.slow
def test_recipes_command_passes_and_writes_its_report(tmp_path):
    import json

    from crosscheck.cli import main

    assert main(["--out", str(tmp_path), "recipes", "--steps", "10"]) == 0
    rows = json.loads((tmp_path / "report.json").read_text())
    assert all(r["bitwise"] for r in rows if r["expected_exact"])
    assert (tmp_path / "report.md").exists() and (tmp_path / "recipes.png").exists()
