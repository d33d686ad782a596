"""The run folder's owner (harness/rundir.py) on ordinary routes: a restart before any checkpoint reuses the
initialisation, concurrent writers of one JSON file and of one comparison folder, folders from before markers.
The hostile-user cases are in test_adversarial_rundir.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_harness import finetune, tiny  # noqa: F401  (tiny: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_restart_before_any_checkpoint_reuses_the_initialisation(tiny, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    finetune(tiny, tmp_path / "whole", method="astra")
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny, tmp_path / "cut", method="astra", callbacks=[CtrlC()])
    assert (tmp_path / "cut" / "init.json").is_file()
    assert not list((tmp_path / "cut").glob("checkpoints/checkpoint-*"))

    def no_build(*args, **kwargs):
        raise AssertionError("the initialisation should have been restored, not recomputed")

    monkeypatch.setattr("astra_peft.harness.restore.build_method", no_build)
    summary = finetune(tiny, tmp_path / "cut", method="astra")
    assert summary["init_restored"] and summary["resumed_from"] is None
    assert summary["seconds"]["calibration"] > 0  # the original cost, kept in init.json
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    monkeypatch.undo()
    # an unfinished directory rerun with another configuration is refused, naming what differs; started afresh
    # on request, it initialises afresh
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny, tmp_path / "other", method="astra", callbacks=[CtrlC()])
    with pytest.raises(ValueError, match=r"other settings \(max_steps: 6 → 2; seed: 0 → 1\)"):
        finetune(tiny, tmp_path / "other", method="astra", seed=1, max_steps=2)
    assert not finetune(tiny, tmp_path / "other", method="astra", seed=1, max_steps=2, force=True)["init_restored"]


def _write_json_many(path, n, barrier):
    from astra_peft.harness.rundir import write_json_atomic

    barrier.wait()
    for i in range(n):
        write_json_atomic(Path(path), {"writer": os.getpid(), "i": i})


def test_two_processes_writing_one_json_file_do_not_collide(tmp_path):
    # Two `astra compare` runs into one output folder both write compare.json; a temporary name shared
    # between processes let one rename the other's half-written file away (FileNotFoundError).
    import multiprocessing

    path = tmp_path / "compare.json"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_json_many, args=(path, 2000, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads(path.read_text())["i"] == 1999
    assert [p.name for p in tmp_path.iterdir()] == ["compare.json"]


def test_run_folders_from_before_markers_are_adopted(tiny, tmp_path):
    """A run or comparison folder written before folders carried a marker (the study's packed runs): one that
    holds nothing but astra's own files and records is recognised, skipped when finished with the same settings,
    refused (naming them) with other settings; one with anything else in it stays refused."""
    from astra_peft.harness.compare import run_compare
    from astra_peft.harness.rundir import MARKER
    from astra_peft.harness.training import FinetuneConfig

    run = tmp_path / "run"
    first = finetune(tiny, run, max_steps=2, save_steps=0)
    (run / MARKER).unlink()
    assert finetune(tiny, run, max_steps=2, save_steps=0) == first and (run / MARKER).is_file()  # adopted
    (run / MARKER).unlink()
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.005 → 0.001\)"):
        finetune(tiny, run, max_steps=2, save_steps=0, lr=1e-3)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an astra run folder"):
        finetune(tiny, run, max_steps=2, save_steps=0)

    base = FinetuneConfig(model=tiny["llama"], data=tiny["gen"], output=str(tmp_path), max_steps=2, batch_size=4,
                          lr=5e-3, rank=4, alpha=8, progress=False, save_steps=0)
    cmp = tmp_path / "cmp"
    run_compare(base, "lora", [0], output=cmp, log=lambda m: None)
    for marker in cmp.rglob(MARKER):
        marker.unlink()
    logs = []
    run_compare(base, "lora", [0], output=cmp, log=logs.append)
    assert any("skipped" in m for m in logs) and not any("running" in m for m in logs)


def test_compare_skips_a_run_another_process_is_writing(tiny, tmp_path):
    """Two comparisons into one folder: a run the other one is writing (its lock held) is skipped, not run twice
    into the same files, and not reported as a failure."""
    from astra_peft.harness.compare import run_compare
    from astra_peft.harness.rundir import CompareDir
    from astra_peft.harness.training import FinetuneConfig

    base = FinetuneConfig(model=tiny["llama"], data=tiny["gen"], output=str(tmp_path), max_steps=2, batch_size=4,
                          lr=5e-3, rank=4, alpha=8, progress=False, save_steps=0)
    cmp = tmp_path / "cmp"
    CompareDir(cmp).claim_folder()  # the other comparison made the folder
    busy = CompareDir(cmp).run_dir("gen", "lora", 0)
    logs = []
    with busy.lock():  # held as the other process would hold it (an flock: per open file, so it excludes us too)
        run_compare(base, "lora,dora", [0], output=cmp, log=logs.append)
    assert any("lora · seed 0: skipped" in m and "being written by another astra process" in m for m in logs)
    assert not (busy.path / "summary.json").exists() and not (busy.path / "metrics.jsonl").exists()
    assert (cmp / "runs" / "gen" / "dora" / "seed0" / "summary.json").is_file()
