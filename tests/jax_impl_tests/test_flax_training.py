"""jax_impl.adamw in Flax training loops: the name-based decay mask equals torch's param groups, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen, nnx
from flax.training import train_state

import jax_impl
from crosscheck import convert
from crosscheck.common.metrics import distance
from helpers import TorchCNN, shared_gradient


class NnxCNN(nnx.Module):
    """The parameters of helpers.TorchCNN in Flax (gradients come from torch here)."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(36, 3, rngs=rngs)


def _torch_param_groups(model: torch.nn.Module, weight_decay: float):
    """The usual torch recipe: no weight decay on biases and normalization weights."""
    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm)
    no_decay = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]


def test_mask_by_name_equals_torch_param_groups_in_nnx_optimizer():
    torch.manual_seed(0)
    model = TorchCNN()
    layers = convert.layers_of(model, flatten_from={"fc": (4, 3, 3)})
    optimizer = torch.optim.AdamW(_torch_param_groups(model, 0.5), lr=1e-2, fused=True)
    names = [n for n, _ in model.named_parameters()]

    runs = {}
    for label, mask in (("mask", jax_impl.decay_mask_by_name()), ("no mask", None)):
        flax_model = NnxCNN(nnx.Rngs(0))
        nnx.update(flax_model, convert.torch_to_nnx(model.state_dict(), layers, flax_model))
        tx = jax_impl.adamw(1e-2, weight_decay=0.5, mask=mask,
                            torch_layout=nnx.State(convert.torch_layout(model, layers)))
        runs[label] = (flax_model, jax_impl.ExactOptimizer(flax_model, tx, wrt=nnx.Param))
    assert jax_impl.decay_mask_by_name()(nnx.to_pure_dict(nnx.state(runs["mask"][0], nnx.Param))) == {
        "bn": {"bias": False, "scale": False}, "conv": {"bias": False, "kernel": True},
        "fc": {"bias": False, "kernel": True}}

    @nnx.jit
    def update(flax_optimizer, flax_model, grads):
        flax_optimizer.update(flax_model, grads)

    worst = {label: 0 for label in runs}
    for step in range(30):
        shared_gradient(model, step)  # torch's gradients at torch's params (equal to the Flax params)
        grads = convert.params_to_flax({n: p.grad for n, p in model.named_parameters()}, layers)
        optimizer.step()
        for label, (flax_model, flax_optimizer) in runs.items():
            grad_state = nnx.state(flax_model, nnx.Param)
            nnx.replace_by_pure_dict(grad_state, jax.tree.map(jnp.asarray, grads))
            update(flax_optimizer, flax_model, grad_state)
            params = convert.params_to_torch(nnx.state(flax_model, nnx.Param), layers, names)
            worst[label] = max(worst[label], max(int(distance(params[n].numpy(), p.detach().numpy()).max_ulps)
                                                 for n, p in model.named_parameters()))
    assert worst["mask"] == 0, worst
    assert worst["no mask"] > 0  # decaying biases and scales too is a different trajectory


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.LayerNorm()(linen.relu(linen.Dense(16)(x)))
        return linen.Dense(1)(x)


def test_train_state_with_mask_by_name():
    model = LinenMLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    tx = jax_impl.adamw(1e-2, weight_decay=0.1, mask=jax_impl.decay_mask_by_name())
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    assert jax_impl.decay_mask_by_name()(params) == {"Dense_0": {"bias": False, "kernel": True},
                                                     "Dense_1": {"bias": False, "kernel": True},
                                                     "LayerNorm_0": {"bias": False, "scale": False}}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    y = x.sum(axis=1, keepdims=True)

    @jax.jit
    def train_step(state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2))(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(200):
        state, loss = train_step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.05 * losses[0]
    assert int(state.opt_state[0].count) == 200
