"""Every AdamW behind one interface, so the same gradients can be fed to all of them.

A runner holds one optimizer and its parameters (a list of arrays, the leaves
of a parameter set) and exposes ``step(grads, lr)``, its current ``params()``,
``moments()`` and ``load(...)`` (used by the re-synced mode to reset it to the
baseline's state).  Gradients and states travel as NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jax_impl
import torch_impl
from crosscheck.common import reference
from crosscheck.common.dtypes import to_jax, to_torch
from crosscheck.common.metrics import as_numpy


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters shared by every implementation (torch's names and defaults)."""

    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False
    maximize: bool = False
    dtype: str = "float32"
    # lr(t) for t = 0, 1, ...: the lr of step t+1, as a torch scheduler stepped
    # after each optimizer.step() gives it.  None: constant lr.
    schedule: Callable[[int], float] | None = None
    decay_mask: tuple[bool, ...] | None = None  # per leaf; False = no weight decay
    decay_rounding: str = "torch"

    def lr_at(self, count: int) -> float:
        return self.lr if self.schedule is None else self.schedule(count)


@dataclass
class Runner:
    name: str
    hyper: Hyper
    count: int = field(default=0, init=False)

    def step(self, grads: Sequence[np.ndarray]) -> None:
        raise NotImplementedError

    def params(self) -> list[np.ndarray]:
        raise NotImplementedError

    def moments(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        raise NotImplementedError

    def max_moment(self) -> list[np.ndarray] | None:
        """``max_exp_avg_sq`` under amsgrad where the runner's state has it, else None."""
        return None

    def load(self, params, exp_avg, exp_avg_sq, max_exp_avg_sq, count: int) -> None:
        raise NotImplementedError


def torch_path_of(optimizer: torch.optim.Optimizer) -> str:
    """The path (``jax_impl.adamw``'s ``torch_path``) a torch Adam/AdamW takes in ``step()``.

    ``fused`` and ``foreach`` as set in each param group; where both are None,
    torch's own choice (``torch.optim.adam.adam``): foreach where
    ``_default_to_fused_or_foreach`` allows it (CUDA and other native foreach
    devices: never the CPU), not with ``differentiable`` or a tensor lr without
    ``capturable``; else the for-loop.  Raises ``ValueError`` when the groups
    take different paths (one ``jax_impl.adamw`` follows one).
    """
    from torch.optim.optimizer import _default_to_fused_or_foreach

    paths = set()
    for group in optimizer.param_groups:
        fused, foreach = group.get("fused"), group.get("foreach")
        if fused is None and foreach is None:
            _, foreach = _default_to_fused_or_foreach(group["params"], group.get("differentiable", False),
                                                      use_fused=False)
            if foreach and torch.is_tensor(group["lr"]) and not group.get("capturable", False):
                foreach = False
        paths.add("fused" if fused else "foreach" if foreach else "for-loop")
    if len(paths) != 1:
        raise ValueError(f"the param groups of {type(optimizer).__name__} take different paths {sorted(paths)}; "
                         "one jax_impl.adamw follows one torch_path")
    return paths.pop()


class TorchRunner(Runner):
    """``torch.optim.AdamW`` or ``torch_impl.AdamW`` on one path (for-loop, foreach, fused, or torch's default)."""

    def __init__(self, name, hyper, params, *, cls, path: str, device: str = "cpu"):
        super().__init__(name, hyper)
        self.device = device
        self.tensors = [to_torch(p, hyper.dtype).to(device).requires_grad_(True) for p in params]
        flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True),
                 "default": {}}[path]
        common = dict(lr=hyper.lr, betas=(hyper.b1, hyper.b2), eps=hyper.eps, amsgrad=hyper.amsgrad,
                      maximize=hyper.maximize, **flags)
        mask = hyper.decay_mask or (True,) * len(self.tensors)
        groups = [{"params": [t for t, m in zip(self.tensors, mask) if m], "weight_decay": hyper.weight_decay},
                  {"params": [t for t, m in zip(self.tensors, mask) if not m], "weight_decay": 0.0}]
        self.optimizer = cls([g for g in groups if g["params"]], **common)
        self.path = torch_path_of(self.optimizer)  # the path step() takes

    def step(self, grads):
        for tensor, g in zip(self.tensors, grads):
            tensor.grad = to_torch(g, self.hyper.dtype).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.hyper.lr_at(self.count)
        self.optimizer.step()
        self.count += 1

    def params(self):
        return [as_numpy(t) for t in self.tensors]

    def moments(self):
        states = [self.optimizer.state[t] for t in self.tensors]
        return [as_numpy(s["exp_avg"]) for s in states], [as_numpy(s["exp_avg_sq"]) for s in states]

    def max_moment(self):
        if not self.hyper.amsgrad:
            return None
        return [as_numpy(self.optimizer.state[t]["max_exp_avg_sq"]) for t in self.tensors]

    def load(self, params, exp_avg, exp_avg_sq, max_exp_avg_sq, count):
        with torch.no_grad():
            for i, t in enumerate(self.tensors):
                t.copy_(to_torch(params[i], self.hyper.dtype))
                state = self.optimizer.state[t]
                state["exp_avg"].copy_(to_torch(exp_avg[i], self.hyper.dtype))
                state["exp_avg_sq"].copy_(to_torch(exp_avg_sq[i], self.hyper.dtype))
                if max_exp_avg_sq is not None:
                    state["max_exp_avg_sq"].copy_(to_torch(max_exp_avg_sq[i], self.hyper.dtype))
                state["step"].fill_(float(count))
        self.count = count


