"""Every fenced code block of README.md and docs/*.md runs, and the docs build.

Fences
    ```python                 executed in-process with ``exec``.  The python blocks of one page run in
                              page order in one shared namespace (a block may use what an earlier one
                              defined), with the page's own temporary directory as working directory
                              (also put on ``sys.path`` while the page's blocks run, so a module written
                              there by a ``file`` block, see below, imports).  Running one block alone
                              (``-k``) first runs the page's earlier python blocks.
    ```bash ```console ```sh  run with ``bash -e -c`` in the page's temporary directory (``cwd repo``: in
                              the repository root): the first failing command ends the block with its
                              status.  ``python`` and ``python3`` resolve to
                              the interpreter running the tests (a shim first on ``PATH``), and
                              ``.venv/bin/python`` is replaced by ``python``; ``PYTHONPATH`` starts
                              with the repository root; ``DOCTEST_TMP`` is the page's temporary
                              directory and ``DOCTEST_REPO`` the repository root.  The status must be
                              0 unless an ``exit`` annotation says otherwise.
    ```text                   output or file listings: not run.
    any other fence (or none) an error: the block's test fails, so nothing can be skipped silently.

Annotations: an HTML comment on the line(s) directly above the opening fence (blank lines between
are allowed; several such lines add up), visible in the Markdown source, invisible on the
rendered page::

    <!-- doctest: DIRECTIVE; DIRECTIVE; ... -->

    append ARGS        bash: append ARGS to every command of the block (a command is a line, with its
                       ``\\`` continuations, that is not blank or a comment; a trailing ``# comment``
                       is dropped).  argparse keeps the last value of an option, so
                       ``append --steps 2`` runs the documented command with 2 steps.
    replace OLD => NEW replace the text OLD (which must occur) by NEW before running; repeatable.
    env NAME=VALUE ... bash: extra environment variables (values may use ``$DOCTEST_TMP``,
                       ``$DOCTEST_REPO``).
    exit N             bash: the expected exit status (default 0).
    cwd repo           bash: run in the repository root instead of the page's temporary directory.
    file PATH          python: write the block to PATH (relative to the page's temporary directory)
                       instead of executing it; later blocks import it.
    requires PATH      skip the block when PATH (relative to the repository root) does not exist
                       (e.g. the CIFAR-10 subset).
    slow               mark the block ``slow`` (deselected by ``-m 'not slow'``).

README's first two blocks are special: they are what a new user pastes (create the virtual
environment, install) and, for the second, what CI runs (``.ci/run`` extracts it and runs it
verbatim).  The harness does not create virtual environments.  For the first block it checks that
the install is followed by ``.venv/bin/python -m crosscheck`` and, marked ``slow``, runs that part
(the built-in suite, about a minute) with this interpreter, expecting status 0 and the report files.
For the second it checks that the command ``.ci/run`` extracts from README.md is that block's command
and that it ends in ``-m pytest``; running it would run this test suite recursively, so it does not.

Other checks: README.md is at most 250 lines; README.md and the docs pages name no issue
numbers ("Issue 16", "issue #12",
"#12"; upstream links such as pytorch/pytorch#64475 are fine); every docs page is in mkdocs.yml's
nav; README's links into docs/ resolve; and ``mkdocs build --strict`` succeeds without a warning.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

PYTHON = {"python"}
SHELL = {"bash", "console", "sh"}
TEXT = {"text"}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
ANNOTATION = re.compile(r"^\s*<!--\s*doctest:(?P<body>.*?)-->\s*$")
DIRECTIVES = {"append", "replace", "env", "exit", "cwd", "file", "requires", "slow"}

INSTALL_BLOCKS = (
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e . && "
    ".venv/bin/python -m crosscheck",
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e \".[test]\" && "
    ".venv/bin/python -m pytest -n auto --dist loadfile",
)


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: dict = dataclasses.field(default_factory=dict)
    index: int = 0  # position among the page's blocks

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def parse_directives(body: str, where: str) -> dict:
    out: dict = {"replace": [], "env": {}, "append": []}
    for part in (p.strip() for p in body.split(";")):
        if not part:
            continue
        name, _, arg = part.partition(" ")
        arg = arg.strip()
        if name not in DIRECTIVES:
            raise ValueError(f"{where}: unknown doctest directive {name!r} (known: {sorted(DIRECTIVES)})")
        if name == "replace":
            old, sep, new = arg.partition(" => ")
            if not sep or not old:
                raise ValueError(f"{where}: replace needs 'OLD => NEW', got {arg!r}")
            out["replace"].append((old, new))
        elif name == "env":
            for item in shlex.split(arg):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"{where}: env needs NAME=VALUE, got {item!r}")
                out["env"][key] = value
        elif name == "append":
            out["append"].append(arg)
        elif name == "exit":
            out["exit"] = int(arg)
        elif name == "cwd":
            if arg != "repo":
                raise ValueError(f"{where}: cwd takes 'repo', got {arg!r}")
            out["cwd"] = "repo"
        elif name in ("file", "requires"):
            if not arg:
                raise ValueError(f"{where}: {name} needs a path")
            out[name] = arg
        elif name == "slow":
            out["slow"] = True
    return out


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the annotation above each (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i, pending = [], 0, None
    while i < len(lines):
        line = lines[i]
        ann = ANNOTATION.match(line)
        if ann:  # several annotation lines above one fence add up
            pending = (i + 1, f"{pending[1]};{ann.group('body')}" if pending else ann.group("body"))
            i += 1
            continue
        m = FENCE.match(line)
        if not m:
            if line.strip():
                pending = None  # an annotation belongs to the next fence only
            i += 1
            continue
        fence, indent = m.group("fence"), m.group("indent")
        lang = m.group("info").strip().split(" ")[0] if m.group("info").strip() else ""
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence) \
                    and not close.group("info").strip():
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        else:
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        where = f"{path.relative_to(REPO)}:{i + 1}"
        directives = parse_directives(pending[1], where) if pending else parse_directives("", where)
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", directives, len(blocks)))
        pending = None
        i = j + 1
    return blocks


def _all_blocks() -> list[Block]:
    """Every page's blocks; a page that does not parse becomes one failing entry, not a collection error."""
    out = []
    for page in PAGES:
        try:
            out += blocks_of(page)
        except ValueError as err:
            out.append(Block(page, 0, "!unparsable", str(err), parse_directives("", str(page)), -1))
    return out


