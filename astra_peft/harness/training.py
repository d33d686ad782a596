"""Fine-tune one model with one method on one task into a run folder, built on transformers' Trainer.

`run_finetune` claims the folder (rundir.RunDir: the marker, the lock, the settings it was made with), then runs
the phases in order: load (task, model), resume point, initialise or restore, train, final evaluation, save. The
folder's files, and the order in which they are written, are described in rundir.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .encoding import Collator, encode_row, pad_id
from .evaluation import evaluate
from .methods import METHODS, BuildContext
from .restore import build_or_restore, init_fingerprint
from .rundir import RunDir, check_output
from .trainer import cpu_only  # noqa: F401  (re-exported: it used to live here)
from .threads import load_average
from .run_config import FinetuneConfig  # noqa: F401  (the dataclass lives in a light module; see there)


# ------------------------------------------------------------------------------------------ small helpers


def _load_task(cfg: FinetuneConfig):
    from .tasks import load_jsonl_task, load_task

    return load_task(cfg.task) if cfg.task else load_jsonl_task(cfg.data, cfg.eval_data)


def _sample(rows: Sequence, n: int, seed: int) -> list:
    rows = list(rows)
    if n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def _calibration_features(tokenizer, source: str, n: int, seed: int, max_length: int, forgetting=None) -> list[dict]:
    """Calibrate on something other than the task's training rows: another task's training texts, a text
    corpus (xsum) or a .txt/.jsonl file, as plain text; never on the forgetting measure's texts."""
    from .forgetting import calibration_part, check_disjoint
    from .tasks import load_text_corpus

    texts = _sample(load_text_corpus(source, calibration_part(source, forgetting)), n, seed)
    check_disjoint(texts, forgetting, source)
    return [{"input_ids": tokenizer(t, truncation=True, max_length=max_length)["input_ids"]} for t in texts]


