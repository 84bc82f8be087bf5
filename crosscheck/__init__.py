"""Numerical parity of AdamW and training between PyTorch and JAX/Flax.

The public API is imported on first use, so that ``python -m crosscheck`` can
install its Ctrl-C handler before torch and JAX load.
"""

import importlib
import sys

from crosscheck import _moved

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