def _is_install_block(block: Block) -> bool:
    return block.path == README and 0 <= block.index < 2


BLOCKS = _all_blocks()


def _param(block: Block):
    marks = [pytest.mark.slow] if block.directives.get("slow") else []
    return pytest.param(block, id=block.id, marks=marks)


# ------------------------------------------------------------------------------------------------
# Page state: one namespace and one temporary directory per page, shared by its blocks.


class Page:
    def __init__(self, path: Path, root: Path):
        self.path = path
        self.tmp = root / (path.stem if path != README else "README")
        self.tmp.mkdir(parents=True, exist_ok=True)
        name = f"doctest_{self.tmp.name.replace('-', '_')}"
        self.module = types.ModuleType(name)  # a real module: dataclasses and pickle look classes up there
        sys.modules[name] = self.module
        self.namespace: dict = self.module.__dict__
        self.done: dict[int, str | None] = {}  # block index -> None (ok) or the failure


@pytest.fixture(scope="session")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    cache: dict[Path, Page] = {}

    def get(path: Path) -> Page:
        if path not in cache:
            cache[path] = Page(path, root)
        return cache[path]

    return get


@pytest.fixture(scope="session")
def shim_bin(tmp_path_factory):
    """A directory with ``python``/``python3`` running this interpreter, to put first on PATH."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name in ("python", "python3"):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
        shim.chmod(0o755)
    return bin_dir


def _apply_replacements(block: Block) -> str:
    code = block.code
    for old, new in block.directives["replace"]:
        if old not in code:
            raise AssertionError(f"{block.id}: 'replace {old} => ...': {old!r} does not occur in the block")
        code = code.replace(old, new)
    return code


def _run_python(block: Block, page: Page) -> None:
    code = _apply_replacements(block)
    if "file" in block.directives:
        target = page.tmp / block.directives["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code, encoding="utf-8")
        return
    previous_cwd = os.getcwd()
    sys.path.insert(0, str(page.tmp))
    os.chdir(page.tmp)
    try:
        exec(compile(code, block.id, "exec"), page.namespace)  # noqa: S102 - the docs' own examples
    finally:
        os.chdir(previous_cwd)
        sys.path.remove(str(page.tmp))


def _commands(code: str) -> list[str]:
    """Logical command lines (continuations joined), without blanks and comments."""
    out, current = [], ""
    for raw in code.splitlines():
        current += raw
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            out.append(current)
        current = ""
    if current.strip():
        out.append(current)
    return out


def _strip_comment(command: str) -> str:
    """A command without a trailing ``# comment`` (a ``#`` outside quotes after whitespace)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1] in " \t"):
            return command[:i].rstrip()
    return command


