"""``python -m crosscheck [trajectory ...]``: parse arguments, run the checks, write the report.

Exit status: 0 when every check passes, 1 on a mismatch (the first failing
step, leaf and element are printed), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax

from crosscheck import implementations, report, sources, trajectory

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


def _finish(results, out: Path | None) -> int:
    print(report.markdown(results))
    if out is not None:
        paths = report.write(results, out)
        print("report: " + ", ".join(str(p) for p in paths.values()))
    failed = [(r.case, pair, s) for r in results for pair, s in r.summary.items() if not s["pass"]]
    for case, pair, s in failed:
        print(f"MISMATCH in {case!r}: {pair}: {s['why']}; first differing element: {s['first_mismatch']}",
              file=sys.stderr)
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crosscheck",
                                     description="Check that AdamW implementations agree, step by step.")
    parser.add_argument("--out", type=Path, default=Path("crosscheck-report"),
                        help="directory for report.json, report.md and the PNG (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="command")
    suite = sub.add_parser("suite", help="the built-in suite (the default command)")
    suite.add_argument("--out", type=Path, default=argparse.SUPPRESS)
    t = sub.add_parser("trajectory", help="one trajectory check with the options given")
    t.add_argument("--out", type=Path, default=argparse.SUPPRESS)
    t.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                   help="comma-separated implementations (default: all): " + ", ".join(implementations.IMPLEMENTATIONS))
    t.add_argument("--baseline", default="torch.AdamW(fused)")
    t.add_argument("--params", default="flat", choices=[*sources.PARAM_SETS, "model"])
    t.add_argument("--grads", default="gaussian", choices=[*sources.SYNTHETIC, "model"])
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--dtype", default="float32", choices=list(implementations.DTYPES))
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--b1", type=float, default=0.9)
    t.add_argument("--b2", type=float, default=0.999)
    t.add_argument("--eps", type=float, default=1e-8)
    t.add_argument("--weight-decay", type=float, default=1e-2)
    t.add_argument("--amsgrad", action="store_true")
    t.add_argument("--maximize", action="store_true")
    t.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    t.add_argument("--mask", action="store_true", help="no weight decay on biases, norm scales and 0-d leaves")
    t.add_argument("--decay-rounding", choices=["torch", "precise"], default="torch")
    t.add_argument("--mode", choices=["free", "resync"], default="free")
    t.add_argument("--x64", action="store_true", help="enable jax_enable_x64 (float64, exact schedules)")
    t.add_argument("--seed", type=int, default=0)

    from crosscheck import cifar10
    from crosscheck.cifar_parity import MODES, Config

    c = sub.add_parser("cifar10", help="train the seed's SimpleCNN on CIFAR-10 in PyTorch and Flax and compare",
                       description=f"Data: --data-dir, else ${cifar10.ENV_VAR}, else {cifar10.DEFAULT_DIR}; "
                                   f"a directory holding {cifar10.FOLDER}/ or {cifar10.ARCHIVE}.")
    c.add_argument("--out", type=Path, default=argparse.SUPPRESS)
    c.add_argument("--data-dir", type=Path, default=None)
    c.add_argument("--download", action="store_true", help=f"fetch {cifar10.URL} (md5-checked) if absent")
    c.add_argument("--mode", choices=MODES, default=Config.mode)
    c.add_argument("--epochs", type=int, default=Config.epochs)
    c.add_argument("--batch-size", type=int, default=Config.batch_size)
    c.add_argument("--lr", type=float, default=Config.lr)
    c.add_argument("--weight-decay", type=float, default=Config.weight_decay)
    c.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (all epochs)")
    c.add_argument("--seed", type=int, default=Config.seed, help="initial weights, shuffle and augmentation")
    c.add_argument("--replicas", type=int, default=Config.replicas,
                   help="independent mode: perturbed torch runs forming the noise band (default %(default)s)")
    c.add_argument("--perturbation", type=float, default=Config.perturbation,
                   help="replicas' initial weights are multiplied by 1 + this * N(0,1) (default %(default)g)")
    c.add_argument("--peers", action="store_true", help="also train torch.optim.AdamW and optax.adamw")
    c.add_argument("--augment", action="store_true", help="random crop (padding 4) and horizontal flip, in numpy")
    c.add_argument("--band-factor", type=float, default=Config.band_factor)
    c.add_argument("--early-steps", type=int, default=Config.early_steps)
    sch = sub.add_parser("schedules", help="torch lr schedulers vs jax_impl.schedules and optax")
    sch.add_argument("--out", type=Path, default=argparse.SUPPRESS)
    sch.add_argument("--steps", type=int, default=10_000)
    from crosscheck import gpu

    gpu.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.command == "schedules":
        from crosscheck import schedules

        out = args.out if args.out != Path("crosscheck-report") else Path("crosscheck-report/schedules")
        try:
            rows, passed = schedules.run(args.steps, out)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(schedules.markdown(rows))
        print(f"report: {out}/report.json, report.md, schedules.png")
        return 0 if passed else 1
    if args.command == "gpu":
        from crosscheck import gpu

        return gpu.run(args)
    if args.command == "cifar10":
        from crosscheck.cifar_parity import Config, main_run

        cfg = Config(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                     mode=args.mode, max_steps=args.max_steps, seed=args.seed, replicas=args.replicas,
                     perturbation=args.perturbation, peers=args.peers, augment=args.augment,
                     band_factor=args.band_factor, early_steps=args.early_steps)
        out = args.out if args.out != Path("crosscheck-report") else Path("crosscheck-report/cifar10")
        return main_run(cfg, args.data_dir, args.download, out, progress)
    try:
        if args.command == "trajectory":
            impls = [name.strip() for name in args.impls.split(",") if name.strip()]
            unknown = [name for name in impls + [args.baseline] if name not in implementations.IMPLEMENTATIONS]
            if unknown:
                parser.error(f"unknown implementation(s) {unknown}; choose from {list(implementations.IMPLEMENTATIONS)}")
            if args.steps < 1:
                parser.error(f"--steps must be >= 1, got {args.steps}")
            hyper = implementations.Hyper(
                lr=args.lr, b1=args.b1, b2=args.b2, eps=args.eps, weight_decay=args.weight_decay,
                amsgrad=args.amsgrad, maximize=args.maximize, dtype=args.dtype, decay_rounding=args.decay_rounding,
                schedule=sources.CosineSchedule(args.lr, args.steps) if args.schedule == "cosine" else None)
            # Validate as the optimizers do, so bad values are a usage error, not a traceback.
            import jax_impl

            jax_impl.adamw(args.lr, args.b1, args.b2, args.eps, args.weight_decay)
            case = Case(f"{args.params}/{args.grads}/{args.dtype}", params=args.params, grads=args.grads,
                        steps=args.steps, hyper=hyper, mode=args.mode, mask=args.mask, x64=args.x64, seed=args.seed)
            results = [run_case(case, impls, args.baseline, progress)]
        else:
            started = time.perf_counter()
            results = [run_case(case, progress=progress) for case in SUITE]
            print(f"suite: {len(results)} cases in {time.perf_counter() - started:.0f} s")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _finish(results, args.out)
