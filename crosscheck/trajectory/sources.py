"""Parameter sets, gradient streams and lr schedules for trajectory checks, all seeded."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

GradientSource = Callable[[int, Sequence[np.ndarray]], list[np.ndarray]]


def param_set(name: str, seed: int = 0) -> tuple[list[str], list[np.ndarray]]:
    """Named leaves (pytree paths) and their float64 initial values."""
    rng = np.random.default_rng(seed)
    if name == "flat":
        shapes = {"w": (4099,)}  # 4099 = 512 vectors of 8 + a 3-element scalar tail
    elif name == "cnn":
        shapes = {}
        channels = [3, 16, 32, 32, 64, 64, 128]
        for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
            shapes[f"conv{i}/kernel"] = (cout, cin, 3, 3)
            shapes[f"conv{i}/bias"] = (cout,)
            shapes[f"bn{i}/scale"] = (cout,)
            shapes[f"bn{i}/bias"] = (cout,)
        shapes["head/kernel"] = (10, 128)
        shapes["head/bias"] = (10,)
        shapes["temperature"] = ()
    elif name == "transformer":
        shapes = {"embed": (97, 32)}
        for layer in range(24):
            pre = f"layer{layer}"
            shapes.update({f"{pre}/ln1/scale": (32,), f"{pre}/ln1/bias": (32,),
                           f"{pre}/attn/qkv/kernel": (96, 32), f"{pre}/attn/qkv/bias": (96,),
                           f"{pre}/attn/out/kernel": (32, 32), f"{pre}/attn/out/bias": (32,),
                           f"{pre}/ln2/scale": (32,), f"{pre}/ln2/bias": (32,),
                           f"{pre}/mlp/up/kernel": (64, 32), f"{pre}/mlp/up/bias": (64,),
                           f"{pre}/mlp/down/kernel": (32, 64), f"{pre}/mlp/down/bias": (32,)})
        shapes["final_ln/scale"] = (32,)
        shapes["logit_scale"] = ()
        shapes["empty"] = (0,)
    else:
        raise ValueError(f"unknown parameter set {name!r}; choose from {PARAM_SETS}")
    names = list(shapes)
    values = []
    for n in names:
        scale = 1.0 if n.endswith("scale") or n == "temperature" else 0.1
        values.append(rng.standard_normal(shapes[n]) * scale + (1.0 if n.endswith("scale") else 0.0))
    return names, values


PARAM_SETS = ("flat", "cnn", "transformer")


def no_decay_mask(names: Sequence[str]) -> tuple[bool, ...]:
    """Decay kernels and embeddings; not biases, norm scales or 0-d leaves (the usual param groups)."""
    return tuple(not (n.endswith("bias") or n.endswith("scale") or n in ("temperature", "empty")) for n in names)


def synthetic(kind: str, seed: int = 0) -> GradientSource:
    """A seeded gradient stream; step ``t`` always gives the same gradients."""
    if kind not in SYNTHETIC:
        raise ValueError(f"unknown gradient source {kind!r}; choose from {SYNTHETIC + ('model',)}")

    def grads(t: int, params: Sequence[np.ndarray]) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, t])
        out = []
        for p in params:
            shape = np.shape(p)
            if kind == "gaussian":
                g = rng.standard_normal(shape)
            elif kind == "heavy-tailed":
                g = rng.standard_t(1.5, shape)
            elif kind == "sparse":
                # Exact zeros everywhere, and whole stretches of steps with no gradient at all.
                g = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
                if (t // 50) % 2 == 1:
                    g = np.zeros(shape)
            elif kind == "dynamic-range":
                g = rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-8, 4, shape)
            elif kind == "sign-flip":
                base = np.random.default_rng([seed, 10**6]).standard_normal(shape)
                g = base * (1.0 if t % 2 == 0 else -1.0) * (1 + 0.01 * rng.standard_normal(shape))
            out.append(g)
        return out

    return grads


SYNTHETIC = ("gaussian", "heavy-tailed", "sparse", "dynamic-range", "sign-flip")


@dataclass(frozen=True)
class CosineSchedule:
    """torch's CosineAnnealingLR closed form: lr of step ``t`` (0-based), as a Python double."""

    lr: float
    num_steps: int
    eta_min: float = 0.0

    def __call__(self, t: int) -> float:
        t = min(t, self.num_steps)
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * t / self.num_steps)) / 2


def model_gradients(seed: int = 0):
    """A small PyTorch CNN and its loss gradients on seeded data batches.

    Returns (names, initial params, gradient source): the source sets the
    model's weights to the params it is given (the baseline's current ones)
    and returns d loss / d params on batch ``t``, computed by PyTorch.
    """
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    names = [n.replace(".", "/") for n, _ in model.named_parameters()]
    params = [p.detach().double().numpy().copy() for p in model.parameters()]

    def grads(t: int, current: Sequence[np.ndarray]) -> list[np.ndarray]:
        gen = torch.Generator().manual_seed(seed * 100003 + t)
        x = torch.randn(32, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        with torch.no_grad():
            for p, value in zip(model.parameters(), current):
                p.copy_(torch.from_numpy(np.asarray(value, np.float32)))
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad.double().numpy().copy() for p in model.parameters()]

    return names, params, grads