def shell_script(block: Block) -> str:
    code = _apply_replacements(block).replace(".venv/bin/python", "python")
    if block.directives["append"]:
        extra = " ".join(block.directives["append"])
        code = "\n".join(f"{_strip_comment(c)} {extra}" for c in _commands(code)) + "\n"
    return code


def _shell_env(page: Page, shim: Path, extra: dict) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["DOCTEST_TMP"] = str(page.tmp)
    env["DOCTEST_REPO"] = str(REPO)
    env.setdefault("MPLBACKEND", "Agg")
    for key, value in extra.items():
        env[key] = value.replace("$DOCTEST_TMP", str(page.tmp)).replace("$DOCTEST_REPO", str(REPO))
    return env


def _run_shell(block: Block, page: Page, shim: Path, script: str | None = None, expect: int | None = None):
    script = shell_script(block) if script is None else script
    cwd = REPO if block.directives.get("cwd") == "repo" else page.tmp
    expect = block.directives.get("exit", 0) if expect is None else expect
    started = time.perf_counter()
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=_shell_env(page, shim, block.directives["env"]),
                          capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - started
    assert proc.returncode == expect, (
        f"{block.id}: exit status {proc.returncode}, expected {expect} ({elapsed:.1f} s)\n"
        f"--- script (cwd {cwd}) ---\n{script}\n--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr (tail) ---\n{proc.stderr[-4000:]}")
    return proc


def _ensure_earlier_python(block: Block, page: Page, *, files_only: bool = False) -> None:
    """Run the page's earlier python blocks that have not run (one block selected alone with -k or -m slow,
    or its page's other blocks in another worker); ``files_only``: only those that write a file."""
    for earlier in blocks_of(block.path)[:block.index]:
        if earlier.lang not in PYTHON or (files_only and "file" not in earlier.directives):
            continue
        if earlier.index not in page.done:
            try:
                _run_python(earlier, page)
                page.done[earlier.index] = None
            except BaseException as err:  # noqa: BLE001 - recorded, reported by the dependent block
                page.done[earlier.index] = f"{type(err).__name__}: {err}"
        if page.done[earlier.index] is not None:
            pytest.skip(f"an earlier block of this page failed: {earlier.id}: {page.done[earlier.index]}")


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if not _is_install_block(b)])
def test_block(block: Block, pages, shim_bin):
    if block.lang == "!unparsable":
        pytest.fail(block.code)
    if "requires" in block.directives and not (REPO / block.directives["requires"]).exists():
        pytest.skip(f"{block.directives['requires']} does not exist")
    page = pages(block.path)
    if block.lang in TEXT:
        return
    if block.lang in PYTHON:
        _ensure_earlier_python(block, page)
        try:
            _run_python(block, page)
        except BaseException:
            page.done[block.index] = f"{block.id} failed"
            raise
        page.done[block.index] = None
        return
    if block.lang in SHELL:
        _ensure_earlier_python(block, page, files_only=True)   # the page's files a command may use
        _run_shell(block, page, shim_bin)
        return
    pytest.fail(f"{block.id}: fence language {block.lang!r} is not one of "
                f"{sorted(PYTHON | SHELL | TEXT)}: a block must run (python, bash, console, sh) or be "
                "output (text)")


