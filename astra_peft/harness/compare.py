"""Many runs, one directory: every task × method × seed, finished runs skipped, then the summary and plots."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from .rundir import CompareDir, RunDir, RunLocked, UserError, check_output, safe_name, settings_diff
from .specs import MethodSpec, parse_method_list
from .training import FinetuneConfig, _load_task, run_finetune, run_settings


def task_label(task: Optional[str], data: Optional[str]) -> str:
    """The task's name in directories and tables: a built-in name, or a JSONL file's stem (as its Task.name),
    made a single harmless path component (an absolute path or '..' never climbs out of the output folder)."""
    name = task or data
    return safe_name(Path(name).stem if name.endswith(".jsonl") else Path(name).name or name)


def run_dir(output, task: str, spec: MethodSpec, seed: int) -> Path:
    """runs/TASK/METHOD/seedN under `output`, from sanitised names, checked to stay inside it."""
    return CompareDir(output).run_dir(task, spec.slug, seed).path


def run_compare(
    base: FinetuneConfig,
    methods: Sequence[MethodSpec] | str,
    seeds: Sequence[int],
    *,
    tasks: Optional[Sequence[str]] = None,
    output,
    log=print,
) -> dict:
    """Run what is not finished yet and write summary.md/.csv, loss.png and grad_norm.png (and forgetting.png, with
    --forgetting-data) under `output`.
    `base` holds the shared settings (its task/data/method/seed/output are replaced per run). A finished run made
    with other settings (another --lr, other data) is run again; one made with these is skipped. A failing run
    is reported and the others go on; Ctrl-C stops at once and leaves the interrupted run resumable.

    Raises:
        UserError: `output` is not a comparison folder astra made (and not new or empty), lies in the model or
            data, or two tasks would share one folder name.
        RuntimeError: After the other runs, if some runs failed (each named).
    """
    from .report import write_summary

    if isinstance(methods, str):
        methods = parse_method_list(methods)
    task_args = [(t, None) for t in tasks] if tasks else [(base.task, None) if base.task else (None, base.data)]
    files = [base.data, base.eval_data, base.calibration_data, base.forgetting_data] + [t for t, _ in task_args if t]
    folder = CompareDir(check_output(output, model=base.model, files=files))
    labels = [task_label(t, d) for t, d in task_args]
    if len(set(labels)) < len(labels):
        clash = next(label for label in labels if labels.count(label) > 1)
        raise UserError(f"two tasks would share the run folder name {clash!r}; give them files with other names")
    folder.claim_folder()
    folder.check_report_files()  # before any run: a refusal at the end would waste them
    plan = [(t, d, label, spec, seed) for (t, d), label in zip(task_args, labels) for spec in methods for seed in seeds]
    folder.write_compare({
        "base": dataclasses.asdict(base),
        "methods": [s.name for s in methods],
        "seeds": list(seeds),
        "tasks": labels,
        "argv": sys.argv,
    })
    failures, done = [], []
    started, run_seconds = time.perf_counter(), []  # runs computed in this invocation, for the ETA
    for i, (task, data, label, spec, seed) in enumerate(plan, 1):
        run = folder.run_dir(label, spec.slug, seed)
        tag = f"[{i}/{len(plan)}] {label} · {spec.name} · seed {seed}"
        cfg = dataclasses.replace(base, task=task, data=data if data else base.data, method=spec, seed=seed,
                                  output=str(run.path))
        start = time.perf_counter()
        try:
            why = _rerun_reason(run, cfg)
            if why is None:
                log(f"{tag}: finished before, skipped ({run.path})")
                done.append(run)
                continue
            log(f"{tag}: {why} → {run.path}")
            summary = run_finetune(cfg, restart_if_changed=True)
        except RunLocked as err:  # another `astra compare` on this folder is running it: its result, not ours
            log(f"{tag}: skipped: {err}")
            continue
        except (ValueError, RuntimeError, OSError) as err:
            failures.append((tag, err))
            log(f"{tag}: FAILED: {err}")
            if run.is_ours():
                run.write_error(traceback.format_exc())
            continue
        done.append(run)
        acc = summary.get("accuracy")
        run_seconds.append(time.perf_counter() - start)
        log(f"{tag}: done in {run_seconds[-1]:.0f}s"
            + (f", {base.eval_split} accuracy {100 * acc:.2f}%" if acc is not None else "")
            + _eta(started, run_seconds, len(plan) - i))
    runs = [_with_history(r) for r in done]
    paths = {}
    if runs:
        folder.check_report_files()
        stale = folder.path / "forgetting.png"  # ours (just checked), from runs that measured it; these did not
        if stale.is_file() and not any(r.get("forgetting") is not None for r in runs):
            stale.unlink()
        paths = write_summary(folder.path, runs, split=base.eval_split, methods=[s.name for s in methods],
                              tasks=labels, title=f"{base.model}: " + ", ".join(s.name for s in methods))
        folder.record_report_files()
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(plan)} runs failed: "
                           + "; ".join(f"{tag}: {err}" for tag, err in failures))
    return paths


def _rerun_reason(run: RunDir, cfg: FinetuneConfig) -> Optional[str]:
    """None if `run` is finished with exactly `cfg`'s settings; else why it runs (again)."""
    if not run.path.is_dir():
        return "running"
    recorded = run.recorded_settings(current := run_settings(cfg, _load_task(cfg)))
    if recorded:
        diff = settings_diff(recorded, current)
        if diff:
            return f"settings changed ({diff}), running again"
    if run.is_finished():
        return None
    return "resuming" if recorded else "running"


