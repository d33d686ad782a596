"""Many runs, one directory: every task × method × seed, finished runs skipped, then the summary and plots."""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from .specs import MethodSpec, parse_method_list
from .rundir import is_finished, write_json_atomic
from .training import FinetuneConfig, run_finetune


def task_label(task: Optional[str], data: Optional[str]) -> str:
    """The task's name in directories and tables: a built-in name, or a JSONL file's stem (as its Task.name)."""
    name = task or data
    return Path(name).stem if name.endswith(".jsonl") else name


def run_dir(output, task: str, spec: MethodSpec, seed: int) -> Path:
    return Path(output) / "runs" / task / spec.slug / f"seed{seed}"


def run_compare(
    base: FinetuneConfig,
    methods: Sequence[MethodSpec] | str,
    seeds: Sequence[int],
    *,
    tasks: Optional[Sequence[str]] = None,
    output,
    log=print,
) -> dict:
    """Run what is not finished yet and write summary.md/.csv, loss.png and grad_norm.png under `output`.
    `base` holds the shared settings (its task/data/method/seed/output are replaced per run). A failing run is
    reported and the others go on; Ctrl-C stops at once and leaves the interrupted run resumable."""
    from .report import collect_runs, write_summary

    if isinstance(methods, str):
        methods = parse_method_list(methods)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    task_args = [(t, None) for t in tasks] if tasks else [(base.task, None) if base.task else (None, base.data)]
    plan = [(t, d, spec, seed) for t, d in task_args for spec in methods for seed in seeds]
    write_json_atomic(output / "compare.json", {
        "base": dataclasses.asdict(base),
        "methods": [s.name for s in methods],
        "seeds": list(seeds),
        "tasks": [task_label(t, d) for t, d in task_args],
        "argv": sys.argv,
    })
    failures = []
    for i, (task, data, spec, seed) in enumerate(plan, 1):
        label = task_label(task, data)
        where = run_dir(output, label, spec, seed)
        tag = f"[{i}/{len(plan)}] {label} · {spec.name} · seed {seed}"
        if is_finished(where):
            log(f"{tag}: finished before, skipped ({where})")
            continue
        log(f"{tag}: running → {where}")
        cfg = dataclasses.replace(base, task=task, data=data if data else base.data, method=spec.name, seed=seed,
                                  output=str(where))
        start = time.perf_counter()
        try:
            summary = run_finetune(cfg)
        except (ValueError, RuntimeError, OSError) as err:
            failures.append((tag, err))
            log(f"{tag}: FAILED: {err}")
            (where / "error.txt").write_text(traceback.format_exc())
            continue
        acc = summary.get("accuracy")
        log(f"{tag}: done in {time.perf_counter() - start:.0f}s"
            + (f", {base.eval_split} accuracy {100 * acc:.2f}%" if acc is not None else ""))
    runs = [r for r in collect_runs(output / "runs")
            if r["method"] in {s.name for s in methods} and r["seed"] in set(seeds)]
    paths = {}
    if runs:
        paths = write_summary(output, runs, split=base.eval_split, methods=[s.name for s in methods],
                              tasks=[task_label(t, d) for t, d in task_args],
                              title=f"{base.model}: " + ", ".join(s.name for s in methods))
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(plan)} runs failed: "
                           + "; ".join(f"{tag}: {err}" for tag, err in failures))
    return paths


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
