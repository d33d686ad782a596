"""The `astra` command line: every subcommand's --help, finetune/compare/analyze end to end on tiny models,
clean errors, and one real-model smoke test (MiniLM, fetched once into the cache)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from test_harness import make_classification_jsonl, make_generation_jsonl, make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBCOMMANDS = ["finetune", "compare", "analyze", "demo", "models", "tasks", "methods"]
FAST = ["--max-steps", "3", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--lr", "5e-3",
        "--calibration-samples", "32", "--no-progress"]


# Small models on a shared 2-core machine run far faster on one thread per process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def astra(*args) -> subprocess.CompletedProcess:
    """The installed console script's entry point, in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-c", "import sys; from astra_peft.harness.cli import main; sys.exit(main())",
                           *map(str, args)], capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"llama": make_tiny_llama(root / "llama"), "gen": make_generation_jsonl(root / "gen.jsonl"),
            "root": root}


def test_help_for_every_subcommand(capsys):
    from astra_peft.harness.cli import main

    for command in [[], *[[c] for c in SUBCOMMANDS]]:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: astra")
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--eigen-selection", "--statistic", "--calibration-samples", "--calibration-data",
                 "--rank", "--alpha", "--target-modules", "--max-steps", "--batch-size", "--lr", "--seed",
                 "--eval-split", "--output"):
        assert flag in text, flag


def test_listings(capsys):
    from astra_peft.harness.cli import main

    assert main(["models"]) == 0 and "smollm2-135m" in capsys.readouterr().out
    assert main(["tasks"]) == 0 and "social-iqa" in capsys.readouterr().out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for method in ("astra", "lora", "rslora", "dora", "pissa", "milora", "olora", "corda", "lora-ga", "eva", "full"):
        assert f"\n{method} " in "\n" + out, method


