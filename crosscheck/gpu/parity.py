from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from crosscheck.common import dtypes, reference
from crosscheck.gpu.settings import Clock, Settings, say
from crosscheck.trajectory import implementations
from crosscheck.trajectory import report as trajectory_report
from crosscheck.trajectory import suite


def _device_names(device: str) -> dict[str, str]:
    return {path: f"torch.AdamW({path}, {device})" for path in ("fused", "foreach", "for-loop")}


def _register_runners(device: str) -> None:
    """The harness's runners, on ``device``, under their own names (the CPU names stay the CPU runners)."""
    import torch

    from jax_impl import cuda_rounding

    impl = implementations
    for path, name in _device_names(device).items():
        impl.IMPLEMENTATIONS.setdefault(
            name, lambda h, p, name=name, path=path: impl.TorchRunner(name, h, p, cls=torch.optim.AdamW, path=path,
                                                                      device=device))
    for candidate in cuda_rounding.candidates():
        name = f"jax_impl[{candidate.label()}]"
        impl.IMPLEMENTATIONS.setdefault(
            name, lambda h, p, name=name, c=candidate: impl.JaxRunner(name, h, p, kind="exact", rounding=c))
    impl.IMPLEMENTATIONS.setdefault("reference(torch-cuda emulation)",
                                    lambda h, p: CudaEmulationRunner("reference(torch-cuda emulation)", h, p))


class CudaEmulationRunner(implementations.Runner):
    """crosscheck.reference.torch_cuda_step (NumPy, exact FMAs): the CUDA model, independent of XLA."""

    def __init__(self, name, hyper, params, contraction=("fma", "fma-first", "fma-first")):
        super().__init__(name, hyper)
        self.np_dtype = dtypes.DTYPES[hyper.dtype][0]
        self.leaves = [np.asarray(p, self.np_dtype) for p in params]
        self.state = reference.torch_cuda_init(self.leaves, hyper.amsgrad)
        self.contraction = contraction

    def step(self, grads):
        h = self.hyper
        self.leaves, self.state = reference.torch_cuda_step(
            self.leaves, [np.asarray(g, self.np_dtype) for g in grads], self.state, lr=h.lr_at(self.count), b1=h.b1,
            b2=h.b2, eps=h.eps, weight_decay=h.weight_decay, amsgrad=h.amsgrad, maximize=h.maximize,
            decay_mask=h.decay_mask, contraction=self.contraction)
        self.count += 1

    def params(self):
        return list(self.leaves)

    def moments(self):
        return list(self.state.exp_avg), list(self.state.exp_avg_sq)

    def max_moment(self):
        return None if self.state.max_exp_avg_sq is None else list(self.state.max_exp_avg_sq)

    def load(self, params, exp_avg, exp_avg_sq, max_exp_avg_sq, count):
        # Copies: the baseline's arrays may be views of torch tensors that its next step updates in place.
        cast = lambda xs: [np.array(x, self.np_dtype, copy=True) for x in xs]  # noqa: E731
        self.leaves = cast(params)
        self.state = reference.ReferenceState(count, cast(exp_avg), cast(exp_avg_sq),
                                              None if max_exp_avg_sq is None else cast(max_exp_avg_sq))
        self.count = count


def part_parity(settings: Settings, out: Path, clock: Clock, partial: dict) -> dict:
    from jax_impl import cuda_rounding

    _register_runners(settings.device)
    names = _device_names(settings.device)
    baseline = names["fused"]
    impls = ["jax_impl", names["foreach"], names["for-loop"], "optax.adamw"]
    if settings.dry_run:  # on the CPU "jax_impl" is the CPU model: run the CUDA model's plumbing too
        impls.append(f"jax_impl[{cuda_rounding.CudaRounding().label()}]")
    # First the candidates (which model torch's kernel is), then the suite with the default and, if the
    # default is not bitwise, the candidate that is.
    candidates = _contraction_candidates(settings, clock, baseline)
    partial["contraction"] = candidates
    bias = _bias_corrections(settings)
    partial["bias_corrections"] = bias
    best = candidates["bitwise_in_every_dtype"]
    if not settings.dry_run and best and not candidates["model_bitwise"]:
        impls.append(best[0])
        settings.rounding = next(c for c in cuda_rounding.candidates() if f"jax_impl[{c.label()}]" == best[0])
    cases = list(suite.SUITE)
    if settings.dry_run:
        cases = [c for c in cases if c.name == "bfloat16"]
    results, rows = [], []
    partial.update({"cases": rows})
    for k, case in enumerate(cases):
        if clock.expired():
            rows.append({"case": case.name, "status": "not run: budget"})
            continue
        if settings.suite_steps is not None:
            case = dataclasses.replace(case, steps=min(case.steps, settings.suite_steps))
        say(f"parity {k + 1}/{len(cases)}: {case.name} ({case.steps} steps)")
        result = suite.run_case(case, impls, baseline, progress=settings.progress)
        results.append(result)
        s = result.summary[f"jax_impl vs {baseline}"]
        rows.append({"case": case.name, "status": "run", "bitwise": s["bitwise"], "max_ulps": s["max_ulps"],
                     "first_mismatch": s["first_mismatch"], "drift": s["drift"],
                     "peers": {pair: {"bitwise": v["bitwise"], "max_ulps_param": v["max_ulps"]["param"]}
                               for pair, v in result.summary.items() if not pair.startswith("jax_impl vs")}})
    if results:
        trajectory_report.write(results, out / "parity")
    bitwise = all(r.get("bitwise", False) for r in rows if r["status"] == "run")
    complete = all(r["status"] == "run" for r in rows)
    # In a dry run the baseline is torch's CPU kernel: the CUDA candidates are run (plumbing), not judged.
    model_ok = candidates["model_bitwise"] or settings.dry_run
    status = "pass" if bitwise and complete and model_ok else ("timeout" if not complete else "mismatch")
    return {"status": status, "baseline": baseline, "cases": rows, "contraction": candidates,
            "bias_corrections": bias, "rounding_for_later_parts": str(settings.rounding), "files": ["parity/report.json", "parity/report.md", "parity/trajectories.png"]}


