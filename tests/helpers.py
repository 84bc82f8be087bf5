"""Shared test helpers: drive two implementations with one gradient stream and compare bits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jax_impl
from crosscheck import convert
from crosscheck.trajectory import implementations
from crosscheck.trajectory import sources
from crosscheck.common.metrics import distance

# Shapes that exercise torch's kernel layout: 0-d, empty, shorter than one
# vector, vectors plus a scalar tail, exact multiples, conv-like 4-d.
SHAPES = [(), (0,), (1,), (7,), (9,), (16,), (33,), (4, 3, 3, 3), (3, 5, 7)]

# One table of optimizer options for every parity test (a new option is one line).
OPTIONS = {
    "default": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "weight_decay=0": {"weight_decay": 0.0},
    "weight_decay=0.1": {"weight_decay": 0.1},
    "large lr and eps": {"lr": 0.1, "eps": 1e-3},
    "b1 >= 0.5 lerp branch": {"b1": 0.3, "b2": 0.6},
    "mask": {"decay_mask": (True, False) * 4 + (True,)},
    "amsgrad+maximize+mask": {"amsgrad": True, "maximize": True, "decay_mask": (False, True) * 4 + (False,)},
}


def initial_params(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def run_pair(impl: str, baseline: str, hyper: implementations.Hyper, steps: int, *,
             shapes=SHAPES, grads: str = "gaussian", check_every: int = 0):
    """Run both for ``steps`` steps on the same gradients; return [(step, leaf, quantity, Distance)] mismatches."""
    params = initial_params(shapes)
    a = implementations.make(impl, hyper, params)
    b = implementations.make(baseline, hyper, params)
    source = sources.synthetic(grads)
    mismatches = []
    for t in range(steps):
        g = source(t, params)
        a.step(g)
        b.step(g)
        if (check_every and (t + 1) % check_every == 0) or t + 1 == steps:
            mismatches += compare(a, b, t + 1)
            if mismatches:
                break
    return mismatches


def compare(a, b, step):
    out = []
    (pa, ma, va), (pb, mb, vb) = (a.params(), *a.moments()), (b.params(), *b.moments())
    for quantity, xs, ys in (("param", pa, pb), ("exp_avg", ma, mb), ("exp_avg_sq", va, vb)):
        for leaf, (x, y) in enumerate(zip(xs, ys)):
            d = distance(x, y)
            if d.first_mismatch >= 0:
                out.append((step, leaf, quantity, d))
    return out


# A small CNN with an NCHW flatten, for conversion, resume and checkpoint tests.

class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))  # NCHW flatten


def shared_gradient(model: torch.nn.Module, step: int) -> None:
    """d loss / d params of ``model`` on seeded batch ``step``, into ``.grad`` (the data both runs see)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 2, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def setup_cnn(amsgrad: bool, cls=torch.optim.AdamW):
    torch.manual_seed(0)
    model = TorchCNN()
    optimizer = cls(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, fused=True)
    layers = convert.layers_of(model, flatten_from={"fc": (4, 3, 3)})
    return model, optimizer, layers


def torch_steps(model, optimizer, steps, first):
    for t in range(first, first + steps):
        shared_gradient(model, t)
        optimizer.step()


def jax_steps(model, layers, names, params, state, tx, steps, first):
    """jax_impl steps on gradients torch computes at the JAX params (converted back to torch's layout)."""
    step = jax.jit(lambda g, s, p: jax_impl.apply_exact(tx, g, s, p))
    for t in range(first, first + steps):
        with torch.no_grad():
            for name, value in convert.params_to_torch(params, layers, names).items():
                model.get_parameter(name).copy_(value)
        shared_gradient(model, t)
        grads = convert.params_to_flax({n: p.grad for n, p in model.named_parameters()}, layers)
        params, state = step(jax.tree.map(jnp.asarray, grads), state, params)
    return params, state


def continue_in_torch(model, optimizer, layers, names, params, state, steps, first):
    """Load JAX params and jax_impl state into the torch model and optimizer, then take torch steps."""
    with torch.no_grad():
        for name, value in convert.params_to_torch(params, layers, names).items():
            model.get_parameter(name).copy_(value)
    optimizer.load_state_dict(convert.jax_optimizer_to_torch(state, layers, names,
                                                             optimizer.state_dict()["param_groups"]))
    torch_steps(model, optimizer, steps, first)


def run_on_8_cpu_devices(script: str) -> None:
    """Run ``tests/<script>`` in a process whose JAX has 8 host CPU devices; its output printed, a failure shown."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    path = Path(__file__).with_name(script)
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=path.parents[1])
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