def test_finetune_then_analyze(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    done = astra("finetune", "--model", tiny["llama"], "--data", tiny["gen"], "--method", "astra",
                 "--eigen-selection", "largest", "--output", run, *FAST)
    assert done.returncode == 0, done.stderr
    assert "trainable parameters" in done.stdout
    assert "  dev (" in done.stdout and "  test (" in done.stdout  # split sizes
    assert "degenerate layers" in done.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "astra:eigen_selection=largest"
    # The thread count is chosen (here from OMP_NUM_THREADS=1), printed and recorded with the run.
    assert "threads: 1 (from OMP_NUM_THREADS" in done.stdout
    assert config["threads"] == 1 and config["threads_used"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cpu_seconds"] > 0 and set(summary["load_average"]) == {"start", "end"}
    assert config["method_spec"]["options"]["eigen_selection"] == "largest"
    from astra_peft.harness.cli import main

    before = (run / "summary.json").read_text()
    assert main(["finetune", "--model", str(tiny["llama"]), "--data", str(tiny["gen"]), "--method", "astra",
                 "--eigen-selection", "largest", "--output", str(run), *FAST]) == 0
    assert (run / "summary.json").read_text() == before  # finished: returned as it is, not run again

    assert main(["analyze", str(run), "--samples", "8", "--threads", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "self_attn.q_proj" in out
    assert "effective rank:" not in err and "calibration:" not in err  # --no-progress: no bar at all
    for name in ("effective_rank.md", "effective_rank.csv", "effective_rank.png"):
        assert (run / "analysis" / name).stat().st_size > 0
    # Titled by what was analysed, not by a path, with the number of rows it used.
    n_dev = config["splits"]["dev"]["size"]
    rows = min(8, n_dev)
    assert f"effective rank measured on {rows} rows of the dev split" in out
    title = (run / "analysis" / "effective_rank.md").read_text().splitlines()[0]
    assert title == f"# Effective rank: llama · gen · astra:eigen_selection=largest ({rows} dev rows)"
    # With bars on, the per-layer eigenvalues (minutes on a large model) show progress too.
    assert main(["analyze", str(run), "--samples", "8", "--threads", "1", "--output", str(tmp_path / "a2")]) == 0
    assert "effective rank:" in capsys.readouterr().err


def test_output_in_a_log_has_no_cursor_codes_and_no_progress_silences_every_bar(tiny, tmp_path):
    """Captured output is not a terminal: bars must not move the cursor (ESC[A), and with --no-progress nothing
    bar-like is printed at all (our bars, transformers' 'Loading weights', the library's calibration bar)."""
    common = ["finetune", "--model", tiny["llama"], "--data", tiny["gen"], "--method", "astra", "--max-steps", "2",
              "--batch-size", "4", "--rank", "4", "--alpha", "8", "--calibration-samples", "16", "--threads", "1"]
    shown = astra(*common, "--output", tmp_path / "bars")
    assert shown.returncode == 0, shown.stderr
    for phase in ("Loading weights", "calibration", "eigendecomposition", "training:"):  # each shows; checks can fail
        assert phase in shown.stderr, phase
    for text in (shown.stdout, shown.stderr):
        assert "\x1b[" not in text
    assert "threads: 1 (--threads)" in shown.stdout
    for noise in ("is_gradient_checkpointing", "Setting accelerator to CPU", "gemm_4bit_forward"):
        assert noise not in shown.stdout + shown.stderr, noise
    # The time breakdown in the order things happen, and what "initialization" means.
    times = next(line for line in shown.stdout.splitlines() if "wall time:" in line)
    order = [times.index(k) for k in ("calibration", "initialization", "training", "evaluation")]
    assert order == sorted(order) and "initialization excludes calibration" in times

    silent = astra(*common, "--output", tmp_path / "quiet", "--no-progress")
    assert silent.returncode == 0, silent.stderr
    for bar in ("%|", "it/s", "tok/s", "batch/s", "layer/s", "Loading weights", "eigendecomposition"):
        assert bar not in silent.stderr + silent.stdout, bar


def test_compare_command(tiny, tmp_path):
    out = tmp_path / "cmp"
    done = astra("compare", "--model", tiny["llama"], "--data", tiny["gen"], "--methods", "astra,lora,milora",
                 "--seeds", "0,1", "--output", out, *FAST, "--save-steps", "0")
    assert done.returncode == 0, done.stderr
    assert "| astra |" in done.stdout and "loss_png" in done.stdout
    assert {p.name for p in out.iterdir()} >= {"summary.md", "summary.csv", "loss.png", "grad_norm.png", "runs"}


def test_errors_surface_cleanly(tiny, tmp_path, capsys):
    """Bad data or a bad method spec: exit code 2, one `astra: error:` line naming the problem, no traceback."""
    from astra_peft.harness.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Question: is one more ?", "completion": " yes"}\n{"prompt": "oops"\n')
    cases = [(["--data", str(bad), "--method", "lora"], "bad.jsonl:2"),
             (["--data", str(tiny["gen"]), "--method", "astra:eigen_selection=biggest"], "choose one of"),
             (["--data", str(tiny["gen"]), "--method", "sora"], "unknown method")]
    for args, needle in cases:
        assert main(["finetune", "--model", str(tiny["llama"]), *args, "--output", str(tmp_path / "run"),
                     *FAST]) == 2
        err = capsys.readouterr().err
        assert err.startswith("astra: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_real_model_smoke_minilm(tmp_path):
    """Fetches all-MiniLM-L6-v2 into the cache (once) and fine-tunes it a few steps with Astra."""
    # MiniLM's layers need > 384 calibration tokens (their statistics' rank bound) for the tail to mean anything.
    data = make_classification_jsonl(tmp_path / "cls.jsonl", n=120, words=16)
    run = tmp_path / "minilm"
    done = astra("finetune", "--model", "minilm-l6", "--data", data, "--method", "astra", "--output", run,
                 "--max-steps", "4", "--batch-size", "8", "--calibration-samples", "96", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 <= summary["accuracy"] <= 1
    assert (run / "adapter_lora" / "adapter_config.json").is_file()


# `accelerate launch --cpu` starts a single process (multi-CPU needs mpirun); `--multi_gpu` goes through torchrun
# and, with no GPU, each process falls back to CPU and gloo: that is the accelerate route on this machine.
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes(tiny, tmp_path, launcher):
    """The same command under torchrun or `accelerate launch`: one process group on CPU (gloo), one metrics line
    per step."""
    run = tmp_path / "ddp"
    done = subprocess.run([*LAUNCHERS[launcher], "-m",
                           "astra_peft.harness.cli", "finetune", "--model", str(tiny["llama"]), "--data", str(tiny["gen"]),
                           "--method", "astra", "--output", str(run), *FAST],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]
    # two processes share each epoch: twice the samples per step
    config = json.loads((run / "config.json").read_text())
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == pytest.approx(1 / math.ceil(config["splits"]["train"]["size"] / (2 * 4)))


def test_paper_presets_and_explicit_flags():
    from astra_peft.harness.cli import _config, build_parser

    args = build_parser().parse_args(["finetune", "--model", "minilm-l6", "--task", "mr", "--output", "o",
                                      "--preset", "paper-nlg", "--lr", "1e-4"])
    cfg = _config(args, model="minilm-l6", task="mr", data=None, eval_data=None, method="lora", output="o")
    assert (cfg.rank, cfg.alpha, cfg.batch_size * cfg.grad_accum, cfg.max_length) == (128, 128.0, 128, 512)
    assert cfg.lr == 1e-4 and cfg.warmup == 0.03 and cfg.weight_decay == 0.0 and cfg.scheduler == "cosine"


def test_demo_says_its_plan_and_threads_before_it_starts(tmp_path, monkeypatch, capsys):
    """The demo's runs are replaced by a stub: what is checked is what it prints before and after them."""
    from astra_peft.harness import compare
    from astra_peft.harness.cli import main

    seen = {}

    def fake_run_compare(cfg, methods, seeds, output):
        seen.update(threads=cfg.threads, progress=cfg.progress, printed=capsys.readouterr().out)
        out = tmp_path / "demo"
        out.mkdir()
        for name in ("summary.md", "summary.csv", "loss.png", "grad_norm.png"):
            (out / name).write_text("| table |")
        return {"summary_md": out / "summary.md", "summary_csv": out / "summary.csv", "loss_png": out / "loss.png",
                "grad_norm_png": out / "grad_norm.png"}

    monkeypatch.setattr(compare, "run_compare", fake_run_compare)
    monkeypatch.setenv("ASTRA_PEFT_CACHE", str(tmp_path / "empty-cache"))
    assert main(["demo", "--output", str(tmp_path / "demo"), "--threads", "1", "--no-progress"]) == 0
    assert seen["threads"] == 1 and seen["progress"] is False
    before = seen["printed"]
    assert "astra demo: threads: 1 (--threads)" in before
    assert "fetch and convert smollm2-135m" in before  # the cache is empty: the fetch is announced
    assert "3 runs of 40 steps" in before and "min on an idle 2-core CPU" in before
    after = capsys.readouterr().out
    assert "| table |" in after and "CPU time of this process" in after
