"""Every snippet of README's integration section is cut from a script in examples/, and every such script runs.

A snippet's first line names its script (`# examples/NAME.py`); each of its other lines must occur in that
script, so the README cannot drift from code that a test executes."""

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Using Astra with Trainer/TRL, DeepSpeed, FSDP and QLoRA"


def _snippets():
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _missing_lines(snippet: str) -> list[str]:
    """The snippet's lines that its named script does not contain (the name line itself must parse)."""
    first, *lines = snippet.splitlines()
    match = re.fullmatch(r"# (examples/\w+\.py)", first.strip())
    assert match, f"snippet does not name its script: {first!r}"
    script_lines = {line.strip() for line in (ROOT / match.group(1)).read_text().splitlines()}
    return [line for line in lines if line.strip() and line.strip() not in script_lines]


def test_every_snippet_names_its_script_and_matches_it():
    snippets = _snippets()
    assert len(snippets) >= 6
    for snippet in snippets:
        assert _missing_lines(snippet) == [], snippet.splitlines()[0]


def test_the_checker_sees_a_drifted_line():
    snippet = _snippets()[0]
    drifted = snippet.replace("batch_size=4", "batch_size=5", 1)
    assert drifted != snippet and len(_missing_lines(drifted)) == 1


def test_rank_allocation_example_runs(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        runpy.run_path(str(ROOT / "examples" / "rank_allocation.py"), run_name="__main__")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    out = capsys.readouterr().out
    at_init = float(re.search(r"max \|Δlogits\| at init: (\S+)", out).group(1))
    assert at_init < 1e-5


def test_each_named_script_is_run_by_some_test():
    named = {re.match(r"# (examples/\w+\.py)", s).group(1) for s in _snippets()}
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for script in named:
        assert Path(script).name in tests, f"no test runs {script}"
