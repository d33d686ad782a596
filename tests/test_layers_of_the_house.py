"""The two floors: the library (`astra_peft`) never imports the harness (`astra_peft.harness`)."""

import ast
import subprocess
import sys
from pathlib import Path

import astra_peft

LIBRARY = Path(astra_peft.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against the library package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a library module sits directly in astra_peft/
                base = "astra_peft" + ("." + base if base else "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_library_module_imports_the_harness():
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.startswith("astra_peft.harness"))
        for path in sorted(LIBRARY.glob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_checker_sees_a_harness_import(tmp_path):
    # The check above must be able to fail: a relative and an absolute harness import are both found.
    bad = tmp_path / "bad.py"
    bad.write_text("from .harness.training import run_finetune\nimport astra_peft.harness.cli\n")
    assert {"astra_peft.harness.training", "astra_peft.harness.cli"} <= _imported_modules(bad)


def test_importing_the_library_loads_no_harness_module():
    code = "import sys, astra_peft; print(sorted(m for m in sys.modules if m.startswith('astra_peft.harness')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports, at any depth of the file (function-level imports included:
    deferring an import hides a circle from Python, not from a reader)."""
    modules = {}
    for path in LIBRARY.rglob("*.py"):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(prefix + ([base] if base else []))
                edges.update(m for m in [base] + [f"{base}.{a.name}" for a in node.names] if m in modules)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
        # The packages' __init__ files only re-export (lazily, by name): an edge into one is no dependency.
        graph[name] = {m for m in edges if m != name and modules[m].name != "__init__.py"}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_in_the_package():
    assert _circles(_import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_subpackage_is_packaged():
    # A built wheel holds only the packages pyproject lists: a new subpackage missing there exists in editable
    # installs and nowhere else (astra_peft.integrations was, once).
    import tomllib

    listed = set(tomllib.loads((LIBRARY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(LIBRARY.parent).parts) for p in LIBRARY.rglob("__init__.py")}
    assert listed == found
