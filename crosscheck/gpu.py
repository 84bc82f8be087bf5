"""``python -m crosscheck gpu --out DIR``: everything the GPU half of the project needs measured, in one command.

Parts, each under its share of ``--budget`` (seconds), each recorded in the
report whether it passed, failed, ran out of time or raised (the others go on):

* ``parity``: trajectory parity on the device of ``jax_impl.adamw`` (its
  default rounding: torch's CUDA kernel's on a GPU) against
  ``torch.optim.AdamW(fused=True)`` on CUDA, with foreach, for-loop,
  optax.adamw and the float64 reference, for the suite's cases and dtypes
  (``crosscheck.cli.SUITE`` through ``cli.run_case``); then, re-synced each
  step, every nvcc contraction candidate (``jax_impl.CudaRounding``) and the
  NumPy emulation against torch, per dtype: the bitwise ones are the model;
  and the device's ``pow`` bias corrections against the host tables.
* ``step_time``: ``benchmarks/step_time.py`` on the device, 1e6..1e9 params,
  one tensor and ~300 leaves, with a device-to-device copy in the same
  interleaved rounds (the HBM bandwidth): ms/step, % of bandwidth, compile s.
* ``train_step``: SimpleCNN and a small transformer, forward + backward +
  AdamW: Flax (XLA) against torch eager and torch.compile (CUDA).
* ``cifar10``: the CIFAR-10 shared-gradients run on the device (torch
  computes each step's gradients on CUDA, torch's fused CUDA AdamW and
  ``jax_impl.adamw`` step on them: bitwise at every step, or the first step
  that is not).  Skipped, with a line saying so, without data.

Without a GPU (torch without CUDA, or JAX without a GPU backend) it says so
and exits 2; ``--dry-run`` runs every part on the CPU at tiny sizes instead,
so CI tests the plumbing.  Exit status: 0 every part ran and parity held, 1 a
mismatch or a part that failed or ran out of time, 2 usage or no GPU, 130
interrupted (the report so far is written).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crosscheck import implementations, reference

PARTS = ("parity", "step_time", "train_step", "cifar10")
# Share of the budget per part; time a part leaves unused goes to the later ones.
SHARES = {"parity": 0.3, "step_time": 0.35, "train_step": 0.15, "cifar10": 0.2}
DEFAULT_BUDGET = 1500.0
ALARM_GRACE_S = 30.0
REPO = Path(__file__).resolve().parents[1]


class PartTimeout(Exception):
    """A part overran its deadline (raised by the alarm, or by a part that checks its clock)."""


@dataclasses.dataclass
class Clock:
    """A part's deadline: parts check ``expired()`` between units of work and stop early."""

    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


@dataclasses.dataclass
class Settings:
    """Sizes: full on the GPU, tiny for --dry-run (the CPU backend in CI)."""

    device: str  # torch device: "cuda", or "cpu" in a dry run
    dry_run: bool
    progress: bool
    data_dir: Path | None
    # jax_impl's rounding for the later parts: "auto", or the candidate part (a) found bitwise with torch.
    rounding: object = "auto"

    @property
    def suite_steps(self) -> int | None:
        return 3 if self.dry_run else None  # None: the suite's own step counts

    @property
    def candidate_steps(self) -> int:
        return 2 if self.dry_run else 20

    @property
    def sizes(self) -> list[int]:
        # Largest first: the rows the goal is about (>= 1e8) are measured before the budget runs out.
        return [2000] if self.dry_run else [10**8, 10**9, 10**7, 10**6]

    @property
    def leaves(self) -> int:
        return 12 if self.dry_run else 300  # the "many" layout

    @property
    def cifar_steps(self) -> int | None:
        return 5 if self.dry_run else None  # None: two epochs, or the budget

    @property
    def repeats(self) -> int:
        return 3 if self.dry_run else 15


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("gpu", help="parity with torch's CUDA AdamW, step time vs HBM bandwidth, training "
                                          "steps and CIFAR-10 on a GPU (one command)",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help="seconds for all parts together (default %(default)g); shares: "
                        + ", ".join(f"{k} {int(100 * v)}%" for k, v in SHARES.items()))
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--data-dir", type=Path, default=None, help="CIFAR-10 (else $CROSSCHECK_CIFAR10_DIR)")
    p.add_argument("--dry-run", action="store_true", help="run every part on the CPU at tiny sizes, to test the plumbing (on a GPU machine: with JAX_PLATFORMS=cpu)")
    return p


def _no_gpu_reason() -> str | None:
    import jax
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if jax.default_backend() != "gpu":
        return f"JAX {jax.__version__} has no GPU backend (default backend: {jax.default_backend()})"
    return None