def _batched(features: list[dict], size: int, collate: Collator, device, desc: Optional[str], progress: bool):
    from tqdm.auto import tqdm

    def batches() -> Iterable[dict]:
        starts = range(0, len(features), size)
        if desc:
            starts = tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch")
        for start in starts:
            yield {k: v.to(device) for k, v in collate(features[start : start + size]).items()}

    return batches


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _versions() -> dict:
    import peft
    import transformers

    from .. import __version__

    return {"astra_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


# ------------------------------------------------------------------------------------------- the run

# FinetuneConfig fields that say how a run is carried out, not what it computes: changing them never makes a
# run folder's results stale. (data/eval_data are paths: their content is fingerprinted instead, in "data".)
_HOW = ("output", "progress", "save_steps", "threads", "data", "eval_data", "model")


def run_settings(cfg: FinetuneConfig, task) -> dict:
    """What a run folder's results depend on: the settings, the data's content, the model and the versions of the
    code. Stored in the folder's marker; a rerun with other settings is refused (or started afresh)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _HOW}
    settings["model"] = _model_identity(cfg.model)
    settings["data"] = {"task": task.name, "kind": task.kind, "labels": task.labels,
                        **{split: info["sha256"] for split, info in task.split_info().items()}}
    calibration = _effective(cfg, cfg.spec)["calibration_data"]
    if calibration and Path(calibration).expanduser().is_file():  # a text/JSONL file: its content, not its name
        settings["calibration_sha256"] = hashlib.sha256(Path(calibration).expanduser().read_bytes()).hexdigest()
    if cfg.forgetting_data and Path(cfg.forgetting_data).expanduser().is_file():
        settings["forgetting_sha256"] = hashlib.sha256(Path(cfg.forgetting_data).expanduser().read_bytes()).hexdigest()
    settings["versions"] = _versions()
    return settings


def _model_identity(model: str):
    path = Path(model).expanduser()
    if not path.is_dir():
        return model  # a built-in name
    config = path / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"path": str(path.resolve()), "config_sha256": digest}


def _effective(cfg: FinetuneConfig, spec) -> dict:
    """The values a method spec may override for itself (lr/rank/alpha, calibration) merged over the flags'."""
    return {"lr": spec.overrides.get("lr", cfg.lr), "rank": spec.overrides.get("rank", cfg.rank),
            "alpha": spec.overrides.get("alpha", cfg.alpha),
            "calibration_samples": spec.calibration.get("calibration_samples", cfg.calibration_samples),
            "calibration_data": spec.calibration.get("calibration_data", cfg.calibration_data)}


def run_finetune(cfg: FinetuneConfig, *, callbacks: Sequence = (), force: bool = False,
                 restart_if_changed: bool = False) -> dict:
    """Fine-tune as `cfg` says and return the summary.

    The run folder (`cfg.output`) must be new, empty, or a run folder astra made (see `rundir`). A finished run
    made with these settings is returned as it is; an unfinished one resumes from its last whole checkpoint.

    Args:
        cfg: The run's configuration.
        callbacks: Extra transformers TrainerCallbacks.
        force: Start afresh even if the run is finished or was made with other settings (removes only the
            files astra made in the folder).
        restart_if_changed: Start afresh if the folder was made with other settings (`astra compare`).

    Returns:
        The summary (also in summary.json).

    Raises:
        UserError: The folder is not a run folder, lies in the model/data, was made with other settings (and
            neither flag is set), is being written by another process, or holds only damaged checkpoints.
    """
    from accelerate import PartialState

    # On a machine without accelerators, torchrun/accelerate launch processes only form a group (gloo) when the
    # state is created with cpu=True; the Trainer below is told the same through `use_cpu`.
    state = PartialState(cpu=cpu_only())
    if cfg.threads is not None:  # the CLI chose it (harness/threads.py); library callers may too
        from .threads import apply_threads

        apply_threads(cfg.threads)
    spec = cfg.spec  # parsed once, when the FinetuneConfig was made
    effective = _effective(cfg, spec)
    run = RunDir(check_output(cfg.output, model=cfg.model,
                              files=(cfg.data, cfg.eval_data, effective["calibration_data"], cfg.forgetting_data)))
    run.check_writable()  # someone else's folder is refused before anything is loaded or written
    task = _load_task(cfg)
    from .forgetting import forgetting_set

    forgetting = forgetting_set(cfg, task)  # refused here, before the folder is claimed or a model loaded
    settings = run_settings(cfg, task)
    # One writer per run folder. Under torchrun every process runs this; the main one owns the folder.
    with run.lock() if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            run.claim(settings, restart=force, restart_if_changed=restart_if_changed)
        state.wait_for_everyone()
        if run.is_finished():
            if state.is_main_process:
                run.clear([RunDir.CHECKPOINTS])  # a kill between the summary and this removal left them
            return run.read_summary()
        return _run(cfg, spec, effective, task, run, state, callbacks, forgetting)


def _run(cfg: FinetuneConfig, spec, effective: dict, task, run: RunDir, state, callbacks, forgetting=None) -> dict:
    """The phases of a run: load, resume point, forgetting before, initialise (or restore), train, evaluate,
    forgetting after, save."""
    from .forgetting import measure, summary_fields

    # CPU time and load beside wall time: on a shared machine, wall time alone says more about the load than the run.
    cpu_start, load_start = time.process_time(), load_average()
    if cfg.eval_split not in task.splits or not task.splits[cfg.eval_split]:
        raise ValueError(f"task {task.name!r} has no {cfg.eval_split!r} split to evaluate on")
    model, tokenizer, target_modules = _load(cfg, task, state)
    train_features = _encode(cfg, task, tokenizer)
    checkpoint, prior_train_seconds = _resume_point(run, state)

    resolved = {
        **asdict(cfg),
        "method_spec": {"name": spec.name, "method": spec.method, "options": spec.options},
        "effective": {**effective, "target_modules": target_modules},
        "threads_used": torch.get_num_threads(),  # what torch ran with, whether or not cfg.threads was set
        "task_name": task.name,
        "task_kind": task.kind,
        "splits": task.split_info(),
        "versions": _versions(),
    }
    if state.is_main_process:
        run.write_config(resolved)

    collate = Collator(pad_id(tokenizer))
    forget_start = time.perf_counter()  # the base model as loaded: before any method rewrites its weights
    forget_before = measure(model, tokenizer, forgetting, cfg) if forgetting else None
    forget_seconds = time.perf_counter() - forget_start
    built = _initialise(cfg, spec, effective, model, tokenizer, task, target_modules, train_features, collate, run,
                        resolved, state, forgetting)
    trainable, total = count_parameters(built.model)
    trainer, train_seconds = _train(cfg, effective, built.model, tokenizer, task, run, train_features, collate,
                                    checkpoint, prior_train_seconds, callbacks)
    steps = trainer.state.global_step
    final, eval_seconds = _final_evaluation(cfg, trainer, built.model, tokenizer, task)
    forget_start = time.perf_counter()
    forget_after = measure(built.model, tokenizer, forgetting, cfg) if forgetting else None
    forget_seconds += time.perf_counter() - forget_start

    if state.is_main_process:
        if cfg.save_weights:
            _save_weights(built.model, tokenizer, run, hasattr(built.model, "peft_config"), built.mutates_base)
        losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
        run.write_summary({
            "run": str(run.path),
            "method": spec.name,
            "base_method": spec.method,
            "task": task.name,
            "model": cfg.model,
            "seed": cfg.seed,
            "lr": effective["lr"],
            "rank": effective["rank"],
            "alpha": effective["alpha"],
            "steps": steps,
            "final": final,
            "metric_split": cfg.eval_split,
            "accuracy": final.get(cfg.eval_split, {}).get("accuracy"),
            "test_accuracy": final.get("test", {}).get("accuracy"),
            "final_train_loss": losses[-1] if losses else None,
            "mean_train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "seconds": {"calibration": built.calibration_seconds, "initialization": built.init_seconds,
                        "training": train_seconds, "evaluation": eval_seconds,
                        **({"forgetting": forget_seconds} if forgetting else {})},
            **summary_fields(forgetting, forget_before, forget_after),
            "cpu_seconds": time.process_time() - cpu_start,  # this process, all threads, this attempt
            "load_average": {"start": load_start, "end": load_average()},
            "init_report": built.report,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "init_restored": built.report.get("restored_from") is not None,
        })
        run.clear([RunDir.CHECKPOINTS])  # the run is finished: nothing left to resume
        if not cfg.save_weights:
            run.clear([RunDir.ADAPTER_INIT])
    state.wait_for_everyone()  # every process returns the summary the main one wrote
    return run.read_summary()


