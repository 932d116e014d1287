"""Imports follow the table in docs/ARCHITECTURE.md, and no module imports itself in a circle.

Imports are read statically from every module under ``sparsemerge/`` (module- and
function-level, ``TYPE_CHECKING`` blocks included), so a lazy import cannot hide an upward
dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparsemerge"
TABLE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
ANY = "*"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that ``name`` imports, resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import sub`` imports the module ``pkg.sub`` when there is one,
            # else a name defined in ``pkg`` itself
            subs = {f"{source}.{a.name}" for a in node.names}
            found.update(subs & known)
            if subs - known:
                found.add(source)
    return {m for m in found if m in known and m != name}


def read_table() -> tuple[list[str], dict[str, set[str]]]:
    """(bottom modules, {module prefix: allowed prefixes}) from docs/ARCHITECTURE.md."""
    rows: dict[str, set[str]] = {}
    bottom: list[str] = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([\w.]+)`", cells[0])
        if "bottom" in cells[1]:
            bottom += names
            continue
        allowed = {ANY} if "any module" in cells[1] else set(re.findall(r"`([\w.]+)`", cells[1]))
        for n in names:
            rows[n] = allowed
    return bottom, rows


def qualify(short: str) -> str:
    return "sparsemerge" if short == "sparsemerge" else f"sparsemerge.{short}"


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def row_of(module: str, rows: dict[str, set[str]]) -> str | None:
    """The most specific row covering ``module`` (the root row covers the root only)."""
    matches = [r for r in rows if under(module, qualify(r))
               and (r != "sparsemerge" or module == "sparsemerge")]
    return max(matches, key=len) if matches else None


def violations(graph: dict[str, set[str]], bottom: list[str],
               rows: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        if any(under(module, qualify(b)) for b in bottom):
            bad = sorted(d for d in deps if not any(under(d, qualify(b)) for b in bottom))
            out += [f"{module} -> {d} (a bottom module imports nothing above it)" for d in bad]
            continue
        row = row_of(module, rows)
        if row is None:
            out.append(f"{module} has no row in docs/ARCHITECTURE.md")
            continue
        allowed = rows[row]
        for dep in sorted(deps):
            if under(dep, qualify(row)) and row != "sparsemerge":
                continue  # within its own package
            if ANY in allowed and not under(dep, "sparsemerge.cli"):
                continue
            if any(under(dep, qualify(b)) for b in bottom):
                continue
            if not any(under(dep, qualify(a)) for a in allowed):
                out.append(f"{module} -> {dep} (row `{row}` allows {sorted(allowed)})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        # importing ``a.b.c`` runs ``a/__init__`` and ``a.b/__init__`` first: not a dependency
        # on what those packages contain, so only the imported module itself counts
        graph[name] = imports_of(name, path, known)
    return graph


def test_every_import_is_allowed_by_the_table():
    bottom, rows = read_table()
    assert bottom and rows, f"no layering table found in {TABLE}"
    problems = violations(package_graph(), bottom, rows)
    assert not problems, "imports the layering table does not allow:\n" + "\n".join(problems)


def test_no_import_cycles():
    found = cycles(package_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_nothing_imports_the_cli():
    graph = package_graph()
    bad = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
           if under(d, "sparsemerge.cli") and not under(m, "sparsemerge.cli")]
    assert not bad, bad


@pytest.mark.parametrize(("source", "added", "expect"), [
    ("sparsemerge.merge.engine", "sparsemerge.evaluate", "row `merge` allows"),
    ("sparsemerge.errors", "sparsemerge.adapter", "bottom module"),
    ("sparsemerge.formats.adapter_file", "sparsemerge.train.loop", "row `formats` allows"),
])
def test_an_upward_import_is_caught(source, added, expect):
    """The checker itself: an upward edge added to the real graph is reported."""
    bottom, rows = read_table()
    graph = package_graph()
    graph[source] = graph[source] | {added}
    assert any(expect in p and added in p for p in violations(graph, bottom, rows))


def test_a_cycle_is_caught():
    graph = package_graph()
    graph["sparsemerge.adapter"] = graph["sparsemerge.adapter"] | {"sparsemerge.formats.describe"}
    assert any("sparsemerge.adapter" in c for c in cycles(graph))