def _contraction_candidates(settings: Settings, clock: Clock, baseline: str) -> dict:
    """Each CudaRounding (and the NumPy emulation) re-synced to torch every step: which are bitwise, per dtype."""
    from jax_impl import cuda_rounding

    candidates = cuda_rounding.candidates()
    if settings.dry_run:
        candidates = [candidates[0], candidates[-1]]  # one of each kernel generation
    names = [f"jax_impl[{c.label()}]" for c in candidates] + ["reference(torch-cuda emulation)"]
    # lr * wd = 0.05: the decay's rounding differs between candidates often enough to be seen.
    hyper = implementations.Hyper(lr=0.1, weight_decay=0.5)
    table = {}
    dtypes = (("float32", False), ("float64", True), ("bfloat16", False))
    for dtype, x64 in dtypes[:1] if settings.dry_run else dtypes:
        if clock.expired():
            table[dtype] = {"status": "not run: budget"}
            continue
        case = suite.Case(f"contraction candidates, {dtype}", grads="dynamic-range", steps=settings.candidate_steps,
                        hyper=dataclasses.replace(hyper, dtype=dtype), mode="resync", x64=x64)
        say(f"parity: {len(names)} contraction candidates, {dtype}")
        result = suite.run_case(case, names, baseline, progress=settings.progress)
        table[dtype] = {name: {"bitwise": result.summary[f"{name} vs {baseline}"]["bitwise"],
                               "min_bitwise_fraction": result.summary[f"{name} vs {baseline}"][
                                   "min_bitwise_fraction"]["param"],
                               "max_ulps_param": result.summary[f"{name} vs {baseline}"]["max_ulps"]["param"]}
                        for name in names}
    run_tables = [t for t in table.values() if "status" not in t]
    bitwise_everywhere = [name for name in names if run_tables and all(t[name]["bitwise"] for t in run_tables)]
    default = f"jax_impl[{cuda_rounding.CudaRounding().label()}]"
    return {"by_dtype": table, "bitwise_in_every_dtype": bitwise_everywhere,
            "default_candidate": default, "model_bitwise": default in bitwise_everywhere,
            "note": "two kernel generations: 'double' (hyperparameters as double) and 'opmath' (pytorch#154069: "
                    "opmath_t arithmetic, explicit FMAs); within 'double', float32/bfloat16 results rarely depend "
                    "on the contraction (the double results differ in their last bit): float64 decides"}


def _bias_corrections(settings: Settings) -> dict:
    """The device's pow (the kernel's) against the host's, rounded to float32 as the kernel rounds them."""
    import torch

    from jax_impl import cuda_rounding

    steps = 10_000 if settings.dry_run else 1_000_000
    rows = {}
    for b1, b2 in ((0.9, 0.999), (0.95, 0.98), (0.9, 0.99999)):
        t = torch.arange(1, steps + 1, dtype=torch.float32, device=settings.device).to(torch.float64)
        beta1 = torch.full_like(t, b1)
        beta2 = torch.full_like(t, b2)
        device_bc1 = (1 - torch.pow(beta1, t)).to(torch.float32).cpu().numpy()
        device_bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, t)).to(torch.float32).cpu().numpy()
        host_bc1, host_bc2_sqrt = cuda_rounding.host_bias_corrections(b1, b2, steps)
        rows[f"double pow, b1={b1}, b2={b2}"] = _differing(steps, device_bc1, host_bc1, device_bc2_sqrt,
                                                           host_bc2_sqrt)
        # The opmath kernel: pow_(float, float), i.e. CUDA's powf, and float32 arithmetic after it.
        t32 = torch.arange(1, steps + 1, dtype=torch.float32, device=settings.device)
        beta1_32, beta2_32 = torch.full_like(t32, b1), torch.full_like(t32, b2)
        device_bc1 = (1 - torch.pow(beta1_32, t32)).cpu().numpy()
        device_bc2_sqrt = torch.sqrt(1 - torch.pow(beta2_32, t32)).cpu().numpy()
        host_bc1, host_bc2_sqrt = cuda_rounding.float32_bias_corrections(b1, b2, steps)
        rows[f"float pow, b1={b1}, b2={b2}"] = _differing(steps, device_bc1, host_bc1, device_bc2_sqrt,
                                                          host_bc2_sqrt)
    return rows


def _differing(steps, device_bc1, host_bc1, device_bc2_sqrt, host_bc2_sqrt) -> dict:
    differ1 = np.flatnonzero(device_bc1.view(np.int32) != host_bc1.view(np.int32)) + 1
    differ2 = np.flatnonzero(device_bc2_sqrt.view(np.int32) != host_bc2_sqrt.view(np.int32)) + 1
    return {"steps": steps, "bc1_steps_differing": int(differ1.size), "bc1_first": differ1[:10].tolist(),
            "bc2_sqrt_steps_differing": int(differ2.size), "bc2_sqrt_first": differ2[:10].tolist()}