def _load(cfg: FinetuneConfig, task, state):
    from transformers import set_seed

    from .models import default_target_modules, load_model

    num_labels = len(task.labels) if task.kind == "classification" else None
    set_seed(cfg.seed)  # the classification head and LoRA's random A are drawn from here
    model, tokenizer = load_model(cfg.model, task_kind=task.kind, num_labels=num_labels, dtype=getattr(torch, cfg.dtype))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id(tokenizer)  # sequence classification finds the last real token by it
    model.to(state.device)
    return model, tokenizer, cfg.target_modules or default_target_modules(model)


def _encode(cfg: FinetuneConfig, task, tokenizer) -> list[dict]:
    train_rows = list(task.splits["train"])
    if cfg.train_samples:
        train_rows = _sample(train_rows, cfg.train_samples, cfg.seed)
    features = [encode_row(tokenizer, r, task.kind, cfg.max_length) for r in train_rows]
    if not features:
        raise ValueError(f"task {task.name!r} has an empty train split")
    return features


def _resume_point(run: RunDir, state) -> tuple[Optional[Path], float]:
    """The checkpoint to resume from (None: a fresh start) and the training seconds spent before it. Nothing of
    an earlier attempt after that point may leak into this one."""
    checkpoint = run.checkpoint()
    prior_train_seconds = 0.0
    if checkpoint is not None:
        clock = checkpoint / RunDir.CLOCK
        prior_train_seconds = json.loads(clock.read_text())["train_seconds"] if clock.is_file() else 0.0
    if state.is_main_process:
        if checkpoint is None:
            run.clear(RunDir.TRAINED)
        else:
            run.keep_metrics_until(RunDir.checkpoint_step(checkpoint))
    state.wait_for_everyone()
    return checkpoint, prior_train_seconds