def run(args) -> int:
    """The ``gpu`` command: 0 pass, 1 mismatch or failed part, 2 usage or no GPU, 130 interrupted."""
    # Before JAX touches the device: torch and JAX share it, so JAX must not take 75% of it up front,
    # and must give freed buffers back (the 1e9 benchmarks need the memory in turn).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    out = args.out if args.out != Path("crosscheck-report") else Path("crosscheck-report/gpu")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        print(f"error: --parts: unknown part(s) {unknown or args.parts!r}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    if not (args.budget > 0 and math.isfinite(args.budget)):
        print(f"error: --budget must be a positive number of seconds, got {args.budget}", file=sys.stderr)
        return 2
    if not args.dry_run:
        reason = _no_gpu_reason()
        if reason is not None:
            print(f"error: no GPU: {reason}; nothing measured (--dry-run runs the plumbing on the CPU)",
                  file=sys.stderr)
            return 2
    settings = Settings("cpu" if args.dry_run else "cuda", args.dry_run,
                        progress=not args.no_progress and sys.stderr.isatty(), data_dir=args.data_dir)
    report = {"command": "python -m crosscheck gpu", "dry_run": args.dry_run, "budget_s": args.budget,
              "environment": _environment(settings), "parts": {}}
    started = time.monotonic()
    end = started + args.budget
    interrupted = False
    for i, name in enumerate(parts):
        remaining_share = sum(SHARES[p] for p in parts[i:])
        seconds = max(0.0, (end - time.monotonic()) * SHARES[name] / remaining_share)
        _say(f"part {name}: budget {seconds:.0f} s")
        try:
            report["parts"][name] = _run_part(name, settings, out, Clock(time.monotonic() + seconds), seconds)
        except KeyboardInterrupt:
            report["parts"][name] = {"status": "interrupted"}
            interrupted = True
            break
        _say(f"part {name}: {report['parts'][name]['status']} in {report['parts'][name].get('seconds', 0):.0f} s")
    report["seconds"] = time.monotonic() - started
    report["passed"] = all(p.get("status") in ("pass", "skipped") for p in report["parts"].values())
    paths = write_report(report, out)
    print(markdown(report))
    print("report: " + ", ".join(str(p) for p in paths))
    if interrupted:
        return 130
    return 0 if report["passed"] else 1


def _say(line: str) -> None:
    print(f"[gpu] {line}", file=sys.stderr, flush=True)


def _environment(settings: Settings) -> dict:
    import jax
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
           "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
           "torch_device": settings.device}
    if settings.device == "cuda":
        env["torch_cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


@contextlib.contextmanager
def _alarm(seconds: float):
    """A backstop for a part stuck in one long unit: PartTimeout once ``seconds`` have passed (main thread, Unix)."""
    usable = hasattr(signal, "SIGALRM") and threading_is_main()
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise PartTimeout(f"still running {seconds:.0f} s after its start")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run_part(name: str, settings: Settings, out: Path, clock: Clock, seconds: float) -> dict:
    """Run one part: its result, with status pass / mismatch / error / timeout / skipped and its seconds."""
    fn = {"parity": part_parity, "step_time": part_step_time, "train_step": part_train_step,
          "cifar10": part_cifar10}[name]
    started = time.monotonic()
    partial: dict = {}
    try:
        # Parts stop themselves at the deadline; the alarm (deadline + 25% + grace) catches one long unit.
        with _alarm(1.25 * seconds + ALARM_GRACE_S):
            result = fn(settings, out, clock, partial)
    except PartTimeout as err:
        result = {**partial, "status": "timeout", "error": str(err)}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001  -- one part failing must not stop the others
        result = {**partial, "status": "error", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=8)}
    finally:
        gc.collect()
        _free_device_memory(settings)
    result["seconds"] = time.monotonic() - started
    result["budget_s"] = seconds
    return result


def _free_device_memory(settings: Settings) -> None:
    if settings.device == "cuda":
        import torch

        torch.cuda.empty_cache()


# --- (a) parity ---------------------------------------------------------------------------------------------

def _device_names(device: str) -> dict[str, str]:
    return {path: f"torch.AdamW({path}, {device})" for path in ("fused", "foreach", "for-loop")}


