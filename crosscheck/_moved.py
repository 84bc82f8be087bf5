"""The module names of the flat layout, kept importable with a DeprecationWarning.

``import crosscheck.parity`` (or ``from crosscheck import parity``) gives
:mod:`crosscheck.port.parity` and warns once, naming the new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "metrics": "crosscheck.common.metrics",
    "reference": "crosscheck.common.reference",
    "interrupt": "crosscheck.common.interrupt",
    "report": "crosscheck.common.report",
    "implementations": "crosscheck.trajectory.implementations",
    "sources": "crosscheck.trajectory.sources",
    "flax_layers": "crosscheck.convert.flax_layers",
    "checkpoint": "crosscheck.convert.checkpoint",
    "parity": "crosscheck.port.parity",
    "locate": "crosscheck.port.locate",
    "port_examples": "crosscheck.port.examples",
    "cifar10": "crosscheck.cifar.data",
    "models": "crosscheck.cifar.models",
    "training": "crosscheck.cifar.training",
    "cifar_parity": "crosscheck.cifar.parity",
    "cifar_report": "crosscheck.cifar.report",
    "schedules": "crosscheck.recipes.schedules",
}


def load(old: str):
    """The module that ``crosscheck.<old>`` became, with a DeprecationWarning naming it."""
    new = MOVED[old]
    warnings.warn(f"crosscheck.{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[f"crosscheck.{old}"] = module
    return module


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        return load(self.old)

    def exec_module(self, module):
        pass  # the new module ran when it was imported


class Finder(importlib.abc.MetaPathFinder):
    """Answers ``import crosscheck.<old name>`` with the moved module."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != "crosscheck" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader(old))
