from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import jax

from crosscheck.trajectory import harness as trajectory
from crosscheck.trajectory import implementations, sources

DEFAULT_IMPLS = tuple(name for name in implementations.IMPLEMENTATIONS if name != "reference64")


@dataclass(frozen=True)
class Case:
    """One trajectory check: a parameter set, a gradient stream, hyperparameters, a mode."""

    name: str
    params: str = "flat"
    grads: str = "gaussian"
    steps: int = 200
    hyper: implementations.Hyper = field(default_factory=implementations.Hyper)
    mode: str = "free"
    mask: bool = False
    x64: bool = False
    seed: int = 0


# The built-in suite: every option and dtype, short runs (about a minute on a 2-core CPU).
SUITE = (
    Case("default float32", steps=400),
    Case("amsgrad, heavy-tailed", grads="heavy-tailed", hyper=implementations.Hyper(amsgrad=True)),
    Case("maximize, sign flips", grads="sign-flip", hyper=implementations.Hyper(maximize=True)),
    Case("wd=0.1 + mask, CNN leaves", params="cnn", grads="sparse", steps=120,
         hyper=implementations.Hyper(weight_decay=0.1), mask=True),
    Case("wd=0, dynamic range 1e-8..1e4", grads="dynamic-range", hyper=implementations.Hyper(weight_decay=0.0)),
    Case("cosine schedule (float64 lr, x64)", x64=True, hyper=implementations.Hyper(lr=1e-2), steps=300),
    Case("bfloat16", hyper=implementations.Hyper(dtype="bfloat16")),
    Case("float16", hyper=implementations.Hyper(dtype="float16", eps=1e-4)),
    Case("float64 (x64)", x64=True, hyper=implementations.Hyper(dtype="float64")),
    Case("re-synced, real PyTorch CNN gradients", params="model", grads="model", steps=60, mode="resync"),
)


@contextlib.contextmanager
def _x64(enabled: bool):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def run_case(case: Case, impls: Sequence[str] = DEFAULT_IMPLS, baseline: str = "torch.AdamW(fused)",
             progress: bool = True) -> trajectory.TrajectoryResult:
    """Run one case (the API the CLI and the tests share)."""
    if case.params == "model" or case.grads == "model":
        names, params, grad_source = sources.model_gradients(case.seed)
    else:
        names, params = sources.param_set(case.params, case.seed)
        grad_source = sources.synthetic(case.grads, case.seed)
    hyper = case.hyper
    if case.name.startswith("cosine") and hyper.schedule is None:
        hyper = replace(hyper, schedule=sources.CosineSchedule(hyper.lr, case.steps))
    if case.mask:
        hyper = replace(hyper, decay_mask=sources.no_decay_mask(names))
    if hyper.dtype == "float64" and not case.x64:
        raise ValueError("dtype float64 needs --x64 (jax_enable_x64)")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=case.steps, desc=case.name[:40], unit="step", leave=False, file=sys.stderr)
    try:
        with _x64(case.x64):
            return trajectory.run(impls, hyper=hyper, names=names, params=params, grad_source=grad_source,
                                  steps=case.steps, baseline=baseline, mode=case.mode, case=case.name,
                                  progress=bar)
    finally:
        if bar is not None:
            bar.close()
