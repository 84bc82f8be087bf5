"""optax 0.2.8's own optimizer tests, run against ``jax_impl.adamw`` and against stock ``optax.adamw``.

The test files ship in optax's wheel.  Each is copied, its optimizer list cut
down to one entry (stock: ``optax.adamw``; ours: ``jax_impl.adamw``, in the
same places and with the same arguments) and written to a directory, where
pytest runs it.  The patches are string replacements that must each apply
once, so a new optax release that moves the code fails loudly here.

    PYTHONPATH=. python tests/optax_upstream.py --out /tmp/optax-upstream   # the table, stock vs ours

``tests/jax_impl_tests/test_optax_upstream.py`` runs a subset of the patched suites in CI.
The swap is the only change: the tests read ``jax_impl.adamw``'s state under
optax's own names (``state[0].mu``), as its state is ``optax.adamw``'s tree.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import jax
import optax

OPTAX_DIR = Path(optax.__file__).parent
REPO = Path(__file__).resolve().parents[1]

# suite -> (file in the wheel, the test classes to run: those that take the optimizer under test)
SUITES = {
    "alias_test": ("_src/alias_test.py", ["AliasTest"]),
    "contrib/_common_test": ("contrib/_common_test.py", ["ContribTest"]),
    "float64_test": ("_src/float64_test.py", ["Float64Test"]),
    "sharding_test": ("_src/sharding_test.py", ["ShardingTest"]),
    "tree_utils/_state_utils_test": ("tree_utils/_state_utils_test.py", ["StateUtilsTest"]),
}
# stock: optax.adamw; ours: jax_impl.adamw as it is (torch's weight_decay default 1e-2); ours_wd: with
# optax's default weight_decay=1e-4, which separates that deliberate difference from everything else.
VARIANTS = ("stock", "ours", "ours_wd")
NAMES = {"stock": "adamw", "ours": "jax_impl_adamw", "ours_wd": "jax_impl_adamw"}
OURS = {"ours": "jax_impl.adamw", "ours_wd": "functools.partial(jax_impl.adamw, weight_decay=1e-4)"}

# Cases stock passes and jax_impl.adamw fails on purpose (README, "Drop-in conventions"); absl names cases
# by index: test_explicit_dtype's product is params_dtype x state_dtype over (bfloat16, float32, complex64, None).
DELIBERATE = {
    "alias_test: AliasTest.test_explicit_dtype8": "complex64 params, mu_dtype=bfloat16: refused (optax drops the "
                                                  "moment's imaginary part)",
    "alias_test: AliasTest.test_explicit_dtype9": "complex64 params, mu_dtype=float32: refused (same)",
}


def _replace(source: str, old: str, new: str, *, regex: bool = False) -> str:
    count = len(re.findall(old, source, flags=re.S)) if regex else source.count(old)
    if count != 1:
        raise RuntimeError(f"optax_upstream: expected one match of {old[:60]!r}, found {count} "
                           f"(optax {optax.__version__} moved its test code?)")
    return re.sub(old, lambda _: new, source, flags=re.S) if regex else source.replace(old, new)


def patched_source(suite: str, which: str) -> str:
    """The upstream test file of ``suite`` with ``which`` ("stock" or "ours") as the optimizer under test."""
    source = (OPTAX_DIR / SUITES[suite][0]).read_text()
    name = NAMES[which]
    stock_factory = "optax.adamw" if suite == "sharding_test" else "alias.adamw"  # what each file imports
    factory = "_OURS" if which != "stock" else stock_factory
    source = (f"import functools  # adamw-crosscheck\nimport jax_impl\n_OURS = {OURS.get(which, None)}\n"
              + source)
    if suite == "alias_test":
        # sklearn is used by LBFGSTest only (not run); it is not a dependency of optax's.
        source = _replace(source, "from sklearn import datasets\nfrom sklearn import linear_model\n",
                          "datasets = linear_model = None\n")
        source = _replace(source, r"_OPTIMIZERS_UNDER_TEST = \(\n.*?\n\)\n",
                          f"_OPTIMIZERS_UNDER_TEST = ({{'opt_name': {name!r}, 'opt_kwargs': {{'learning_rate': 1e-1}}}},)\n",
                          regex=True)
        source = _replace(source, "def _get_opt(self: absltest.TestCase, opt_name: str):\n",
                          "def _get_opt(self: absltest.TestCase, opt_name: str):\n"
                          "  if opt_name == 'jax_impl_adamw':\n    return _OURS\n")
        source = _replace(source, "opt_name=('sgd_mom', 'adam', 'adamw'),", f"opt_name=({name!r},),")
        source = _replace(source, "elif opt_name in ['adam', 'adamw']:", "elif opt_name in ['adam', 'adamw', 'jax_impl_adamw']:")
    elif suite == "contrib/_common_test":
        source = _replace(source, r"_MAIN_OPTIMIZERS_UNDER_TEST = \[\n.*?\n\]\nfor optimizer in",
                          f"_MAIN_OPTIMIZERS_UNDER_TEST = [{{'opt_name': {name!r}, 'opt_kwargs': {{'learning_rate': 1e-2}}}}]"
                          "\nfor optimizer in", regex=True)
        # The wrappers are tested with sgd in stock optax: keep them out (they do not take our optimizer).
        source = _replace(source, r"# Testing contributions coded as wrappers\n.*?\n\]\n\n", "", regex=True)
        source = _replace(source, r"_BASE_OPTIMIZERS = \[\n.*?\n\]\n",
                          f"_BASE_OPTIMIZERS = [{{'opt_name': {name!r}, 'opt_kwargs': {{'learning_rate': 1.0}}}}]\n",
                          regex=True)
        source = _replace(source, '  """Get optimizer factory."""\n',
                          '  """Get optimizer factory."""\n  if opt_name == "jax_impl_adamw":\n'
                          '    return _OURS\n')
    elif suite == "float64_test":
        source = _replace(source, r"ALL_MODULES = \[\n.*?\n\]\n",
                          f"ALL_MODULES = [({name!r}, {factory}, {{'learning_rate': 0.1}})]\n", regex=True)
    elif suite == "sharding_test":
        source = _replace(source, r"OPTIMIZERS = \{\n.*?\n\}\n", f"OPTIMIZERS = {{{name!r}: {factory}(1.0)}}\n",
                          regex=True)
        # Upstream compares version strings ('0.10.2' < '0.7.2' is True) and so skips its sharding
        # tests on jax 0.10: compare numerically, for stock and ours alike.
        for version in ("0.7.2", "0.8.1"):
            source = source.replace(f"jax.__version__ < '{version}'",
                                    f"tuple(map(int, jax.__version__.split('.')[:3])) < {tuple(map(int, version.split('.')))}")
    elif suite == "tree_utils/_state_utils_test":
        source = _replace(source, "_inject.inject_hyperparams(alias.adamw)(learning_rate=1e-3)",
                          f"_inject.inject_hyperparams({factory})(learning_rate=1e-3)")
    return source


def write_suite(suite: str, which: str, directory: Path) -> Path:
    """Writes the patched file; returns its path (one directory per (suite, which), so module names do not clash)."""
    target = Path(directory) / which / suite.replace("/", "__") / f"{which}_{suite.replace('/', '_')}.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(patched_source(suite, which))
    return target


def run_suite(suite: str, which: str, directory: Path, pytest_args=()) -> dict:
    """Runs one patched suite in its own pytest process; returns counts and the failing tests' names."""
    path = write_suite(suite, which, directory)
    report = path.with_suffix(".xml")
    selected = [f"{path}::{cls}" for cls in SUITES[suite][1]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(path.parent),
                    f"--junitxml={report}", *selected, *pytest_args], env=env, cwd=path.parent,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return outcome_counts(report)