# ------------------------------------------------------------------------------------------------
# README's install blocks.


def _readme_blocks() -> list[Block]:
    return blocks_of(README)


def test_readme_starts_with_the_install_blocks():
    text = README.read_text(encoding="utf-8")
    expected = (f"# adamw-crosscheck\n\n```bash\n{INSTALL_BLOCKS[0]}\n```\n\n```bash\n{INSTALL_BLOCKS[1]}\n```\n")
    assert text.startswith(expected), "README.md must start with the title and the two install blocks, verbatim"
    first, second = _readme_blocks()[:2]
    assert (first.lang, second.lang) == ("bash", "bash")
    assert first.code.strip().endswith("&& .venv/bin/python -m crosscheck")


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` extracts the second ```bash block; it must be the README's test command (not run here)."""
    ci = REPO / ".ci" / "run"
    if not ci.is_file():
        pytest.skip(".ci/run is not in this checkout")
    match = re.search(r"^test_command=\$\((?P<cmd>.*)\)$", ci.read_text(), re.M)
    assert match, ".ci/run: no test_command=$(...) line"
    extracted = subprocess.run(["bash", "-c", match.group("cmd")], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.strip()
    assert extracted == _readme_blocks()[1].code.strip() == INSTALL_BLOCKS[1]
    assert extracted.endswith("-m pytest -n auto --dist loadfile")


@pytest.mark.slow
def test_readme_first_block_runs_the_suite(pages, shim_bin, tmp_path):
    """The part of the first block after the install: ``python -m crosscheck`` (the built-in suite)."""
    block = _readme_blocks()[0]
    command = block.code.strip().rsplit("&& ", 1)[1]
    assert command == ".venv/bin/python -m crosscheck"
    out = tmp_path / "report"
    _run_shell(block, pages(README), shim_bin, script=f"python -m crosscheck --no-progress --out {out}\n", expect=0)
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "trajectories.png"}


# ------------------------------------------------------------------------------------------------
# Wording, length, links, build.

ISSUE_WORDS = re.compile(r"\bissues?\s+#?\d+|(?<![\w/-])#\d+\b", re.I)


def test_readme_length():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; the landing page keeps to 250 (move the rest to docs/)"


@pytest.mark.parametrize("page", [pytest.param(p, id=str(p.relative_to(REPO))) for p in PAGES])
def test_no_issue_numbers(page):
    hits = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for m in ISSUE_WORDS.finditer(line):
            if re.search(r"pytorch/pytorch#\d+$", line[:m.end()]) or re.search(r"[\w.-]+/[\w.-]+#\d+$",
                                                                                  line[:m.end()]):
                continue  # an upstream reference (owner/repo#N)
            hits.append(f"{page.name}:{n}: {m.group(0)!r}")
    assert not hits, "user docs state what the code does, not the tracker's numbers:\n" + "\n".join(hits)


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    if isinstance(nav, list):
        return [p for v in nav for p in _nav_pages(v)]
    return []


def test_nav_lists_every_page():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    listed = set(_nav_pages(config["nav"]))
    present = {p.name for p in DOCS.glob("*.md")}
    assert present <= listed, f"pages missing from mkdocs.yml nav: {sorted(present - listed)}"
    assert listed <= present, f"nav names pages that do not exist: {sorted(listed - present)}"


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?!https?:|#|mailto:)[^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets, "README.md links to no docs page"
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert not warnings, "mkdocs warnings:\n" + "\n".join(warnings)
