"""Numerical parity of AdamW and training between PyTorch and JAX/Flax.

The public API is imported on first use, so that ``python -m crosscheck`` can
install its Ctrl-C handler before torch and JAX load.
"""

import sys


def _running_as_main() -> bool:
    """True while ``python -m crosscheck`` imports this package (runpy sets ``argv[0]`` only afterwards)."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = list(getattr(sys, "orig_argv", ()))[1:]
    for i, arg in enumerate(argv):
        if arg == "-m":
            return argv[i + 1:i + 2] == ["crosscheck"]
        if arg.startswith("-m"):
            return arg == "-mcrosscheck"
    return False


if _running_as_main():
    # First: a Ctrl-C or SIGTERM from here on ends the process with status 130 and one line, not a traceback.
    from crosscheck.common import interrupt as _interrupt

    _interrupt.install(at_once=True)
    del _interrupt

import importlib  # noqa: E402

from crosscheck import _moved  # noqa: E402

_API = {
    "Divergence": "crosscheck.port.locate",
    "locate_divergence": "crosscheck.port.locate",
    "ParityReport": "crosscheck.port.parity",
    "assert_trajectories_match": "crosscheck.port.parity",
}

__all__ = ["Divergence", "ParityReport", "assert_trajectories_match", "locate_divergence"]

if not any(isinstance(finder, _moved.Finder) for finder in sys.meta_path):
    sys.meta_path.append(_moved.Finder())


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name in _moved.MOVED:
        return _moved.load(name)
    raise AttributeError(f"module 'crosscheck' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