def _register_runners(device: str) -> None:
    """The harness's runners, on ``device``, under their own names (the CPU names stay the CPU runners)."""
    import torch

    from jax_impl import _cuda_rounding

    impl = implementations
    for path, name in _device_names(device).items():
        impl.IMPLEMENTATIONS.setdefault(
            name, lambda h, p, name=name, path=path: impl.TorchRunner(name, h, p, cls=torch.optim.AdamW, path=path,
                                                                      device=device))
    for candidate in _cuda_rounding.candidates():
        name = f"jax_impl[{candidate.label()}]"
        impl.IMPLEMENTATIONS.setdefault(
            name, lambda h, p, name=name, c=candidate: impl.JaxRunner(name, h, p, kind="exact", rounding=c))
    impl.IMPLEMENTATIONS.setdefault("reference(torch-cuda emulation)",
                                    lambda h, p: CudaEmulationRunner("reference(torch-cuda emulation)", h, p))


class CudaEmulationRunner(implementations.Runner):
    """crosscheck.reference.torch_cuda_step (NumPy, exact FMAs): the CUDA model, independent of XLA."""

    def __init__(self, name, hyper, params, contraction=("fma", "fma-first", "fma-first")):
        super().__init__(name, hyper)
        self.np_dtype = implementations.DTYPES[hyper.dtype][0]
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
    from crosscheck import cli, report
    from jax_impl import _cuda_rounding

    _register_runners(settings.device)
    names = _device_names(settings.device)
    baseline = names["fused"]
    impls = ["jax_impl", names["foreach"], names["for-loop"], "optax.adamw"]
    if settings.dry_run:  # on the CPU "jax_impl" is the CPU model: run the CUDA model's plumbing too
        impls.append(f"jax_impl[{_cuda_rounding.CudaRounding().label()}]")
    # First the candidates (which model torch's kernel is), then the suite with the default and, if the
    # default is not bitwise, the candidate that is.
    candidates = _contraction_candidates(settings, clock, baseline)
    partial["contraction"] = candidates
    bias = _bias_corrections(settings)
    partial["bias_corrections"] = bias
    best = candidates["bitwise_in_every_dtype"]
    if not settings.dry_run and best and not candidates["model_bitwise"]:
        impls.append(best[0])
        settings.rounding = next(c for c in _cuda_rounding.candidates() if f"jax_impl[{c.label()}]" == best[0])
    cases = list(cli.SUITE)
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
        _say(f"parity {k + 1}/{len(cases)}: {case.name} ({case.steps} steps)")
        result = cli.run_case(case, impls, baseline, progress=settings.progress)
        results.append(result)
        s = result.summary[f"jax_impl vs {baseline}"]
        rows.append({"case": case.name, "status": "run", "bitwise": s["bitwise"], "max_ulps": s["max_ulps"],
                     "first_mismatch": s["first_mismatch"], "drift": s["drift"],
                     "peers": {pair: {"bitwise": v["bitwise"], "max_ulps_param": v["max_ulps"]["param"]}
                               for pair, v in result.summary.items() if not pair.startswith("jax_impl vs")}})
    if results:
        report.write(results, out / "parity")
    bitwise = all(r.get("bitwise", False) for r in rows if r["status"] == "run")
    complete = all(r["status"] == "run" for r in rows)
    # In a dry run the baseline is torch's CPU kernel: the CUDA candidates are run (plumbing), not judged.
    model_ok = candidates["model_bitwise"] or settings.dry_run
    status = "pass" if bitwise and complete and model_ok else ("timeout" if not complete else "mismatch")
    return {"status": status, "baseline": baseline, "cases": rows, "contraction": candidates,
            "bias_corrections": bias, "rounding_for_later_parts": str(settings.rounding), "files": ["parity/report.json", "parity/report.md", "parity/trajectories.png"]}


def _contraction_candidates(settings: Settings, clock: Clock, baseline: str) -> dict:
    """Each CudaRounding (and the NumPy emulation) re-synced to torch every step: which are bitwise, per dtype."""
    from crosscheck import cli
    from jax_impl import _cuda_rounding

    candidates = _cuda_rounding.candidates()
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
        case = cli.Case(f"contraction candidates, {dtype}", grads="dynamic-range", steps=settings.candidate_steps,
                        hyper=dataclasses.replace(hyper, dtype=dtype), mode="resync", x64=x64)
        _say(f"parity: {len(names)} contraction candidates, {dtype}")
        result = cli.run_case(case, names, baseline, progress=settings.progress)
        table[dtype] = {name: {"bitwise": result.summary[f"{name} vs {baseline}"]["bitwise"],
                               "min_bitwise_fraction": result.summary[f"{name} vs {baseline}"][
                                   "min_bitwise_fraction"]["param"],
                               "max_ulps_param": result.summary[f"{name} vs {baseline}"]["max_ulps"]["param"]}
                        for name in names}
    run_tables = [t for t in table.values() if "status" not in t]
    bitwise_everywhere = [name for name in names if run_tables and all(t[name]["bitwise"] for t in run_tables)]
    default = f"jax_impl[{_cuda_rounding.CudaRounding().label()}]"
    return {"by_dtype": table, "bitwise_in_every_dtype": bitwise_everywhere,
            "default_candidate": default, "model_bitwise": default in bitwise_everywhere,
            "note": "two kernel generations: 'double' (hyperparameters as double) and 'opmath' (pytorch#154069: "
                    "opmath_t arithmetic, explicit FMAs); within 'double', float32/bfloat16 results rarely depend "
                    "on the contraction (the double results differ in their last bit): float64 decides"}


