"""The prepared GPU benchmark (benchmarks/bench_gpu.py) runs end to end: smoke-tested on CPU with tiny shapes,
so the one script a lent GPU machine gets has run here first."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_script_runs_on_cpu_with_tiny_shapes(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--out", str(tmp_path), "--tiny", "--device",
           "cpu", "--dtype", "float32", "--layers", "2", "--sequences", "4", "--seq-len", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                                 **__import__("os").environ})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(result["summary"]) == {"floor", "astra-covariance", "astra-max_normalized", "corda"}
    assert result["summary"]["floor"]["time_vs_floor"] == 1.0
    astra = next(r for r in result["records"] if r["config"] == "astra-covariance")
    assert astra["phases"]["layers"] == 2 * 7
