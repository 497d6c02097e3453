"""The shape docs/ARCHITECTURE.md promises, checked on the source: no import cycles, no SQL in the
planner, small planner modules, library code that prints nothing, and a spec that loads without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rbridge"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every rbridge module ``name`` imports, at module level or inside functions (a lazy import is still
    a dependency); ``from pkg import sub`` counts as importing the submodule when ``sub`` is one."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40  # the walk found the package
    assert "rbridge.planner.plan" in graph["rbridge.commands.plan"]  # and reads lazy imports too
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layers_nothing_imports_the_cli_and_only_the_planner_and_cli_import_the_planner():
    graph = _graph()
    for name, deps in graph.items():
        if name != "rbridge.__main__":
            assert "rbridge.cli" not in deps, name
        if not name.startswith(("rbridge.planner", "rbridge.commands", "rbridge.spec")):
            assert not any(d.startswith("rbridge.planner") for d in deps), (name, deps)
    # The spec composes the parts the subsystems own, from leaf modules only.
    for leaf in ("rbridge.planner.schedule", "rbridge.proxy.config", "rbridge.scoring.config", "rbridge.reporting"):
        assert graph[leaf] <= {"rbridge.errors", "rbridge.scoring.config", "rbridge.scoring"}, (leaf, graph[leaf])


SQL = re.compile(r"\b(SELECT|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|VIEW|INDEX))\b")


def test_the_planner_holds_no_sql_and_no_module_over_400_lines():
    for path in sorted((PKG / "planner").glob("*.py")):
        source = path.read_text()
        assert len(source.splitlines()) <= 400, f"{path.name}: {len(source.splitlines())} lines"
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("sqlalchemy", "sqlmodel", "sqlite3", "psycopg") for m in mods), \
                    f"{path.name}:{node.lineno} imports {mods}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not SQL.search(node.value), f"{path.name}:{node.lineno}: SQL text {node.value[:60]!r}"
            if isinstance(node, ast.Attribute) and node.attr in ("session", "exec", "execute", "query"):
                raise AssertionError(f"{path.name}:{node.lineno}: .{node.attr} - use rbridge.store's operations")


def test_library_code_prints_nothing():
    """Only the CLI (rbridge.cli, rbridge.commands) prints or uses rich; library code reports through
    rbridge.reporting.Reporter."""
    for name, path in _modules().items():
        if name.startswith(("rbridge.commands", "rbridge.cli", "rbridge.__main__")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                raise AssertionError(f"{name}:{node.lineno} calls print()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] == "rich" for m in mods), f"{name}:{node.lineno} imports rich"


def test_loading_a_spec_imports_neither_torch_nor_transformers():
    """`rbridge validate` checks every stage setting without the seconds torch takes to import."""
    code = ("import sys; from rbridge.spec import load_spec; s = load_spec('specs/mix.yaml'); s.resolved_stages(); "
            "print(sorted(m for m in ('torch', 'transformers', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_plan_entry_point_takes_its_lock_before_importing_torch():
    """A second `rbridge plan` on a busy store is refused in the time Python starts, not after torch loads
    (tests/test_resume.py races a short plan for it)."""
    code = "import sys, rbridge.planner.plan, rbridge.commands.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PKG.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
