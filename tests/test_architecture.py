"""The package's import graph: no circles, jax_impl free of torch and crosscheck, crosscheck's parts in layers.

Read from the source with ``ast`` (nothing is imported), including imports inside
functions: a lazy import is still a dependency.  The layers, lowest first, are the
ones docs/architecture.md draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jax_impl", "torch_impl", "crosscheck")

# crosscheck's parts, lowest first: a part may import its own modules and those of lower layers.
LAYERS = (
    ("crosscheck._moved", "crosscheck.common"),
    ("crosscheck.convert",),
    ("crosscheck.trajectory", "crosscheck.port", "crosscheck.cifar", "crosscheck.recipes"),
    ("crosscheck.gpu",),
    ("crosscheck.cli",),
    ("crosscheck.__main__", "crosscheck"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement, resolved to known modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` a name of mod.
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in known else (node.module, [alias.name], node.lineno))
    return found


def graph() -> dict[str, dict[str, list]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, dict[str, list]] = {m: {} for m in mods}
    for name, path in mods.items():
        for target, names, line in imports_of(path, known):
            edges[name].setdefault(target, []).append((line, names))
    return edges


def part_of(module: str) -> tuple[int, str] | None:
    best = None
    for level, parts in enumerate(LAYERS):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and (best is None or len(part) > len(best[1])):
                best = (level, part)
    return best


def cycles(edges: dict[str, dict[str, list]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(edges: dict[str, dict[str, list]]) -> list[str]:
    """Every import that breaks the layering rules, as 'module:line imports target (why)'."""
    out = []
    for source, targets in sorted(edges.items()):
        top = source.split(".")[0]
        for target, uses in sorted(targets.items()):
            line = uses[0][0]
            target_top = target.split(".")[0]
            where = f"{source}:{line} imports {target}"
            if top == "jax_impl" and target_top in ("crosscheck", "torch", "torch_impl"):
                out.append(f"{where} (jax_impl depends on JAX and optax only)")
            if top == "torch_impl" and target_top in ("crosscheck", "jax_impl", "jax", "flax", "optax"):
                out.append(f"{where} (torch_impl depends on torch only)")
            if top == "crosscheck" and target_top == "crosscheck" and target != "crosscheck":
                mine, theirs = part_of(source), part_of(target)
                if mine and theirs and theirs[0] > mine[0]:
                    out.append(f"{where} (a lower layer, {mine[1]}, imports a higher one, {theirs[1]})")
                if mine and theirs and theirs[0] == mine[0] and theirs[1] != mine[1]:
                    out.append(f"{where} (two parts of one layer, {mine[1]} and {theirs[1]}, stay apart)")
            for _, names in uses:
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                if private and target_top in PACKAGES:
                    out.append(f"{where} takes private {private} (a name used across modules is public)")
    return out


def test_no_import_circles():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_layers_hold():
    found = violations(graph())
    assert not found, "\n".join(found)


def test_every_module_has_a_part():
    unplaced = [m for m in modules() if m.startswith("crosscheck") and part_of(m) is None]
    assert not unplaced, f"crosscheck modules in no layer of LAYERS: {unplaced}"


@pytest.mark.parametrize("bad", [
    ("jax_impl/groups.py", "from crosscheck import convert\n", "jax_impl depends on JAX and optax only"),
    ("crosscheck/common/metrics.py", "from crosscheck.port import parity\n", "a lower layer"),
    ("crosscheck/port/compare.py", "from crosscheck.cifar import models\n", "two parts of one layer"),
    ("crosscheck/convert/weights.py", "from crosscheck.convert.layers import _heads\n", "private"),
])
def test_the_check_catches_a_bad_import(bad, tmp_path, monkeypatch):
    """The checker itself: one planted import of each kind is reported (a check that cannot fail proves nothing)."""
    path, line, why = bad
    edges = graph()
    source = module_name(ROOT / path)
    planted = tmp_path / "planted.py"
    planted.write_text(line)
    for target, names, lineno in imports_of(planted, set(modules())):
        edges[source].setdefault(target, []).append((lineno, names))
    assert any(why in v for v in violations(edges)), violations(edges)


def test_the_check_catches_a_circle():
    edges = graph()
    edges["crosscheck.common.metrics"]["crosscheck.common.report"] = [(1, [])]
    edges["crosscheck.common.report"]["crosscheck.common.metrics"] = [(1, [])]
    assert ["crosscheck.common.metrics", "crosscheck.common.report"] in cycles(edges)
