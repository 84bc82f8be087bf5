"""False passes and false alarms of assert_trajectories_match over real models x planted pitfalls.

    PYTHONPATH=$PWD python tests/crosscheck_tests/port/measure_bands.py [--seeds 3] [--steps 10] [--spread 0.3]

For every model of third_party.MODELS, the correct port (at ``--seeds`` seeds) and each planted pitfall run
``--steps`` steps under the rounding-band defaults and under the former fixed tolerances (logit_tol=1e-4,
loss_tol=1e-5, grad_tol=1e-2); prints one row per run and the rates.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

import third_party as tp  # noqa: E402

from crosscheck import assert_trajectories_match, locate_divergence  # noqa: E402

FIXED = {"logit_tol": 1e-4, "loss_tol": 1e-5, "grad_tol": 1e-2}


def run(model, pitfall, seed, steps, tolerances):
    c = tp.case(model, pitfall, seed)
    try:
        assert_trajectories_match(c.torch_model, c.flax_model, c.batches(seed), layers=c.layers, steps=steps,
                                  locate=False, **{**c.options, **tolerances})
        return "PASS", ""
    except AssertionError as err:
        return "FAIL", str(err).splitlines()[0][:110]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default=",".join(tp.MODELS))
    ap.add_argument("--spread", type=float, default=tp.SPREAD, help="std of the weights (the models' init: 0.02)")
    args = ap.parse_args()
    tp.SPREAD = args.spread
    counts = {"band": [0, 0, 0, 0], "fixed": [0, 0, 0, 0]}  # false alarms, correct runs, false passes, wrong runs
    print("| model | port | seed | rounding bands | fixed tolerances | locator | first message (bands) |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        runs = [(None, s) for s in range(args.seeds)] + [(p, 0) for p in tp.PITFALLS[model]]
        for pitfall, seed in runs:
            t = time.time()
            band, message = run(model, pitfall, seed, args.steps, {})
            fixed, _ = run(model, pitfall, seed, args.steps, FIXED)
            c = tp.case(model, pitfall, seed)
            where = locate_divergence(c.torch_model, c.flax_model, c.batch(seed), layers=c.layers)
            verdict = "ok" if where.ok else f"{where.first} [{where.cause}]"
            for key, result in (("band", band), ("fixed", fixed)):
                if pitfall is None:
                    counts[key][1] += 1
                    counts[key][0] += result == "FAIL"
                else:
                    counts[key][3] += 1
                    counts[key][2] += result == "PASS"
            print(f"| {model} | {pitfall or 'correct'} | {seed} | {band} | {fixed} | {verdict} | {message} |"
                  f"  <!-- {time.time() - t:.0f} s -->", flush=True)
    print()
    print("| tolerances | false alarms (correct ports failed) | false passes (wrong ports passed) |")
    print("|---|---|---|")
    for key, (fa, n_ok, fp, n_bad) in counts.items():
        print(f"| {'rounding bands (default)' if key == 'band' else 'fixed: logit 1e-4, loss 1e-5, grad 1e-2'} "
              f"| {fa}/{n_ok} | {fp}/{n_bad} |")


if __name__ == "__main__":
    main()