def _bias_corrections(settings: Settings) -> dict:
    """The device's pow (the kernel's) against the host's, rounded to float32 as the kernel rounds them."""
    import torch

    from jax_impl import _cuda_rounding

    steps = 10_000 if settings.dry_run else 1_000_000
    rows = {}
    for b1, b2 in ((0.9, 0.999), (0.95, 0.98), (0.9, 0.99999)):
        t = torch.arange(1, steps + 1, dtype=torch.float32, device=settings.device).to(torch.float64)
        beta1 = torch.full_like(t, b1)
        beta2 = torch.full_like(t, b2)
        device_bc1 = (1 - torch.pow(beta1, t)).to(torch.float32).cpu().numpy()
        device_bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, t)).to(torch.float32).cpu().numpy()
        host_bc1, host_bc2_sqrt = _cuda_rounding.host_bias_corrections(b1, b2, steps)
        rows[f"double pow, b1={b1}, b2={b2}"] = _differing(steps, device_bc1, host_bc1, device_bc2_sqrt,
                                                           host_bc2_sqrt)
        # The opmath kernel: pow_(float, float), i.e. CUDA's powf, and float32 arithmetic after it.
        t32 = torch.arange(1, steps + 1, dtype=torch.float32, device=settings.device)
        beta1_32, beta2_32 = torch.full_like(t32, b1), torch.full_like(t32, b2)
        device_bc1 = (1 - torch.pow(beta1_32, t32)).cpu().numpy()
        device_bc2_sqrt = torch.sqrt(1 - torch.pow(beta2_32, t32)).cpu().numpy()
        host_bc1, host_bc2_sqrt = _cuda_rounding.float32_bias_corrections(b1, b2, steps)
        rows[f"float pow, b1={b1}, b2={b2}"] = _differing(steps, device_bc1, host_bc1, device_bc2_sqrt,
                                                          host_bc2_sqrt)
    return rows


def _differing(steps, device_bc1, host_bc1, device_bc2_sqrt, host_bc2_sqrt) -> dict:
    differ1 = np.flatnonzero(device_bc1.view(np.int32) != host_bc1.view(np.int32)) + 1
    differ2 = np.flatnonzero(device_bc2_sqrt.view(np.int32) != host_bc2_sqrt.view(np.int32)) + 1
    return {"steps": steps, "bc1_steps_differing": int(differ1.size), "bc1_first": differ1[:10].tolist(),
            "bc2_sqrt_steps_differing": int(differ2.size), "bc2_sqrt_first": differ2[:10].tolist()}


# --- (b) step time ------------------------------------------------------------------------------------------

def _benchmark_module(name: str):
    """benchmarks/<name>.py of this source checkout (benchmarks/ is not a package)."""
    path = REPO / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the gpu command runs from a source checkout)")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # train_step.py imports step_time by name
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


STEP_TIME_IMPLS = ("jax_impl.adamw", "jax_impl.adamw[xla; torch-cpu rounding]", "optax.adamw",
                   "torch.optim.AdamW(fused)", "torch.optim.AdamW(foreach)")


def part_step_time(settings: Settings, out: Path, clock: Clock, partial: dict) -> dict:
    step_time = _benchmark_module("step_time")
    impls = list(STEP_TIME_IMPLS) + [step_time.COPY]
    rows, skipped = [], []
    partial.update({"rows": rows, "skipped": skipped})
    for n in settings.sizes:
        for layout in ("one", "many"):
            if clock.expired():
                skipped.append({"layout": layout, "params": n, "why": "budget"})
                continue
            groups = _memory_groups(n, impls, step_time.COPY, settings)
            for group in groups:
                _say(f"step_time: {layout} layout, {n:.0e} params: {', '.join(group)}")
                try:
                    rows += step_time.run(settings.device if settings.device == "cpu" else "gpu", [n], [layout],
                                          group, "float32", settings.repeats if n < 10**9 else 5, progress=False,
                                          leaves=settings.leaves)
                except Exception as err:  # noqa: BLE001  -- e.g. out of memory at 1e9: the row says so
                    skipped.append({"layout": layout, "params": n, "impls": group,
                                    "why": f"{type(err).__name__}: {str(err)[:300]}"})
                finally:
                    gc.collect()
                    _free_device_memory(settings)
    step_time.plot(rows, out / "step_time.png") if rows else None
    return {"status": "pass" if not any(s["why"] == "budget" for s in skipped) else "timeout", "rows": rows,
            "skipped": skipped, "files": ["step_time.png"] if rows else [],
            "note": "fraction_of_copy_bandwidth: 28 B/param over the device-to-device copy's bandwidth, "
                    "measured in the same interleaved rounds"}


