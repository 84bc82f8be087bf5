"""Flax 0.12.8's ``tests/nnx/optimizer_test.py`` run with ``jax_impl.adamw`` and ``jax_impl.ExactOptimizer`` swapped in.

The upstream file is not part of this repository.  Put an unmodified copy at
``tests/upstream/flax_nnx_optimizer_test.py.orig`` (or point
``$FLAX_OPTIMIZER_TEST`` at one), from Flax's repository at release 0.12.8
(commit 18f8f311c275d57f46d95e41b15aa97b454754c0, sha256 of the file below)::

    git -C flax show 18f8f311c275d57f46d95e41b15aa97b454754c0:tests/nnx/optimizer_test.py \
        > tests/upstream/flax_nnx_optimizer_test.py.orig

Nothing is fetched at test time; without the copy the tests that use it skip.
The swap, and nothing else: ``optax.adamw(`` becomes ``jax_impl.adamw(`` and
``nnx.Optimizer(`` becomes ``jax_impl.ExactOptimizer(`` (``nnx.ModelAndOptimizer``,
a separate class, and the other optax optimizers stay).  Each replacement must
match a known number of times, so a Flax release that moves the code fails loudly.
``ours_wd`` also passes optax's ``weight_decay=1e-4`` default (ours is torch's 1e-2),
which separates that deliberate difference from everything else.

    PYTHONPATH=. python tests/flax_upstream.py --out /tmp/flax-upstream   # the table, stock vs ours
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import flax

import optax_upstream

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / "tests" / "upstream" / "flax_nnx_optimizer_test.py.orig"
SHA256 = "447b170468a35f4a89319c71899701ed249fab0c95a8841f7d7f4c4200da32df"
VARIANTS = ("stock", "ours", "ours_wd")
# replaced text -> (replacement per variant, how many times upstream has it)
SWAPS = {
    "optax.adamw(": ({"ours": "jax_impl.adamw(", "ours_wd": "functools.partial(jax_impl.adamw, weight_decay=1e-4)("},
                     2),
    "nnx.Optimizer(": ({"ours": "jax_impl.ExactOptimizer(", "ours_wd": "jax_impl.ExactOptimizer("}, 9),
}


def source_path() -> Path:
    return Path(os.environ.get("FLAX_OPTIMIZER_TEST") or DEFAULT_SOURCE)


def upstream_source() -> str | None:
    """The unmodified upstream file, or None when no copy is there; a copy of other contents is an error."""
    path = source_path()
    if not path.is_file():
        return None
    text = path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"flax_upstream: {path} is not Flax 0.12.8's tests/nnx/optimizer_test.py "
                           f"(sha256 {digest}, expected {SHA256})")
    return text


def patched_source(which: str) -> str:
    source = upstream_source()
    if source is None:
        raise FileNotFoundError(f"flax_upstream: no copy of Flax's tests/nnx/optimizer_test.py at {source_path()}")
    if which == "stock":
        return source
    for old, (new, count) in SWAPS.items():
        if source.count(old) != count:
            raise RuntimeError(f"flax_upstream: expected {count} matches of {old!r}, found {source.count(old)} "
                               f"(flax {flax.__version__} moved its test code?)")
        source = source.replace(old, new[which])
    return "import functools  # adamw-crosscheck: the swap\nimport jax_impl  # adamw-crosscheck: the swap\n" + source


def write(which: str, directory: Path) -> Path:
    target = Path(directory) / which / f"{which}_flax_optimizer_test.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(patched_source(which))
    return target


def run(which: str, directory: Path, pytest_args=()) -> dict:
    """Runs one variant in its own pytest process; counts per test method (optax_upstream's rule)."""
    import subprocess

    path = write(which, directory)
    report = path.with_suffix(".xml")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(path.parent),
                    f"--junitxml={report}", str(path), *pytest_args], env=env, cwd=path.parent,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return optax_upstream.outcome_counts(report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch directory for the patched files")
    args = parser.parse_args(argv)
    counts = {which: run(which, args.out) for which in VARIANTS}
    print(f"flax {flax.__version__}: tests/nnx/optimizer_test.py with stock optax/nnx.Optimizer, with jax_impl.adamw + "
          "ExactOptimizer, and with jax_impl.adamw(weight_decay=1e-4) + ExactOptimizer; ran / passed / failed / skipped\n")
    print("| file | stock | jax_impl.adamw + ExactOptimizer | jax_impl.adamw(weight_decay=1e-4) + ExactOptimizer |")
    print("|---|---|---|---|")
    cell = lambda c: f"{c['ran']} / {c['passed']} / {c['failed']} / {c['skipped']}"  # noqa: E731
    print("| tests/nnx/optimizer_test.py | " + " | ".join(cell(counts[w]) for w in VARIANTS) + " |")
    for which in VARIANTS:
        for name in counts[which]["failures"]:
            print(f"failed ({which}): {name}")
    lost = set(counts["stock"]["passed_names"]) - set(counts["ours"]["passed_names"])
    print("\npassed by stock, not by ours:", *(sorted(lost) or ["(none)"]), sep="\n  ")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
