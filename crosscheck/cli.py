"""``python -m crosscheck [trajectory ...]``: parse arguments, run the checks, write the report.

Exit status: 0 when every check passes, 1 on a mismatch (the first failing
step, leaf and element are printed), 2 on bad usage or input (arguments, data
files, an ``--out`` that cannot be written: checked before the run starts; a
report that cannot be written at the end, the previous one left as it was),
130 when interrupted (Ctrl-C or SIGTERM: one line, no report written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from crosscheck.common import dtypes, interrupt, report
from crosscheck.common.arguments import directory, non_negative_int
from crosscheck.trajectory import implementations
from crosscheck.trajectory import report as trajectory_report
from crosscheck.trajectory import sources
from crosscheck.trajectory.suite import DEFAULT_IMPLS, SUITE, Case, run_case


def _finish(results, out: Path | None) -> int:
    print(trajectory_report.markdown(results))
    if out is not None:
        with report.report_errors(out):
            paths = trajectory_report.write(results, out)
        print("report: " + ", ".join(str(p) for p in paths.values()))
    failed = [(r.case, pair, s) for r in results for pair, s in r.summary.items() if not s["pass"]]
    for case, pair, s in failed:
        where = (f"first NaN/inf: {s['first_nonfinite']}" if s.get("first_nonfinite")
                 else f"first differing element: {s['first_mismatch']}")
        print(f"MISMATCH in {case!r}: {pair}: {s['why']}; {where}", file=sys.stderr)
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m crosscheck", formatter_class=formatter,
                                     description="Check that AdamW implementations agree, step by step.",
                                     epilog="Exit status: 0 pass, 1 mismatch, 2 usage or input error, 130 interrupted.")
    parser.add_argument("--out", type=directory, default=Path("crosscheck-report"),
                        help="directory for report.json, report.md and the PNG (default: %(default)s; cifar10, "
                             "schedules, port, recipes and gpu write to their subfolder of that name when it is left "
                             "at the default)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (bars are shown only when stderr is a terminal)")
    sub = parser.add_subparsers(dest="command")

    def add_common(command: argparse.ArgumentParser) -> None:
        # The same options after the subcommand; SUPPRESS keeps a value given before it.
        command.add_argument("--out", type=directory, default=argparse.SUPPRESS,
                             help="directory for the report (as before the subcommand)")
        command.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bar (as before the subcommand)")

    suite = sub.add_parser("suite", help="the built-in suite (the default command)", formatter_class=formatter,
                           description="Ten short trajectories covering every option and dtype.")
    add_common(suite)
    t = sub.add_parser("trajectory", help="one trajectory check with the options given", formatter_class=formatter,
                       description="Feed identical gradients to the implementations and compare them with the "
                                   "baseline, step by step, bit for bit.")
    add_common(t)
    t.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                   help="comma-separated implementations to compare with the baseline; choose from: "
                        + ", ".join(name for name in implementations.IMPLEMENTATIONS if name != "reference64"))
    t.add_argument("--baseline", default="torch.AdamW(fused)",
                   help="the implementation every other is compared with (not reference64: the float64 reference "
                        "is compared with every run anyway)")
    t.add_argument("--params", default="flat", choices=[*sources.PARAM_SETS, "model"], help="parameter set")
    t.add_argument("--grads", default="gaussian", choices=[*sources.SYNTHETIC, "model"], help="gradient stream")
    t.add_argument("--steps", type=int, default=500, help="optimizer steps")
    t.add_argument("--dtype", default="float32", choices=list(dtypes.DTYPES), help="parameter dtype")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    t.add_argument("--b1", type=float, default=0.9, help="beta1")
    t.add_argument("--b2", type=float, default=0.999, help="beta2")
    t.add_argument("--eps", type=float, default=1e-8, help="epsilon")
    t.add_argument("--weight-decay", type=float, default=1e-2, help="decoupled weight decay")
    t.add_argument("--amsgrad", action="store_true", help="AMSGrad variant")
    t.add_argument("--maximize", action="store_true", help="maximize instead of minimize")
    t.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="lr schedule (cosine: CosineAnnealingLR over --steps)")
    t.add_argument("--mask", action="store_true", help="no weight decay on biases, norm scales and 0-d leaves")
    t.add_argument("--decay-rounding", choices=["torch", "precise"], default="torch",
                   help="jax_impl's rounding of 1 - lr * weight_decay")
    t.add_argument("--mode", choices=["free", "resync"], default="free",
                   help="free: each trajectory runs on its own; resync: reset to the baseline after each step")
    t.add_argument("--x64", action="store_true", help="enable jax_enable_x64 (float64, exact schedules)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="parameters and gradients")

    from crosscheck.cifar import data as cifar10
    from crosscheck.cifar.parity import MODES, Config

    c = sub.add_parser("cifar10", help="train the seed's SimpleCNN on CIFAR-10 in PyTorch and Flax and compare",
                       formatter_class=formatter,
                       description=f"Data: --data-dir, else ${cifar10.ENV_VAR}, else {cifar10.DEFAULT_DIR}; "
                                   f"a directory holding {cifar10.FOLDER}/ or {cifar10.ARCHIVE}.")
    add_common(c)
    c.add_argument("--data-dir", type=Path, default=None, help="the data directory")
    c.add_argument("--download", action="store_true",
                   help=f"fetch {cifar10.URL} if absent, and verify (md5) an archive already there")
    c.add_argument("--mode", choices=MODES, default=Config.mode,
                   help="independent: each framework trains on its own; shared-grads: torch's gradients for both")
    c.add_argument("--epochs", type=int, default=Config.epochs, help="epochs")
    c.add_argument("--batch-size", type=int, default=Config.batch_size, help="batch size")
    c.add_argument("--lr", type=float, default=Config.lr, help="learning rate")
    c.add_argument("--weight-decay", type=float, default=Config.weight_decay, help="decoupled weight decay")
    c.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (all epochs)")
    c.add_argument("--seed", type=non_negative_int, default=Config.seed,
                   help="initial weights, shuffle and augmentation")
    c.add_argument("--replicas", type=int, default=Config.replicas,
                   help="independent mode: perturbed torch runs forming the noise band (default %(default)s)")
    c.add_argument("--perturbation", type=float, default=Config.perturbation,
                   help="replicas' initial weights are multiplied by 1 + this * N(0,1) (default %(default)g)")
    c.add_argument("--peers", action="store_true", help="also train torch.optim.AdamW and optax.adamw")
    c.add_argument("--augment", action="store_true", help="random crop (padding 4) and horizontal flip, in numpy")
    c.add_argument("--band-factor", type=float, default=Config.band_factor,
                   help="independent mode: allowed gap to torch, in multiples of the replica band")
    c.add_argument("--early-steps", type=int, default=Config.early_steps,
                   help="independent mode: steps over which the losses must agree closely")
    sch = sub.add_parser("schedules", help="torch lr schedulers vs jax_impl.schedules and optax", formatter_class=formatter,
                         description="Every torch lr scheduler against its jax_impl.schedules twin and the nearest "
                                     "optax schedule.")
    add_common(sch)
    sch.add_argument("--steps", type=int, default=10_000, help="update counts compared (at least 200)")
    from crosscheck.gpu import command as gpu
    from crosscheck.port import command as port
    from crosscheck.recipes import training as recipes
    add_common(port.add_parser(sub))
    add_common(recipes.add_parser(sub))
    add_common(gpu.add_parser(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 pass, 1 mismatch, 2 usage or input error, 130 interrupted)."""
    try:
        with interrupt.handling():
            try:
                return _main(argv)
            except report.OutputError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
    except KeyboardInterrupt as err:  # also one arriving as the handler is installed or removed
        interrupt.say(err)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Frames of a progress bar ('\r') only belong on a terminal, not in a log file.
    progress = not args.no_progress and sys.stderr.isatty()
    default_out = args.out == Path("crosscheck-report")
    if args.command in ("schedules", "cifar10", "port", "recipes", "gpu") and default_out:
        args.out = Path("crosscheck-report") / args.command
    report.check_output_dir(args.out)  # before the run, every command: an unwritable --out must not cost the results
    if args.command == "port":
        from crosscheck.port import command as port
        return port.run(args)
    if args.command == "recipes":
        from crosscheck.recipes import training as recipes
        return recipes.run(args)
    if args.command == "schedules":
        from crosscheck.recipes import schedules
        out = args.out
        try:
            rows, passed = schedules.run(args.steps, out)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(schedules.markdown(rows))
        print(f"report: {out}/report.json, report.md, schedules.png")
        return 0 if passed else 1
    if args.command == "gpu":
        from crosscheck.gpu import command as gpu
        return gpu.run(args)
    if args.command == "cifar10":
        from crosscheck.cifar.command import main_run
        from crosscheck.cifar.parity import Config

        cfg = Config(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                     mode=args.mode, max_steps=args.max_steps, seed=args.seed, replicas=args.replicas,
                     perturbation=args.perturbation, peers=args.peers, augment=args.augment,
                     band_factor=args.band_factor, early_steps=args.early_steps)
        out = args.out
        return main_run(cfg, args.data_dir, args.download, out, progress)
    try:
        if args.command == "trajectory":
            impls = [name.strip() for name in args.impls.split(",") if name.strip()]
            unknown = [name for name in impls + [args.baseline] if name not in implementations.IMPLEMENTATIONS]
            if unknown:
                parser.error(f"unknown implementation(s) {unknown}; choose from {list(implementations.IMPLEMENTATIONS)}")
            if args.baseline == "reference64":
                parser.error("--baseline reference64: the float64 reference is compared with every run already; "
                             "choose an implementation as the baseline, e.g. torch.AdamW(fused)")
            if not [name for name in impls if name not in (args.baseline, "reference64")]:
                parser.error(f"--impls {args.impls!r}: nothing to compare with the baseline {args.baseline}; "
                             "name at least one other implementation")
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