def _with_history(run: RunDir) -> dict:
    summary = run.read_summary()
    summary["history"] = run.read_metrics()
    return summary


def _eta(started: float, run_seconds: list, remaining: int) -> str:
    """'; elapsed 3m10s, about 6m20s left for 2 run(s)': the mean of this invocation's computed runs times the
    runs left. Rough (data-driven methods also calibrate; a finished run left to skip costs nothing)."""
    def clock(seconds: float) -> str:
        seconds = int(round(seconds))
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

    text = f"; elapsed {clock(time.perf_counter() - started)}"
    if remaining and run_seconds:
        text += f", about {clock(remaining * sum(run_seconds) / len(run_seconds))} left for {remaining} run(s)"
    return text


# ----------------------------------------------------------------------------------------------------- demo

# Sized for the 2-core CPU this project targets (README: measured wall time). Short completions and a 3-way
# choice keep steps and scoring cheap; every linear layer of the blocks is adapted, as in the paper.
DEMO = {
    "model": "smollm2-135m",
    "task": "social-iqa",
    "methods": "astra,lora,pissa",
    "seeds": [0],
    "max_steps": 40,
    "batch_size": 8,
    "lr": 5e-4,
    "rank": 8,
    "alpha": 16.0,
    "max_length": 128,
    "calibration_samples": 64,
    "eval_split": "test",  # one evaluation per method, at the end: the budget goes to training
    "eval_samples": 150,
}


def demo_config(output, **overrides) -> tuple[FinetuneConfig, str, list[int]]:
    settings = {**DEMO, **{k: v for k, v in overrides.items() if v is not None}}
    methods, seeds = settings.pop("methods"), settings.pop("seeds")
    cfg = FinetuneConfig(output=str(output), method="lora", save_steps=10, **settings)
    return cfg, methods, seeds


# The README's demo time on an idle 2-core CPU, in minutes (keep the two in step when the demo changes).
DEMO_IDLE_MINUTES = 8


def demo_estimate() -> str:
    """A rough duration, said before the demo starts: the measured idle time, and a warning when the machine is
    busy (on 2 cores at load 4-8 the same demo took many times longer; see README)."""
    text = f"Roughly {DEMO_IDLE_MINUTES} min on an idle 2-core CPU"
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return text + "; an ETA follows each run."
    if load > 0.5 * cpus:
        text += (f"; this machine is busy (load {load:.1f} on {cpus} CPUs), so expect it to take several times "
                 "longer")
    return text + "; an ETA follows each run."
