"""Feed identical gradients to several AdamWs and measure, step by step, where they part.

Each implementation is compared with a baseline (by default
``torch.AdamW(fused)``) bit for bit, and with the float64 reference.  In the
free-running mode every trajectory runs on its own, so differences accumulate;
in the re-synced mode every runner is reset to the baseline's state after each
step, which isolates the error of one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import jax
import numpy as np

from crosscheck.common import interrupt
from crosscheck.common.metrics import distance, ulps_from_reference
from crosscheck.trajectory import implementations, sources

QUANTITIES = ("param", "exp_avg", "exp_avg_sq")

# Pairs that must agree bit for bit on the CPU: (implementation, baseline).
BITWISE_PAIRS = {
    ("jax_impl", "torch.AdamW(fused)"),
    ("torch_impl(fused)", "torch.AdamW(fused)"),
    ("torch_impl(foreach)", "torch.AdamW(foreach)"),
    ("torch_impl(for-loop)", "torch.AdamW(for-loop)"),
}

# The torch path each of jax_impl's loop models copies (bitwise in bfloat16/float16; in float32/float64
# bitwise only with MKL's sqrt, docs/exactness.md): their float64 error is held to that path's.
COPIED_PATHS = {
    "jax_impl(for-loop)": "torch.AdamW(for-loop)",
    "jax_impl(foreach)": "torch.AdamW(foreach)",
    "jax_impl(torch default)": "torch.AdamW(default)",
}

# Our implementations' largest parameter error against the float64 reference
# may exceed that of the torch path they copy (the baseline for jax_impl) by at
# most this factor, or one ulp at magnitude 1.  Measured on the default suite:
# the torch paths among themselves stay within 1.0-1.3x of each other in
# float32; 4x leaves room for other seeds without hiding a real fault (a
# one-step-late schedule or a wrong bias correction gives 10x-1000x).
REFERENCE_FACTOR = 4.0


@dataclass
class PairSeries:
    """Per-step worst case over leaves, for one implementation against one baseline."""

    max_ulps: dict[str, list[float]] = field(default_factory=lambda: {q: [] for q in QUANTITIES})
    max_abs: dict[str, list[float]] = field(default_factory=lambda: {q: [] for q in QUANTITIES})
    max_rel: dict[str, list[float]] = field(default_factory=lambda: {q: [] for q in QUANTITIES})
    bitwise_fraction: dict[str, list[float]] = field(default_factory=lambda: {q: [] for q in QUANTITIES})
    first_mismatch: dict | None = None  # {"step", "quantity", "leaf", "element", "value", "baseline"}
    worst_leaf: dict[str, str] = field(default_factory=dict)  # quantity -> leaf with the largest ulps so far
    worst_leaf_ulps: dict[str, float] = field(default_factory=dict)  # quantity -> those ulps
    first_nonfinite: dict | None = None  # {"step", "quantity", "leaf", "count"}: NaN/inf in either run


@dataclass
class ReferenceSeries:
    """Per-step parameter error against the float64 reference."""

    max_abs: list[float] = field(default_factory=list)
    max_ulps: list[float] = field(default_factory=list)


@dataclass
class TrajectoryResult:
    case: str
    hyper: dict
    steps: int
    mode: str
    baseline: str
    vs_baseline: dict[tuple[str, str], PairSeries]  # (implementation, compared with) -> series
    vs_reference: dict[str, ReferenceSeries]
    summary: dict[str, dict] = field(default_factory=dict)
    # Without x64 a JAX schedule yields a float32 lr, so -lr/bc1 rounds twice: a bounded
    # 1-ulp gap (tests/jax_impl_tests/test_jax_parity.py measures it), not a bitwise pair.
    float32_schedule: bool = False

    def passed(self) -> bool:
        return all(s["pass"] for s in self.summary.values())


def classify_drift(errors: Sequence[float]) -> str:
    """'none' if always zero; else the growth of the error with the step count.

    The slope of log(error) against log(step), fitted over the second half of
    the run where the error is non-zero: < 0.25 bounded, < 0.75 random walk
    (~sqrt t), else linear (~t).
    """
    errors = np.asarray(errors, np.float64)
    if not np.any(errors > 0):
        return "none"
    steps = np.arange(1, errors.size + 1)
    # Running maximum: the envelope of the error, so a lucky step does not read as a drop.
    envelope = np.maximum.accumulate(errors)
    keep = (steps >= max(2, errors.size // 2)) & (envelope > 0)
    if keep.sum() < 3:
        return "bounded"
    slope = np.polyfit(np.log(steps[keep]), np.log(envelope[keep]), 1)[0]
    if slope < 0.25:
        return "bounded"
    if slope < 0.75:
        return "random walk (~sqrt t)"
    return "linear (~t)"


def _snapshot(runner: implementations.Runner):
    m, v = runner.moments()
    return runner.params(), m, v


def run(
    impls: Sequence[str],
    *,
    hyper: implementations.Hyper,
    names: Sequence[str],
    params: Sequence[np.ndarray],
    grad_source: sources.GradientSource,
    steps: int,
    baseline: str = "torch.AdamW(fused)",
    mode: str = "free",
    case: str = "",
    progress=None,
) -> TrajectoryResult:
    """Run every implementation in ``impls`` against ``baseline`` for ``steps`` steps."""
    if mode not in ("free", "resync"):
        raise ValueError(f"mode must be 'free' or 'resync', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    others = [name for name in impls if name != baseline and name != "reference64"]
    if mode == "resync":
        others = [name for name in others if name != "optax.adamw"]  # its state is not loadable
    runners = {name: implementations.make(name, hyper, params) for name in [baseline, *others]}
    ref = implementations.make("reference64", hyper, params)
    # Each implementation against the baseline, and a torch_impl path also against its torch twin.
    pairs = [(name, baseline) for name in others]
    pairs += [(name, twin) for name, twin in BITWISE_PAIRS
              if name in runners and twin in runners and twin != baseline]
    series = {pair: PairSeries() for pair in pairs}
    ref_series = {name: ReferenceSeries() for name in runners}

    for t in range(steps):
        interrupt.check()
        base = runners[baseline]
        grads = grad_source(t, base.params())
        for runner in runners.values():
            runner.step(grads)
        ref.step(grads)
        snapshots = {name: _snapshot(runner) for name, runner in runners.items()}
        base_state = snapshots[baseline]
        for name, against in pairs:
            _record(series[name, against], t, names, snapshots[name], snapshots[against])
        ref_params = ref.params()
        for name, runner in runners.items():
            _record_reference(ref_series[name], runner.params(), ref_params)
        if mode == "resync":
            state = (*base_state, base.max_moment(), base.count)
            for name in others:
                runners[name].load(*state)
            ref.load(*state)
        if progress is not None:
            progress.update(1)

    result = TrajectoryResult(case, _hyper_dict(hyper), steps, mode, baseline, series, ref_series,
                              float32_schedule=hyper.schedule is not None and not jax.config.jax_enable_x64)
    result.summary = summarize(result)
    return result


def _record(s: PairSeries, t: int, names, state, base_state) -> None:
    for q, leaves, base_leaves in zip(QUANTITIES, state, base_state):
        worst = (0.0, 0.0, 0.0)
        equal, total = 0.0, 0
        for i, (a, b) in enumerate(zip(leaves, base_leaves)):
            d = distance(a, b)
            if d.max_ulps > s.worst_leaf_ulps.get(q, 0.0):
                s.worst_leaf[q], s.worst_leaf_ulps[q] = names[i], d.max_ulps
            worst = (max(worst[0], d.max_ulps), max(worst[1], d.max_abs), max(worst[2], d.max_rel))
            equal += d.bitwise_equal * d.n
            total += d.n
            if d.nonfinite and s.first_nonfinite is None:
                s.first_nonfinite = {"step": t + 1, "quantity": q, "leaf": names[i], "count": d.nonfinite}
            if d.first_mismatch >= 0 and s.first_mismatch is None:
                s.first_mismatch = {"step": t + 1, "quantity": q, "leaf": names[i], "element": d.first_mismatch,
                                    "value": float(np.asarray(a).reshape(-1)[d.first_mismatch]),
                                    "baseline": float(np.asarray(b).reshape(-1)[d.first_mismatch])}
        s.max_ulps[q].append(worst[0])
        s.max_abs[q].append(worst[1])
        s.max_rel[q].append(worst[2])
        s.bitwise_fraction[q].append(equal / total if total else 1.0)


def _record_reference(s: ReferenceSeries, leaves, ref_leaves) -> None:
    max_abs, max_ulps = 0.0, 0.0
    for a, r in zip(leaves, ref_leaves):
        if np.size(a) == 0:
            continue
        a64 = np.asarray(a, np.float64)
        with np.errstate(invalid="ignore"):
            err = np.abs(a64 - r)
        # NaNs are left out here (the pair series report them); all-NaN leaves give 0, without a warning.
        max_abs = max(max_abs, float(np.max(err, initial=0.0, where=~np.isnan(err))))
        if np.asarray(a).dtype != np.float64:
            with np.errstate(invalid="ignore"):
                ulps = ulps_from_reference(a, r)
            max_ulps = max(max_ulps, float(np.max(ulps, initial=0.0, where=~np.isnan(ulps))))
    s.max_abs.append(max_abs)
    s.max_ulps.append(max_ulps)


def _hyper_dict(hyper) -> dict:
    d = asdict(hyper)
    d["schedule"] = None if hyper.schedule is None else repr(hyper.schedule)
    return d


def summarize(result: TrajectoryResult) -> dict[str, dict]:
    """One row per pair: bitwise or max ulps, drift type, error against float64 relative to the yardstick, pass."""
    twins = {name: twin for name, twin in [*BITWISE_PAIRS, *COPIED_PATHS.items()] if twin in result.vs_reference}
    summary = {}
    for (name, against), s in result.vs_baseline.items():
        bitwise = s.first_mismatch is None
        # An implementation is held to the float64 error of the torch path it copies, else of the baseline.
        yardstick = twins.get(name, result.baseline)
        ref_err = max(result.vs_reference[name].max_abs)
        yard_err = max(result.vs_reference[yardstick].max_abs)
        within_reference = ref_err <= max(REFERENCE_FACTOR * yard_err, _ulp_floor(result))
        required = (name, against) in BITWISE_PAIRS and not (
            name.startswith("jax_impl") and result.float32_schedule)
        why = []
        if s.first_nonfinite is not None:
            # Equal NaNs are bitwise equal and prove nothing: a trajectory that left the finite numbers fails.
            nf = s.first_nonfinite
            why.append(f"NaN/inf from step {nf['step']} ({nf['quantity']} of {nf['leaf']}, {nf['count']} elements)")
        if required and not bitwise:
            why.append("bitwise parity required")
        if not within_reference and _ours(name):
            why.append(f"error vs float64 reference {ref_err:.3g} > {REFERENCE_FACTOR}x {yardstick}'s {yard_err:.3g}")
        summary[f"{name} vs {against}"] = {
            "implementation": name,
            "against": against,
            "bitwise": bitwise,
            "bitwise_required": required,
            "max_ulps": {q: float(max(s.max_ulps[q])) for q in QUANTITIES},
            "max_abs": {q: float(max(s.max_abs[q])) for q in QUANTITIES},
            "max_rel": {q: float(max(s.max_rel[q])) for q in QUANTITIES},
            "min_bitwise_fraction": {q: float(min(s.bitwise_fraction[q])) for q in QUANTITIES},
            "drift": classify_drift(s.max_abs["param"]),
            "reference_error": ref_err,
            "reference_yardstick": yardstick,
            "reference_error_ratio": ref_err / yard_err if yard_err > 0 else None,
            "first_mismatch": s.first_mismatch,
            "first_nonfinite": s.first_nonfinite,
            "worst_leaf": s.worst_leaf,
            # Peers (torch.optim, optax) are measured, not judged: their differences are findings.
            "pass": not why,
            "why": "; ".join(why),
        }
    return summary


def _ours(name: str) -> bool:
    return name.startswith(("jax_impl", "torch_impl"))


def _ulp_floor(result: TrajectoryResult) -> float:
    """One ulp of float32/bfloat16/float16 at magnitude 1: an absolute floor for the reference check."""
    eps = {"float32": 2.0**-23, "float64": 2.0**-52, "bfloat16": 2.0**-7, "float16": 2.0**-10}
    return eps[result.hyper["dtype"]]