def _memory_groups(n: int, impls: list[str], copy: str, settings: Settings) -> list[list[str]]:
    """All implementations in one interleaved group if they fit in the device memory, else each with the copy."""
    if settings.device != "cuda":
        return [impls]
    import torch

    free, _ = torch.cuda.mem_get_info()
    # params, grads, two moments (16 B/param) per implementation, foreach's temporaries, the bandwidth kernels.
    need = n * (24 * (len(impls) - 1) + 12 + 8)
    if need < 0.8 * free:
        return [impls]
    return [[name, copy] for name in impls if name != copy]


# --- (c) training step --------------------------------------------------------------------------------------

def _transformer_pair(vocab: int, width: int, depth: int, heads: int, seq: int):
    """A small pre-norm transformer language model in torch and in Flax NNX (same shapes; timing only)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    class TorchLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.pos = torch.nn.Parameter(torch.zeros(seq, width))
            layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                                     norm_first=True, activation="gelu")
            self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = torch.nn.LayerNorm(width)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, tokens):
            mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
            h = self.blocks(self.embed(tokens) + self.pos, mask=mask, is_causal=True)
            return self.head(self.norm(h))

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1, self.norm2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
            self.up, self.down = nnx.Linear(width, 4 * width, rngs=rngs), nnx.Linear(4 * width, width, rngs=rngs)

        def __call__(self, h, mask):
            h = h + self.attention(self.norm1(h), mask=mask)
            return h + self.down(jax.nn.gelu(self.up(self.norm2(h)), approximate=False))

    class FlaxLM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.pos = nnx.Param(jnp.zeros((seq, width)))
            self.blocks = nnx.List([Block(rngs) for _ in range(depth)]) if hasattr(nnx, "List") else \
                [Block(rngs) for _ in range(depth)]
            self.norm = nnx.LayerNorm(width, rngs=rngs)
            self.head = nnx.Linear(width, vocab, rngs=rngs)

        def __call__(self, tokens):
            mask = nnx.make_causal_mask(tokens)
            h = self.embed(tokens) + self.pos[...][None]  # explicit batch axis: no rank promotion
            for block in self.blocks:
                h = block(h, mask)
            return self.head(self.norm(h))

    torch.manual_seed(0)
    return TorchLM(), FlaxLM(nnx.Rngs(0))


def part_train_step(settings: Settings, out: Path, clock: Clock, partial: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from flax import nnx

    import jax_impl
    from crosscheck import models

    step_time = _benchmark_module("step_time")
    device = settings.device
    rows, errors = [], []
    partial.update({"rows": rows, "errors": errors})
    small = settings.dry_run
    # (name, batch, torch model, flax model, torch input, flax input, labels, loss kind)
    workloads = []
    for batch in ((8,) if small else (128, 512)):
        workloads.append(("SimpleCNN", batch))
    workloads.append(("transformer", 2 if small else 32))
    for model_name, batch in workloads:
        if clock.expired():
            errors.append({"model": model_name, "batch": batch, "why": "budget"})
            continue
        rng = np.random.default_rng(0)
        if model_name == "SimpleCNN":
            torch_model, flax_model = models.simple_cnn_pair(0)
            x = rng.uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32)
            y = rng.integers(0, 10, batch)
            torch_x, flax_x = torch.from_numpy(x).to(device), jnp.asarray(models.nchw_to_nhwc(x))
            torch_y, flax_y = torch.from_numpy(y).to(device), jnp.asarray(y)
        else:
            vocab, width, depth, heads, seq = (64, 32, 2, 2, 16) if small else (8192, 512, 6, 8, 256)
            torch_model, flax_model = _transformer_pair(vocab, width, depth, heads, seq)
            tokens = rng.integers(0, vocab, (batch, seq))
            labels = rng.integers(0, vocab, (batch, seq))
            torch_x, flax_x = torch.from_numpy(tokens).to(device), jnp.asarray(tokens)
            torch_y, flax_y = torch.from_numpy(labels).to(device), jnp.asarray(labels)
        torch_model = torch_model.to(device)
        n_params = sum(p.numel() for p in torch_model.parameters())
        steps: dict[str, Callable[[], None]] = {}
        compile_s: dict[str, float] = {}

        def torch_step_fn(model, optimizer):
            def step():
                optimizer.zero_grad(set_to_none=True)
                logits = model(torch_x)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch_y.reshape(-1))
                loss.backward()
                optimizer.step()
                if device == "cuda":
                    torch.cuda.synchronize()
            return step

        fused = True
        eager_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, fused=fused)
        steps["torch eager + AdamW(fused)"] = torch_step_fn(torch_model, eager_opt)
        try:
            if settings.dry_run:
                raise RuntimeError("not tried in a dry run (minutes of CPU compilation)")
            import copy

            compiled_model = copy.deepcopy(torch_model)
            compiled_opt = torch.optim.AdamW(compiled_model.parameters(), lr=1e-4, fused=fused)
            compiled_step = torch_step_fn(torch.compile(compiled_model), compiled_opt)
            started = time.perf_counter()
            compiled_step()
            compile_s["torch.compile + AdamW(fused)"] = time.perf_counter() - started
            steps["torch.compile + AdamW(fused)"] = compiled_step
        except Exception as err:  # noqa: BLE001  -- torch.compile needs a compiler toolchain; recorded
            errors.append({"model": model_name, "batch": batch, "what": "torch.compile",
                           "why": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"})

        graphdef, state = nnx.split(flax_model, nnx.Param)
        params = jax.tree.map(jnp.copy, nnx.as_pure(state)) if hasattr(nnx, "as_pure") else state
        tx = jax_impl.adamw(1e-4)
        holder = {"params": params, "opt": tx.init(params)}

        def loss_fn(p, x, y):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits.reshape(-1, logits.shape[-1]),
                                                                   y.reshape(-1)).mean()

        def train(p, opt, x, y):
            grads = jax.grad(loss_fn)(p, x, y)
            return jax_impl.apply_exact(tx, grads, opt, p)

        jitted = jax.jit(train, donate_argnums=(0, 1))
        started = time.perf_counter()
        compiled = jitted.lower(holder["params"], holder["opt"], flax_x, flax_y).compile()
        compile_s["Flax (XLA) + jax_impl.adamw"] = time.perf_counter() - started

        def flax_step():
            holder["params"], holder["opt"] = compiled(holder["params"], holder["opt"], flax_x, flax_y)
            jax.block_until_ready(holder["params"])

        steps["Flax (XLA) + jax_impl.adamw"] = flax_step
        _say(f"train_step: {model_name}, batch {batch}, {n_params:.2e} params: {', '.join(steps)}")
        times = step_time.interleaved(steps, settings.repeats)
        medians = {k: float(np.median(v)) for k, v in times.items()}
        base = medians["torch eager + AdamW(fused)"]
        for name, t in times.items():
            q1, q3 = np.percentile(t, [25, 75])
            rows.append({"model": model_name, "batch": batch, "params": n_params, "implementation": name,
                         "ms": 1e3 * medians[name], "iqr_ms": 1e3 * float(q3 - q1),
                         "vs_torch_eager": medians[name] / base, "compile_s": compile_s.get(name)})
        del steps, holder, torch_model, flax_model, eager_opt
        gc.collect()
        _free_device_memory(settings)
    status = "pass" if not any(e.get("why") == "budget" for e in errors) else "timeout"
    return {"status": status, "rows": rows, "errors": errors}


# --- (d) CIFAR-10 shared gradients --------------------------------------------------------------------------

def part_cifar10(settings: Settings, out: Path, clock: Clock, partial: dict) -> dict:
    import jax
    import torch
    from flax import nnx

    import jax_impl
    from crosscheck import cifar10, convert, models
    from crosscheck.metrics import distance
    from crosscheck.training import FlaxRun

    try:
        data = cifar10.load(settings.data_dir)
    except (cifar10.DataError, ValueError, OSError) as err:
        message = f"no CIFAR-10 data ({err}); pass --data-dir or set ${cifar10.ENV_VAR}"
        _say(f"cifar10: skipped: {message}")
        return {"status": "skipped", "why": message}
    device = settings.device
    batch, lr, weight_decay = 32, 1e-3, 1e-2
    max_steps = settings.cifar_steps or 10**9
    torch_model, flax_model = models.simple_cnn_pair(0)
    layers = models.simple_cnn_layers(torch_model)
    names = [n for n, _ in torch_model.named_parameters()]
    # torch_layout matters only for the CPU model (its scalar tail); the CUDA model ignores it.
    layout = nnx.State(convert.torch_layout(torch_model, layers))
    torch_model = torch_model.to(device)
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    flax = FlaxRun("jax_impl.adamw", flax_model, jax_impl.adamw(lr, weight_decay=weight_decay, torch_layout=layout,
                                                                rounding=settings.rounding), layers, names)
    steps, first_mismatch, worst, losses = 0, None, 0, []
    result = {"device": device, "jax_backend": jax.default_backend(), "batch": batch, "lr": lr,
              "weight_decay": weight_decay, "data": data.source, "rounding": str(settings.rounding)}
    partial.update(result)
    epoch = 0
    while not clock.expired() and steps < max_steps and epoch < 2:
        for x, y in cifar10.batches(data.train_images, data.train_labels, batch, seed=0, epoch=epoch):
            if clock.expired() or steps >= max_steps:
                break
            torch_model.train()
            optimizer.zero_grad()
            loss = models.torch_cross_entropy(torch_model(torch.from_numpy(x).to(device)),
                                              torch.from_numpy(y).to(device))
            loss.backward()
            grads = {n: p.grad.detach().cpu() for n, p in torch_model.named_parameters()}
            optimizer.step()
            flax.step_with(grads)
            steps += 1
            losses.append(loss.item())
            ours = flax.params_torch()
            ulps = max(int(distance(ours[n], p.detach().cpu().numpy()).max_ulps)
                       for n, p in torch_model.named_parameters())
            worst = max(worst, ulps)
            if ulps and first_mismatch is None:
                first_mismatch = steps
            partial.update({"steps": steps, "max_ulps": worst, "first_mismatch_step": first_mismatch})
        epoch += 1
    result.update({"steps": steps, "epochs_started": epoch, "max_ulps": worst, "first_mismatch_step": first_mismatch,
                   "final_loss": losses[-1] if losses else None, "budget_ended_run": clock.expired()})
    result["status"] = "pass" if worst == 0 and steps > 0 else "mismatch"
    return result


# --- report -------------------------------------------------------------------------------------------------

def write_report(report: dict, out: Path) -> list[Path]:
    from crosscheck.report import strict_json, write_text

    out = Path(out)
    json_path, md_path = out / "report.json", out / "report.md"
    write_text(json_path, strict_json(report))
    write_text(md_path, markdown(report))
    paths = [json_path, md_path]
    summary_png = out / "summary.png"
    _plot_summary(report, summary_png)
    paths.append(summary_png)
    return paths


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU report{' (DRY RUN on the CPU: plumbing only, no GPU figures)' if report['dry_run'] else ''}",
             "", ", ".join(f"{k} {v}" for k, v in env.items()),
             f"; budget {report['budget_s']:.0f} s, took {report.get('seconds', 0):.0f} s. "
             f"Overall: **{'pass' if report.get('passed') else 'FAIL'}**.", "",
             "| part | status | seconds (budget) | note |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        note = part.get("error") or part.get("why") or ""
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} ({part.get('budget_s', 0):.0f}) "
                     f"| {str(note)[:200]} |")
    for section in (_md_parity, _md_step_time, _md_train_step, _md_cifar10):
        try:
            lines += section(report)
        except Exception as err:  # noqa: BLE001  -- a part's odd result must not cost the whole report
            lines += ["", f"({section.__name__[4:]}: could not render its result: {type(err).__name__}: {err}; "
                          "see report.json)"]
    return "\n".join(lines) + "\n"


def _md_parity(report: dict) -> list[str]:
    lines: list[str] = []
    parity = report["parts"].get("parity")
    if parity and "cases" in parity:
        lines += ["", f"## (a) Parity: jax_impl.adamw vs {parity.get('baseline', 'torch fused')}", "",
                  "| case | bitwise | max ulps (param / m / v) | drift | first mismatch |", "|---|---|---|---|---|"]
        for row in parity["cases"]:
            if row["status"] != "run":
                lines.append(f"| {row['case']} | {row['status']} | | | |")
                continue
            u = row["max_ulps"]
            lines.append(f"| {row['case']} | {'**yes**' if row['bitwise'] else 'no'} | {u['param']:.0f} / "
                         f"{u['exp_avg']:.0f} / {u['exp_avg_sq']:.0f} | {row['drift']} | {row['first_mismatch']} |")
        lines += ["", "Peers (measured, not judged): see parity/report.md."]
        contraction = parity.get("contraction")
        if contraction:
            dtypes = list(contraction["by_dtype"])
            lines += ["", "### nvcc's FMA contraction: each candidate re-synced to torch every step", "",
                      "| candidate | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
            names = next((list(t) for t in contraction["by_dtype"].values() if "status" not in t), [])
            for name in names:
                cells = []
                for d in dtypes:
                    t = contraction["by_dtype"][d]
                    cells.append(t.get("status", "") if "status" in t else
                                 ("**bitwise**" if t[name]["bitwise"] else
                                  f"{100 * t[name]['min_bitwise_fraction']:.4f}% equal"))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines += ["", f"Bitwise in every dtype: {contraction['bitwise_in_every_dtype'] or 'none'}; "
                          f"the default ({contraction['default_candidate']}) "
                          f"{'is' if contraction['model_bitwise'] else 'is NOT'} among them. "
                          f"{contraction['note']}."]
        bias = parity.get("bias_corrections")
        if bias:
            lines += ["", "### Bias corrections: device pow vs host pow (rounded to float32)", "",
                      "| betas | steps | bc1 differing | bc2_sqrt differing |", "|---|---|---|---|"]
            for k, v in bias.items():
                lines.append(f"| {k} | {v['steps']} | {v['bc1_steps_differing']} {v['bc1_first'] or ''} | "
                             f"{v['bc2_sqrt_steps_differing']} {v['bc2_sqrt_first'] or ''} |")
    return lines


def _md_step_time(report: dict) -> list[str]:
    lines: list[str] = []
    st = report["parts"].get("step_time")
    if st and st.get("rows"):
        lines += ["", "## (b) Optimizer step time (float32, median of interleaved rounds)", "",
                  "| layout | params | implementation | ms (IQR) | % of copy bandwidth | % of addcmul bandwidth | "
                  "vs fastest peer | compile s |", "|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            frac = r.get("fraction_of_copy_bandwidth")
            lines.append(f"| {r['layout']} ({r['leaves']}) | {r['params']:.0e} | {r['implementation']} | "
                         f"{r['ms']:.3f} ({r['iqr_ms']:.3f}) | {_fmt(None if frac is None else 100 * frac, '.0f')} | "
                         f"{100 * r['fraction_of_bandwidth']:.0f} | {r['vs_fastest_peer']:.2f}x | "
                         f"{_fmt(r['compile_s'], '.2f')} |")
        bw = sorted({(r["layout"], r["params"], r.get("copy_bandwidth_gb_per_s")) for r in st["rows"]},
                    key=lambda x: (x[0], x[1]))
        lines += ["", "Device-to-device copy bandwidth (GB/s): "
                  + ", ".join(f"{layout} {n:.0e}: {_fmt(b, '.0f')}" for layout, n, b in bw)]
        for s in st.get("skipped", []):
            lines.append(f"- not measured: {s}")
    return lines


def _md_train_step(report: dict) -> list[str]:
    lines: list[str] = []
    tr = report["parts"].get("train_step")
    if tr and tr.get("rows"):
        lines += ["", "## (c) Training step (forward + backward + AdamW)", "",
                  "| model | batch | params | implementation | ms (IQR) | vs torch eager | compile s |",
                  "|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['params']:.2e} | {r['implementation']} | "
                         f"{r['ms']:.2f} ({r['iqr_ms']:.2f}) | {r['vs_torch_eager']:.2f}x | "
                         f"{_fmt(r['compile_s'], '.1f')} |")
        for e in tr.get("errors", []):
            lines.append(f"- {e}")
    return lines


def _md_cifar10(report: dict) -> list[str]:
    lines: list[str] = []
    cf = report["parts"].get("cifar10")
    if cf and cf.get("status") not in (None, "skipped") and "steps" in cf:
        lines += ["", "## (d) CIFAR-10, shared gradients (torch fused CUDA AdamW vs jax_impl.adamw)", "",
                  f"{cf['steps']} steps (batch {cf['batch']}), max ulps over all params and steps: {cf['max_ulps']}, "
                  f"first mismatching step: {cf['first_mismatch_step']}; data: {cf.get('data')}."]
    return lines


def _plot_summary(report: dict, path: Path) -> None:
    """Step time against params per implementation and layout (or a note when nothing was timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crosscheck.report import _atomic_write

    rows = (report["parts"].get("step_time") or {}).get("rows") or []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if rows:
        for name in dict.fromkeys(r["implementation"] for r in rows):
            for layout, style in (("one", "-"), ("many", "--")):
                points = sorted((r["params"], r["ms"]) for r in rows
                                if r["implementation"] == name and r["layout"] == layout)
                if points:
                    ax.plot(*zip(*points), style, marker="o", lw=1, label=f"{name} ({layout})")
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms / step",
               title="AdamW step time" + (" (dry run, CPU)" if report["dry_run"] else ""))
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "no step times measured", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