def _jax_schedule(hyper: Hyper):
    if hyper.schedule is None:
        return hyper.lr
    # The lr of each step as a table, so JAX sees torch's lr values; under
    # jax_enable_x64 the table is float64 and the schedule exact.
    table = np.asarray([hyper.schedule(t) for t in range(hyper.schedule.num_steps + 1)])
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return lambda count: jnp.asarray(table, dtype)[jnp.minimum(count, table.shape[0] - 1)]


class JaxRunner(Runner):
    """``jax_impl.adamw`` (exact step or ``optax.apply_updates``) or ``optax.adamw``, jitted and donated."""

    def __init__(self, name, hyper, params, *, kind: str, rounding="auto", torch_path: str = "fused",
                 kernel: str = "auto"):
        super().__init__(name, hyper)
        self.leaves = [to_jax(p, hyper.dtype) for p in params]
        mask = list(hyper.decay_mask) if hyper.decay_mask is not None else None
        if kind == "optax":
            if hyper.amsgrad:  # optax.adamw has no amsgrad flag: its own chain, decay as in optax.adamw
                self.tx = optax.chain(optax.scale_by_amsgrad(hyper.b1, hyper.b2, hyper.eps),
                                      optax.add_decayed_weights(hyper.weight_decay, mask),
                                      optax.scale_by_learning_rate(_jax_schedule(hyper)))
            else:
                self.tx = optax.adamw(_jax_schedule(hyper), b1=hyper.b1, b2=hyper.b2, eps=hyper.eps,
                                      weight_decay=hyper.weight_decay, mask=mask)
            if hyper.maximize:
                self.tx = optax.chain(optax.scale(-1.0), self.tx)
        else:
            self.tx = jax_impl.adamw(_jax_schedule(hyper), hyper.b1, hyper.b2, hyper.eps, hyper.weight_decay,
                                     amsgrad=hyper.amsgrad, maximize=hyper.maximize, mask=mask,
                                     decay_rounding=hyper.decay_rounding, rounding=rounding, torch_path=torch_path,
                                     kernel=kernel)
        self.state = self.tx.init(self.leaves)
        if kind == "exact":
            step = lambda g, p, s: jax_impl.apply_exact(self.tx, g, s, p)  # noqa: E731
        else:
            def step(g, p, s):
                updates, s = self.tx.update(g, s, p)
                return optax.apply_updates(p, updates), s
        # (params, state) donated in the order they are returned: no copies.
        self._step = jax.jit(step, donate_argnums=(1, 2))
        self.kind = kind

    def step(self, grads):
        g = [to_jax(x, self.hyper.dtype) for x in grads]
        self.leaves, self.state = self._step(g, self.leaves, self.state)
        self.count += 1

    def params(self):
        return [np.asarray(p) for p in self.leaves]

    def _moment_trees(self):
        # optax.adamw's tree and ours are the same layout; maximize puts optax's inside a chain.
        moments = next(s for s in jax.tree.leaves(self.state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
        view = jax_impl.torch_view(moments)
        return view.exp_avg, view.exp_avg_sq

    def moments(self):
        m, v = self._moment_trees()
        return [np.asarray(x) for x in m], [np.asarray(x) for x in v]

    def max_moment(self):
        if not self.hyper.amsgrad or self.kind == "optax":
            return None
        return [np.asarray(x) for x in jax_impl.torch_view(self.state).max_exp_avg_sq]

    def load(self, params, exp_avg, exp_avg_sq, max_exp_avg_sq, count):
        if self.kind == "optax":
            raise NotImplementedError("re-synced mode does not load optax.adamw's state")
        arr = lambda xs: [to_jax(x, self.hyper.dtype) for x in xs]  # noqa: E731
        self.leaves = arr(params)
        view = jax_impl.AdamWState(jnp.asarray(count, jnp.int32), arr(exp_avg), arr(exp_avg_sq),
                                   arr(max_exp_avg_sq) if max_exp_avg_sq is not None else None)
        self.state = jax_impl.from_torch_view(self.state, view)
        self.count = count


class ReferenceRunner(Runner):
    """The float64 reference; reports its params rounded to nothing (float64)."""

    def __init__(self, name, hyper, params):
        super().__init__(name, hyper)
        self.leaves = [np.asarray(p, np.float64) for p in params]
        self.state = reference.reference_init(self.leaves, hyper.amsgrad)

    def step(self, grads):
        h = self.hyper
        self.leaves, self.state = reference.reference_step(
            self.leaves, [np.asarray(g, np.float64) for g in grads], self.state, lr=h.lr_at(self.count), b1=h.b1,
            b2=h.b2, eps=h.eps, weight_decay=h.weight_decay, amsgrad=h.amsgrad, maximize=h.maximize,
            decay_mask=h.decay_mask)
        self.count += 1

    def params(self):
        return list(self.leaves)

    def moments(self):
        return list(self.state.exp_avg), list(self.state.exp_avg_sq)

    def load(self, params, exp_avg, exp_avg_sq, max_exp_avg_sq, count):
        f64 = lambda xs: [np.asarray(x, np.float64) for x in xs]  # noqa: E731
        self.leaves = f64(params)
        self.state = reference.ReferenceState(count, f64(exp_avg), f64(exp_avg_sq),
                                              f64(max_exp_avg_sq) if max_exp_avg_sq is not None else None)
        self.count = count


# name -> factory(hyper, params)
IMPLEMENTATIONS: dict[str, Callable[[Hyper, Sequence[np.ndarray]], Runner]] = {
    "torch.AdamW(fused)": lambda h, p: TorchRunner("torch.AdamW(fused)", h, p, cls=torch.optim.AdamW, path="fused"),
    "torch.AdamW(foreach)": lambda h, p: TorchRunner("torch.AdamW(foreach)", h, p, cls=torch.optim.AdamW,
                                                     path="foreach"),
    "torch.AdamW(for-loop)": lambda h, p: TorchRunner("torch.AdamW(for-loop)", h, p, cls=torch.optim.AdamW,
                                                      path="for-loop"),
    "torch_impl(fused)": lambda h, p: TorchRunner("torch_impl(fused)", h, p, cls=torch_impl.AdamW, path="fused"),
    "torch_impl(foreach)": lambda h, p: TorchRunner("torch_impl(foreach)", h, p, cls=torch_impl.AdamW,
                                                    path="foreach"),
    "torch_impl(for-loop)": lambda h, p: TorchRunner("torch_impl(for-loop)", h, p, cls=torch_impl.AdamW,
                                                     path="for-loop"),
    "torch.AdamW(default)": lambda h, p: TorchRunner("torch.AdamW(default)", h, p, cls=torch.optim.AdamW,
                                                     path="default"),
    "jax_impl": lambda h, p: JaxRunner("jax_impl", h, p, kind="exact"),
    "jax_impl(foreach)": lambda h, p: JaxRunner("jax_impl(foreach)", h, p, kind="exact", torch_path="foreach"),
    "jax_impl(for-loop)": lambda h, p: JaxRunner("jax_impl(for-loop)", h, p, kind="exact", torch_path="for-loop"),
    # The path torch.optim.AdamW(params) takes by default for these params (the for-loop on the CPU).
    "jax_impl(torch default)": lambda h, p: JaxRunner(
        "jax_impl(torch default)", h, p, kind="exact",
        torch_path=TorchRunner("probe", h, p, cls=torch.optim.AdamW, path="default").path),
    "jax_impl+apply_updates": lambda h, p: JaxRunner("jax_impl+apply_updates", h, p, kind="updates"),
    "optax.adamw": lambda h, p: JaxRunner("optax.adamw", h, p, kind="optax"),
    "reference64": lambda h, p: ReferenceRunner("reference64", h, p),
}


def make(name: str, hyper: Hyper, params: Sequence[np.ndarray]) -> Runner:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; choose from {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name](hyper, params)
