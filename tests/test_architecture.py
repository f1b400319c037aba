"""The layout tells the truth: no import circles, the library never imports the CLI, benchmarks
and scripts use the library, modules stay readable, and nothing cites notes outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(p: Path, name: str, mods: dict[str, Path]) -> set[str]:
    """Every epsscale module ``p`` imports, at module level or inside functions (TYPE_CHECKING too)."""
    pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            cands = subs if len(subs) == len(node.names) else [target, *subs]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        out.update(c for c in cands if c in mods and c != name)
    return out


def test_no_import_circles_and_no_upward_imports():
    mods = _modules()
    graph = {m: _imports(p, m, mods) for m, p in mods.items()}
    # Circles: a depth-first search for a back edge.
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*path[path.index(n):], n]) if n in path else n
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    upward = sorted((m, n) for m, ns in graph.items() for n in ns if n.startswith("epsscale.cli") and not m.startswith("epsscale.cli") and m != "epsscale.__main__")
    assert not upward, f"the library imports the CLI: {upward}"


def test_benchmarks_and_scripts_use_the_library_not_the_cli():
    for p in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        text = p.read_text()
        assert not re.search(r"(from|import)\s+epsscale\.cli\b|from epsscale import cli\b", text), p


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 720}
    assert not long, f"modules over ~700 lines: {long}"


# The planning notes that live beside the repository, spelled in pieces so that this file does not
# itself name them.
NOTES_DIR = "../" + "shared"
NOTES_FILES = re.compile(r"\b(" + "|".join(("DES" + "IGN", "PAP" + "ER", "STY" + "LE")) + r")\.md\b")


def test_nothing_cites_notes_outside_the_repository():
    offenders = []
    for p in [*SRC.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*"), ROOT / "README.md", *(ROOT / "benchmarks").glob("*.md"), *(ROOT / "docs").glob("*.md")]:
        if p.is_file():
            text = p.read_text(errors="ignore")
            if NOTES_DIR in text or NOTES_FILES.search(text):
                offenders.append(str(p.relative_to(ROOT)))
    assert not offenders, offenders
