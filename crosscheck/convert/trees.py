from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

Path = tuple[str | int, ...]


def nest(flat: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def show(key) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def closest(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    """The ``n`` candidates most like ``name`` (difflib's ratio, torch's ``.`` read as ``/``)."""
    return difflib.get_close_matches(name.replace(".", "/"), list(candidates), n=n, cutoff=0.3)
