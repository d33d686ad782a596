"""Run folders against a careless or hostile user (issue 16): one row per case, each asserting the exit code, the
message and the file system afterwards. Classes: data loss, stale results, writes outside --output, resume, lock.

Every row failed before the run folders had an owner (commit db7be23); the counts per class are in the report of
that change and in docs/reliability.md. Tiny local models and data: seconds per row.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_harness import make_generation_jsonl, make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = ["--max-steps", "6", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--lr", "5e-3",
        "--save-steps", "3", "--method", "lora", "--no-progress"]
COMPARE_FAST = [f for f in FAST if f not in ("--method", "lora")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {"llama": make_tiny_llama(root / "llama"), "gen": make_generation_jsonl(root / "gen.jsonl")}


class Env:
    """One row's world: a temporary folder, the tiny model and data, and the CLI run in-process."""

    def __init__(self, tiny, tmp: Path, capsys):
        self.tiny, self.tmp, self.capsys = tiny, tmp, capsys

    def cli(self, *args) -> tuple[int, str]:
        from astra_peft.harness.cli import main

        self.capsys.readouterr()
        code = main([str(a) for a in args])
        captured = self.capsys.readouterr()
        self.out = captured.out  # what the command printed (a comparison's log)
        return code, captured.err

    def finetune(self, output, *extra, data=None, model=None):
        return self.cli("finetune", "--model", model or self.tiny["llama"], "--data", data or self.tiny["gen"],
                        "--output", output, *FAST, *extra)

    def compare(self, output, *extra, data=True, methods="lora"):
        where = ["--data", self.tiny["gen"]] if data is True else []
        return self.cli("compare", "--model", self.tiny["llama"], *where, "--methods", methods, "--output", output,
                        *COMPARE_FAST, "--save-steps", "0", *extra)

    def run(self, output, callbacks=(), **kw):
        """run_finetune in-process with Trainer callbacks (a Ctrl-C at a chosen moment)."""
        from astra_peft.harness.training import FinetuneConfig, run_finetune

        settings = dict(model=str(self.tiny["llama"]), data=str(self.tiny["gen"]), method="lora", output=str(output),
                        max_steps=6, batch_size=4, lr=5e-3, rank=4, alpha=8, progress=False, save_steps=3)
        settings.update(kw)
        return run_finetune(FinetuneConfig(**settings), callbacks=callbacks)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` and its bytes (folders as None), to assert that nothing changed."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def user_folder(path: Path) -> dict:
    """A user's own folder with the names a run folder uses, and a file of theirs; returns its snapshot."""
    for sub in ("model", "checkpoints/checkpoint-3", "adapter", "adapter_lora"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        (path / sub / "mine.bin").write_bytes(b"user weights")
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "metrics.jsonl").write_text('{"mine": 1}\n')
    (path / "thesis.tex").write_text("my thesis\n")
    return snapshot(path)


def ctrl_c_at(moment: str, step: int = 0):
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        pass

    def hook(self, args, state, control, **kwargs):
        if state.global_step >= step:
            raise KeyboardInterrupt

    setattr(CtrlC, moment, hook)
    return CtrlC()


def interrupted(env: Env, output: Path, step: int = 4) -> None:
    """A run cut by Ctrl-C at `step` (checkpoint-3 saved)."""
    with pytest.raises(KeyboardInterrupt):
        env.run(output, callbacks=[ctrl_c_at("on_step_end", step)])
    assert (output / "checkpoints" / "checkpoint-3").is_dir()


def made_outside(root: Path, allowed: Path, before: set) -> list[str]:
    """Paths (files or folders) under `root` that were not there `before` and neither lie in `allowed` nor are the
    folders above it (made to hold it)."""
    return sorted(str(p) for p in set(root.rglob("*")) - before
                  if p != allowed and allowed not in p.parents and p not in allowed.parents)


# --------------------------------------------------------------------------------------------------- data loss


def not_a_run_folder(env):
    out = env.tmp / "mine"
    before = user_folder(out)
    code, err = env.finetune(out)
    assert code == 2 and "not an astra run folder" in err and str(out) in err
    assert snapshot(out) == before


def force_on_not_a_run_folder(env):
    out = env.tmp / "mine"
    before = user_folder(out)
    code, err = env.finetune(out, "--force")
    assert code == 2 and "not an astra run folder" in err
    assert snapshot(out) == before


def output_empty_string(env, monkeypatch):
    work = env.tmp / "cwd"
    before = user_folder(work)
    monkeypatch.chdir(work)
    code, err = env.finetune("", "--force")
    assert code == 2 and "--output" in err
    assert snapshot(work) == before


def output_dot_in_user_folder(env, monkeypatch):
    work = env.tmp / "cwd"
    before = user_folder(work)
    monkeypatch.chdir(work)
    code, err = env.finetune(".", "--force")
    assert code == 2 and "not an astra run folder" in err
    assert snapshot(work) == before


def output_is_the_model(env):
    model = env.tmp / "model"
    shutil.copytree(env.tiny["llama"], model)
    before = snapshot(model)
    code, err = env.finetune(model, model=model)
    assert code == 2 and "model folder" in err
    assert snapshot(model) == before


def output_inside_the_model(env):
    model = env.tmp / "model"
    shutil.copytree(env.tiny["llama"], model)
    before = snapshot(model)
    code, err = env.finetune(model / "run", model=model)
    assert code == 2 and "model folder" in err
    assert snapshot(model) == before


def output_holds_the_data(env):
    folder = env.tmp / "data"
    folder.mkdir()
    data = folder / "metrics.jsonl"  # a data file named like a run's log
    shutil.copy(env.tiny["gen"], data)
    before = snapshot(folder)
    code, err = env.finetune(folder, "--force", data=data)
    assert code == 2 and "input file" in err
    assert snapshot(folder) == before


def output_is_a_file(env):
    target = env.tmp / "notes.txt"
    target.write_text("mine\n")
    code, err = env.finetune(target)
    assert code == 2 and "is a file" in err
    assert target.read_text() == "mine\n"


def force_keeps_user_files_in_a_run_folder(env):
    out = env.tmp / "run"
    assert env.finetune(out)[0] == 0
    (out / "notes.md").write_text("my notes on this run\n")
    (out / "plots").mkdir()
    (out / "plots" / "mine.png").write_bytes(b"png")
    code, err = env.finetune(out, "--force")
    assert code == 0, err
    assert (out / "notes.md").read_text() == "my notes on this run\n"
    assert (out / "plots" / "mine.png").read_bytes() == b"png"


def compare_into_user_folder(env):
    out = env.tmp / "report"
    out.mkdir()
    (out / "summary.md").write_text("# my own summary\n")
    (out / "loss.png").write_bytes(b"my plot")
    before = snapshot(out)
    code, err = env.compare(out)
    assert code == 2 and "not an astra comparison folder" in err
    assert snapshot(out) == before


def compare_never_overwrites_a_report_it_did_not_make(env):
    """A comparison folder astra made, into which the user later put their own summary.csv (say, from a
    spreadsheet): a rerun refuses to overwrite it, before any run."""
    out = env.tmp / "cmp"
    assert env.compare(out)[0] == 0
    (out / "summary.csv").unlink()
    (out / "summary.csv").write_text("mine\n")
    shutil.rmtree(out / "runs")  # a run to do again
    code, err = env.compare(out)
    assert code == 2 and "summary.csv was not made by astra" in err
    assert (out / "summary.csv").read_text() == "mine\n" and not (out / "runs").exists()


def analyze_never_overwrites_user_files(env):
    """`astra analyze RUN --output DIR` into a folder holding the user's own effective_rank.md: refused, untouched;
    its own output (RUN/analysis) it rewrites freely."""
    run, mine = env.tmp / "run", env.tmp / "paper"
    assert env.finetune(run)[0] == 0
    mine.mkdir()
    (mine / "effective_rank.md").write_text("# my own table\n")
    before = snapshot(mine)
    code, err = env.cli("analyze", run, "--samples", "4", "--output", mine)
    assert code == 2 and "effective_rank.md" in err
    assert snapshot(mine) == before
    for _ in range(2):
        code, err = env.cli("analyze", run, "--samples", "4")
        assert code == 0, err
    assert (run / "analysis" / "effective_rank.csv").is_file()


# ---------------------------------------------------------------------------------------------- stale results


def finished_rerun_other_lr(env):
    out = env.tmp / "run"
    assert env.finetune(out)[0] == 0
    before = (out / "summary.json").read_bytes()
    code, err = env.finetune(out, "--lr", "1e-3")
    assert code == 2 and "lr: 0.005 → 0.001" in err and "--restart" in err
    assert (out / "summary.json").read_bytes() == before


def finished_rerun_other_method(env):
    out = env.tmp / "run"
    assert env.finetune(out)[0] == 0
    code, err = env.finetune(out, "--method", "dora")
    assert code == 2 and "method: lora → dora" in err
    assert json.loads((out / "summary.json").read_text())["method"] == "lora"


def finished_rerun_other_data_same_path(env):
    out, data = env.tmp / "run", env.tmp / "data.jsonl"
    shutil.copy(env.tiny["gen"], data)
    assert env.finetune(out, data=data)[0] == 0
    make_generation_jsonl(data, n=70)  # edited in place
    code, err = env.finetune(out, data=data)
    assert code == 2 and "data." in err and "other settings" in err


def unfinished_rerun_other_method(env):
    """An Ctrl-C'd LoRA run rerun as DoRA must not resume LoRA's checkpoint under DoRA's name."""
    out = env.tmp / "run"
    interrupted(env, out)
    code, err = env.finetune(out, "--method", "dora")
    assert code == 2 and "method: lora → dora" in err
    assert not (out / "summary.json").exists()


def compare_rerun_with_new_lr(env):
    out = env.tmp / "cmp"
    assert env.compare(out, methods="lora,dora")[0] == 0
    old = {p: p.read_bytes() for p in out.glob("runs/*/*/seed0/summary.json")}
    code, err = env.compare(out, "--lr", "1e-3", methods="lora,dora")
    assert code == 0, err
    for path in old:
        assert json.loads(path.read_text())["lr"] == 1e-3, path  # every run was run again
    assert json.loads((out / "compare.json").read_text())["base"]["lr"] == 1e-3


def compare_rerun_after_data_edit(env):
    """The data file edited in place: compare runs it again rather than report the old data's result."""
    out, data = env.tmp / "cmp", env.tmp / "data.jsonl"
    shutil.copy(env.tiny["gen"], data)
    assert env.cli("compare", "--model", env.tiny["llama"], "--data", data, "--methods", "lora", "--output", out,
                   *COMPARE_FAST, "--save-steps", "0")[0] == 0
    summary = out / "runs" / "data" / "lora" / "seed0" / "summary.json"
    before = json.loads(summary.read_text())
    make_generation_jsonl(data, n=70)
    code, err = env.cli("compare", "--model", env.tiny["llama"], "--data", data, "--methods", "lora", "--output", out,
                        *COMPARE_FAST, "--save-steps", "0")
    assert code == 0, err
    from astra_peft.harness.tasks import load_jsonl_task

    config = json.loads((summary.parent / "config.json").read_text())
    assert config["splits"] == json.loads(json.dumps(load_jsonl_task(str(data)).split_info()))
    assert json.loads(summary.read_text()) != before


# ------------------------------------------------------------------------------------ writes outside --output


def compare_tasks_absolute_path(env):
    outside = env.tmp / "outside"
    outside.mkdir()
    out = env.tmp / "cmp"
    before = set(env.tmp.rglob("*"))
    code, err = env.compare(out, "--tasks", f"{outside}/dir", data=False)
    assert code == 2
    assert made_outside(env.tmp, out, before) == []


def compare_task_climbing_out(env):
    out = env.tmp / "a" / "b" / "cmp"
    before = set(env.tmp.rglob("*"))
    code, err = env.compare(out, "--task", "../../x", data=False)
    assert code == 2
    assert made_outside(env.tmp, out, before) == []


def compare_data_directory(env):
    folder = env.tmp / "elsewhere" / "dataset"
    folder.mkdir(parents=True)
    out = env.tmp / "cmp"
    before = set(env.tmp.rglob("*"))
    code, err = env.cli("compare", "--model", env.tiny["llama"], "--data", folder, "--methods", "lora", "--output",
                        out, *COMPARE_FAST)
    assert code == 2
    assert made_outside(env.tmp, out, before) == []


def compare_runs_symlinked_out(env):
    """A comparison folder whose runs/ was replaced by a link to another folder: nothing is written through it."""
    out, outside = env.tmp / "cmp", env.tmp / "outside"
    assert env.compare(out)[0] == 0
    shutil.rmtree(out / "runs")
    outside.mkdir()
    (out / "runs").symlink_to(outside, target_is_directory=True)
    code, err = env.compare(out)
    assert code == 2 and "outside the output folder" in err
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------------------------------- resume


def kill_after_the_last_step(env):
    """Ctrl-C after the last step's checkpoint, before the summary: the rerun trains no step more and ends
    where an uninterrupted run ends."""
    whole = env.run(env.tmp / "whole")
    out = env.tmp / "cut"
    with pytest.raises(KeyboardInterrupt):
        env.run(out, callbacks=[ctrl_c_at("on_train_end")])
    assert (out / "checkpoints" / "checkpoint-6").is_dir() and not (out / "summary.json").exists()
    code, err = env.finetune(out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final"] == whole["final"]
    assert (out / "metrics.jsonl").read_text() == (env.tmp / "whole" / "metrics.jsonl").read_text()


def killed_three_times_after_the_last_step(env):
    """Ctrl-C in the final evaluation, three times over: still 6 steps, and the uninterrupted run's result."""
    from transformers import TrainerCallback

    class CtrlCInFinalEvaluation(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if any(key.startswith("final_") for key in logs or {}):
                raise KeyboardInterrupt

    whole = env.run(env.tmp / "whole")
    out = env.tmp / "cut"
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            env.run(out, callbacks=[CtrlCInFinalEvaluation()])
    summary = env.run(out)
    assert summary["steps"] == 6 and summary["final"] == whole["final"]


def damaged_newest_checkpoint(env):
    whole = env.run(env.tmp / "whole")
    out = env.tmp / "cut"
    with pytest.raises(KeyboardInterrupt):
        env.run(out, callbacks=[ctrl_c_at("on_train_end")])
    state = out / "checkpoints" / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # cut short
    code, err = env.finetune(out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["final"] == whole["final"]


def only_checkpoint_damaged(env):
    out = env.tmp / "cut"
    interrupted(env, out)
    state = out / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    code, err = env.finetune(out)
    assert code == 2 and "checkpoint-3/trainer_state.json" in err and "--restart" in err


def cut_last_metrics_line(env):
    env.run(env.tmp / "whole")
    out = env.tmp / "cut"
    interrupted(env, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"loss": 1.2, "st')  # a kill mid-append
    code, err = env.finetune(out)
    assert code == 0, err
    assert (out / "metrics.jsonl").read_text() == (env.tmp / "whole" / "metrics.jsonl").read_text()


def damaged_metrics_line(env):
    out = env.tmp / "cut"
    interrupted(env, out)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"loss": \n'
    (out / "metrics.jsonl").write_text("".join(lines))
    code, err = env.finetune(out)
    assert code == 2 and "metrics.jsonl:2" in err


# ----------------------------------------------------------------------------------------------------- lock


WRITER = """
import sys, time
from transformers import TrainerCallback
from astra_peft.harness.training import FinetuneConfig, run_finetune

class Stall(TrainerCallback):  # a long run, caught in the middle of writing its folder
    def on_step_end(self, args, state, control, **kwargs):
        print("training", flush=True)
        time.sleep(300)

model, data, out = sys.argv[1:]
run_finetune(FinetuneConfig(model=model, data=data, method="lora", output=out, max_steps=6, batch_size=4, lr=5e-3,
                            rank=4, alpha=8, progress=False, save_steps=3), callbacks=[Stall()])
"""


def second_writer_refused_then_stale_lock_taken_over(env):
    """While another process is writing the run folder, a second run of the same command is refused naming that
    process; once it is gone (killed: its lock file stays behind), the run goes ahead and logs every step once."""
    out = env.tmp / "run"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(env.tiny["llama"]), str(env.tiny["gen"]), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = iter(writer.stdout.readline, "")  # (library log lines may come first)
        assert any(line.strip() == "training" for line in lines), "the writer never started training"
        code, err = env.finetune(out)
        assert code == 2 and f"pid {writer.pid}" in err
        assert not (out / "summary.json").exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    code, err = env.finetune(out)
    assert code == 0, err
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (out / ".astra-run.lock").exists()  # taken over, then released


def compare_skips_a_run_being_written(env):
    """Two comparisons into one folder: the run the other process is writing is skipped, not trained a second
    time into the same files."""
    out = env.tmp / "cmp"
    assert env.compare(out, methods="dora")[0] == 0
    run = out / "runs" / "gen" / "lora" / "seed0"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(env.tiny["llama"]), str(env.tiny["gen"]), str(run)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert any(line.strip() == "training" for line in iter(writer.stdout.readline, ""))
        code, err = env.compare(out, methods="lora,dora")
        assert code == 0, err
        assert f"skipped: {run} is being written by another astra process (pid {writer.pid}" in env.out
        assert not (run / "summary.json").exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()


# -------------------------------------------------------------------------------------------------- the table


CASES = [
    ("data loss", not_a_run_folder),
    ("data loss", force_on_not_a_run_folder),
    ("data loss", output_empty_string),
    ("data loss", output_dot_in_user_folder),
    ("data loss", output_is_the_model),
    ("data loss", output_inside_the_model),
    ("data loss", output_holds_the_data),
    ("data loss", output_is_a_file),
    ("data loss", force_keeps_user_files_in_a_run_folder),
    ("data loss", compare_into_user_folder),
    ("data loss", compare_never_overwrites_a_report_it_did_not_make),
    ("data loss", analyze_never_overwrites_user_files),
    ("stale results", finished_rerun_other_lr),
    ("stale results", finished_rerun_other_method),
    ("stale results", finished_rerun_other_data_same_path),
    ("stale results", unfinished_rerun_other_method),
    ("stale results", compare_rerun_with_new_lr),
    ("stale results", compare_rerun_after_data_edit),
    ("writes outside --output", compare_tasks_absolute_path),
    ("writes outside --output", compare_task_climbing_out),
    ("writes outside --output", compare_data_directory),
    ("writes outside --output", compare_runs_symlinked_out),
    ("resume", kill_after_the_last_step),
    ("resume", killed_three_times_after_the_last_step),
    ("resume", damaged_newest_checkpoint),
    ("resume", only_checkpoint_damaged),
    ("resume", cut_last_metrics_line),
    ("resume", damaged_metrics_line),
    ("lock", second_writer_refused_then_stale_lock_taken_over),
    ("lock", compare_skips_a_run_being_written),
]


@pytest.mark.parametrize("klass, case", CASES, ids=[f"{k.split()[0]}-{c.__name__}" for k, c in CASES])
def test_hostile(klass, case, tiny, tmp_path, capsys, monkeypatch):
    env = Env(tiny, tmp_path, capsys)
    if "monkeypatch" in case.__code__.co_varnames[: case.__code__.co_argcount]:
        case(env, monkeypatch)
    else:
        case(env)