def outcome_counts(report: Path) -> dict:
    """Per test method (its subtests are extra entries of the same name in the report): failed if any entry
    failed, skipped if every entry was skipped, else passed."""
    outcomes: dict[str, set] = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname').rsplit('.', 1)[-1]}.{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "skipped" if case.find("skipped") is not None else "passed"
        outcomes.setdefault(name, set()).add(outcome)
    counts = {"ran": len(outcomes), "passed": 0, "failed": 0, "skipped": 0, "failures": [], "passed_names": []}
    for name, seen in sorted(outcomes.items()):
        outcome = "failed" if "failed" in seen else "skipped" if seen == {"skipped"} else "passed"
        counts[outcome] += 1
        if outcome == "failed":
            counts["failures"].append(name)
        elif outcome == "passed":
            counts["passed_names"].append(name)
    return counts


def _unify(name: str) -> str:
    return name.replace("jax_impl_adamw", "OPT").replace("adamw", "OPT")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch directory for the patched suites")
    parser.add_argument("--suite", action="append", choices=list(SUITES), help="default: all")
    args = parser.parse_args(argv)
    rows, lost = [], {which: [] for which in VARIANTS[1:]}
    for suite in args.suite or list(SUITES):
        counts = {which: run_suite(suite, which, args.out) for which in VARIANTS}
        rows.append((suite, counts))
        for which in VARIANTS[1:]:
            missing = {_unify(n) for n in counts["stock"]["passed_names"]} - {
                _unify(n) for n in counts[which]["passed_names"]}
            lost[which] += [f"{suite}: {n}" for n in sorted(missing)]
    print(f"optax {optax.__version__}, jax {jax.__version__}: optax's tests with stock optax.adamw, jax_impl.adamw, "
          "and jax_impl.adamw(weight_decay=1e-4); ran / passed / failed / skipped\n")
    print("| suite | stock optax.adamw | jax_impl.adamw | jax_impl.adamw(weight_decay=1e-4) |")
    print("|---|---|---|---|")
    cell = lambda c: f"{c['ran']} / {c['passed']} / {c['failed']} / {c['skipped']}"  # noqa: E731
    for suite, counts in rows:
        print(f"| {suite} | " + " | ".join(cell(counts[which]) for which in VARIANTS) + " |")
    print()
    for suite, counts in rows:
        for which in VARIANTS:
            for name in counts[which]["failures"]:
                print(f"failed ({which}) {suite}: {name}")
    for which in VARIANTS[1:]:
        print(f"\npassed by stock, not by {which}:", *(lost[which] or ["(none)"]), sep="\n  ")
    print("\ndeliberate:", *(f"{k}: {v}" for k, v in DELIBERATE.items()), sep="\n  ")
    return 1 if set(lost["ours_wd"]) - set(DELIBERATE) else 0


if __name__ == "__main__":
    sys.exit(main())
