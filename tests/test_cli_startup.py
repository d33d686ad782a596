"""`astra --help` and the listings answer without importing torch, transformers or PEFT.

Each command runs in a fresh interpreter (this test process has torch loaded already) that reports which of the
heavy packages ended up in `sys.modules`. No timing is asserted: what makes help slow is the import, so the
import is what is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft")

# Runs the CLI in-process and prints, as the last line of stderr, the exit code and the heavy modules loaded.
PROBE = """
import json, os, sys
for name in filter(None, os.environ.get("PROBE_PRELOAD", "").split(",")):
    __import__(name)
from astra_peft.harness.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft"})
sys.stderr.write("\\nPROBE " + json.dumps({"code": code, "heavy": heavy}) + "\\n")
"""


def probe(*argv: str, preload: str = "") -> tuple[dict, str]:
    env = {**os.environ, "PROBE_PRELOAD": preload, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("PROBE "), done.stderr[-2000:]
    return json.loads(last[len("PROBE "):]), done.stdout


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], ["finetune", "compare", "analyze", "demo", "models", "tasks", "methods"]),
        (["finetune", "--help"], ["--model", "--method", "--rank", "--lr", "--threads", "--no-progress"]),
        (["compare", "--help"], ["--methods", "--seeds", "--threads"]),
        (["analyze", "--help"], ["--samples", "--threads", "--no-progress"]),
        (["demo", "--help"], ["--max-steps", "--threads", "--no-progress"]),
        (["models"], ["smollm2-135m", "minilm-l6", "cache:"]),
        (["tasks"], ["social-iqa", "mr", "xsum"]),
        (["methods"], ["astra", "eigen_selection", "lora-ga", "stable_gamma", "corda_method", "whiten"]),
    ],
)
def test_command_answers_without_heavy_imports(argv, expected):
    result, out = probe(*argv)
    assert result == {"code": 0, "heavy": []}
    for text in expected:
        assert text in out, f"{text!r} missing from `astra {' '.join(argv)}`"


def test_the_probe_sees_a_heavy_import():
    # The check above must be able to fail: a command run after torch was imported is reported as heavy.
    result, _ = probe("methods", preload="torch")
    assert result["heavy"] == ["torch"]


def test_method_listing_matches_the_registry():
    """The light catalog `astra methods` prints is exactly the registry's content, in the same order."""
    from astra_peft.harness.method_catalog import CATALOG
    from astra_peft.harness.methods import METHODS

    listed = [(m.name, m.help, m.data, m.peft, m.options()) for m in CATALOG]
    registry = [(m.name, m.help, m.data, m.peft, sorted(m.option_types())) for m in METHODS.values()]
    assert listed == registry


def test_finetune_config_module_is_light():
    # The CLI derives its flags from FinetuneConfig: its module must not pull torch in.
    code = ("import sys, dataclasses; from astra_peft.harness.run_config import FinetuneConfig; "
            "assert [f.name for f in dataclasses.fields(FinetuneConfig)][:2] == ['model', 'output']; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    assert out.strip() == "[]"


def test_training_still_exports_the_config():
    from astra_peft.harness import run_config, training

    assert training.FinetuneConfig is run_config.FinetuneConfig