def _initialise(cfg, spec, effective, model, tokenizer, task, target_modules, train_features, collate, run,
                resolved, state, forgetting=None):
    """Build the method on the model (calibrating first if it needs data), or restore its saved initialisation."""
    from transformers import set_seed

    calibration_batches = gradient_batches = None
    if _needs_data(spec):
        n, source = effective["calibration_samples"], effective["calibration_data"]
        calib_features = (_calibration_features(tokenizer, source, n, cfg.seed, cfg.max_length, forgetting)
                          if source else _sample(train_features, n, cfg.seed))
        no_labels = Collator(pad_id(tokenizer), with_labels=False)
        calibration_batches = _batched(calib_features, cfg.calibration_batch_size, no_labels, state.device,
                                       "calibration", cfg.progress)
        gradient_batches = _batched(_sample(train_features, n, cfg.seed), cfg.batch_size, collate, state.device,
                                    "gradient estimation", cfg.progress)
    set_seed(cfg.seed)
    ctx = BuildContext(model=model, task_kind=task.kind, target_modules=target_modules, rank=effective["rank"],
                       alpha=effective["alpha"], seed=cfg.seed, calibration_batches=calibration_batches,
                       gradient_batches=gradient_batches, progress=cfg.progress)
    return build_or_restore(spec, ctx, run, init_fingerprint(resolved), state.is_main_process)


def _train(cfg, effective, model, tokenizer, task, run: RunDir, train_features, collate, checkpoint,
           prior_train_seconds: float, callbacks):
    """Train (or resume) to the last step; returns the trainer and the training seconds (all attempts)."""
    from .trainer import make_trainer

    def evaluator(m):
        return _prefixed(evaluate(m, tokenizer, task, cfg.eval_split, batch_size=cfg.eval_batch_size,
                                  max_length=cfg.max_length, max_samples=cfg.eval_samples, progress=cfg.progress),
                         cfg.eval_split)

    trainer = make_trainer(model=model, cfg=cfg, run=run, lr=effective["lr"], train_features=train_features,
                           collate=collate, evaluator=evaluator, prior_train_seconds=prior_train_seconds,
                           callbacks=callbacks)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer, prior_train_seconds + time.perf_counter() - start


def _final_evaluation(cfg, trainer, model, tokenizer, task) -> tuple[dict, float]:
    """The chosen split, then test if it is another one; each logged to metrics.jsonl as final_* keys."""
    start = time.perf_counter()
    final = {}
    for split in dict.fromkeys([cfg.eval_split, "test"]):
        if task.splits.get(split):
            final[split] = evaluate(model, tokenizer, task, split, batch_size=cfg.eval_batch_size,
                                    max_length=cfg.max_length, max_samples=cfg.eval_samples, progress=cfg.progress)
            trainer.log({f"final_{split}_{k}": v for k, v in final[split].items() if k != "n"})
    return final, time.perf_counter() - start


def _needs_data(spec) -> bool:
    return METHODS[spec.method].data is not None


def _prefixed(metrics: dict, split: str) -> dict:
    return {f"{split}_{k}": v for k, v in metrics.items() if k != "n"}


def _save_weights(model, tokenizer, run: RunDir, is_peft: bool, mutates_base: bool) -> None:
    """The trained weights, each folder written whole or not at all."""
    if not is_peft:
        with run.adapter_dir(RunDir.MODEL) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        return
    with run.adapter_dir(RunDir.ADAPTER) as tmp:
        model.save_pretrained(str(tmp))
    init_dir = run.file(RunDir.ADAPTER_INIT)
    if mutates_base and init_dir.is_dir():
        # the difference to the initial adapter as a rank-2r LoRA of the original base, trained head included
        from ..conversion import save_as_lora

        with run.adapter_dir(RunDir.ADAPTER_LORA) as tmp:
            save_as_lora(model, tmp, init_dir)


def steps_for(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))
