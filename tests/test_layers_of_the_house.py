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
