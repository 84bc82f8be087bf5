"""argparse types every command shares, so a bad value is refused naming its option (argparse adds the name)."""

from __future__ import annotations

import argparse
from pathlib import Path


def directory(text: str) -> Path:
    """``--out``: a path; an empty one would silently mean the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got '' (use '.' for the current one)")
    return Path(text)


def non_negative_int(text: str) -> int:
    """A seed or a count: an integer >= 0 (numpy and torch refuse negative seeds later, without naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value
