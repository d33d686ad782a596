"""Fine-tune one model with one method on one task: a run directory, built on transformers' Trainer.

A run directory holds, in the order they are written:
  config.json      the resolved configuration (method spec, hyperparameters, data fingerprints, versions)
  adapter_init/    the adapter right after initialisation (methods that rewrite the base weights)
  checkpoints/     Trainer checkpoints, for resuming; removed once the run is finished
  metrics.jsonl    one line per step (loss, grad_norm, learning_rate) and per evaluation
  adapter/         the trained adapter in PEFT format (for the residual base when the method rewrote it)
  adapter_lora/    the same adapter as a rank-2r plain LoRA of the original base model, where that applies
  summary.json     final metrics, wall times, parameter counts: written last and atomically, so a run
                   directory with a summary.json is finished and one without is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .evaluation import Collator, encode_row, evaluate, pad_id
from .methods import METHODS, BuildContext, BuiltModel, build_method, restore_initial_adapter
from .rundir import is_finished, last_valid_checkpoint, read_jsonl, write_json_atomic
from .run_config import FinetuneConfig  # noqa: F401  (the dataclass lives in a light module; see there)
from .specs import parse_method_spec


class RunInterrupted(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ small helpers


def _load_task(cfg: FinetuneConfig):
    from .tasks import load_jsonl_task, load_task

    return load_task(cfg.task) if cfg.task else load_jsonl_task(cfg.data, cfg.eval_data)


def _sample(rows: Sequence, n: int, seed: int) -> list:
    rows = list(rows)
    if n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def _calibration_features(tokenizer, source: str, n: int, seed: int, max_length: int) -> list[dict]:
    """Calibrate on something other than the task's training rows: another task's training texts, a text
    corpus (xsum) or a .txt/.jsonl file, as plain text."""
    from .tasks import load_text_corpus

    texts = _sample(load_text_corpus(source), n, seed)
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


def run_finetune(cfg: FinetuneConfig, *, callbacks: Sequence = (), force: bool = False) -> dict:
    """Fine-tune as `cfg` says and return the summary. A finished run is returned as it is (unless `force`);
    an unfinished one resumes from its last checkpoint, or starts again if it has none."""
    from accelerate import PartialState
    from transformers import set_seed

    from .models import default_target_modules, load_model

    run = Path(cfg.output)
    if is_finished(run) and not force:
        return json.loads((run / "summary.json").read_text())
    if force and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    # On a machine without accelerators, torchrun/accelerate launch processes only form a group (gloo) when the
    # state is created with cpu=True; the Trainer below is told the same through `use_cpu`.
    state = PartialState(cpu=cpu_only())

    spec = parse_method_spec(cfg.method)
    lr = spec.overrides.get("lr", cfg.lr)
    rank = spec.overrides.get("rank", cfg.rank)
    alpha = spec.overrides.get("alpha", cfg.alpha)
    calibration_samples = spec.calibration.get("calibration_samples", cfg.calibration_samples)
    calibration_data = spec.calibration.get("calibration_data", cfg.calibration_data)

    task = _load_task(cfg)
    if cfg.eval_split not in task.splits or not task.splits[cfg.eval_split]:
        raise ValueError(f"task {task.name!r} has no {cfg.eval_split!r} split to evaluate on")
    num_labels = len(task.labels) if task.kind == "classification" else None
    dtype = getattr(torch, cfg.dtype)

    set_seed(cfg.seed)  # the classification head and LoRA's random A are drawn from here
    model, tokenizer = load_model(cfg.model, task_kind=task.kind, num_labels=num_labels, dtype=dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id(tokenizer)  # sequence classification finds the last real token by it
    model.to(state.device)
    target_modules = cfg.target_modules or default_target_modules(model)

    train_rows = list(task.splits["train"])
    if cfg.train_samples:
        train_rows = _sample(train_rows, cfg.train_samples, cfg.seed)
    train_features = [encode_row(tokenizer, r, task.kind, cfg.max_length) for r in train_rows]
    if not train_features:
        raise ValueError(f"task {task.name!r} has an empty train split")

    checkpoint = last_valid_checkpoint(run)
    metrics_path = run / "metrics.jsonl"
    if checkpoint is None:  # a fresh start: nothing of an earlier attempt may leak into this one
        # adapter_init/ stays: init.json's fingerprint decides below whether it can spare a new initialisation.
        for stale in ("metrics.jsonl", "adapter", "adapter_lora", "model", "checkpoints"):
            target = run / stale
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        prior_train_seconds = 0.0
    else:  # drop what was logged after the checkpoint we resume from
        trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
        step = trainer_state["global_step"]
        kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= step and not any(k.startswith("final_") for k in r)]
        metrics_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        clock = checkpoint / "harness_clock.json"
        prior_train_seconds = json.loads(clock.read_text())["train_seconds"] if clock.exists() else 0.0

    resolved = {
        **asdict(cfg),
        "method_spec": {"name": spec.name, "method": spec.method, "options": spec.options},
        "effective": {"lr": lr, "rank": rank, "alpha": alpha, "calibration_samples": calibration_samples,
                      "calibration_data": calibration_data, "target_modules": target_modules},
        "task_name": task.name,
        "task_kind": task.kind,
        "splits": task.split_info(),
        "versions": _versions(),
    }
    if state.is_main_process:
        write_json_atomic(run / "config.json", resolved)

    collate = Collator(pad_id(tokenizer))
    calibration_batches = gradient_batches = None
    if _needs_data(spec):
        if calibration_data:
            calib_features = _calibration_features(tokenizer, calibration_data, calibration_samples, cfg.seed,
                                                   cfg.max_length)
        else:
            calib_features = _sample(train_features, calibration_samples, cfg.seed)
        no_labels = Collator(pad_id(tokenizer), with_labels=False)
        calibration_batches = _batched(calib_features, cfg.calibration_batch_size, no_labels, state.device,
                                       "calibration", cfg.progress)
        gradient_batches = _batched(_sample(train_features, calibration_samples, cfg.seed), cfg.batch_size,
                                    collate, state.device, "gradient estimation", cfg.progress)

    set_seed(cfg.seed)
    ctx = BuildContext(model=model, task_kind=task.kind, target_modules=target_modules, rank=rank, alpha=alpha,
                       seed=cfg.seed, calibration_batches=calibration_batches, gradient_batches=gradient_batches)
    built = _build_or_restore(spec, ctx, run, _init_fingerprint(resolved), state.is_main_process)
    model = built.model
    is_peft = hasattr(model, "peft_config")
    trainable, total = count_parameters(model)

    from .trainer import make_trainer

    trainer = make_trainer(
        model=model, cfg=cfg, run=run, lr=lr, train_features=train_features, collate=collate,
        evaluator=lambda m: _prefixed(evaluate(m, tokenizer, task, cfg.eval_split, batch_size=cfg.eval_batch_size,
                                               max_length=cfg.max_length, max_samples=cfg.eval_samples,
                                               progress=cfg.progress), cfg.eval_split),
        prior_train_seconds=prior_train_seconds, callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = prior_train_seconds + time.perf_counter() - start

    # Final evaluation: the chosen split, then test if it is another one.
    start = time.perf_counter()
    final = {}
    for split in dict.fromkeys([cfg.eval_split, "test"]):
        if task.splits.get(split):
            final[split] = evaluate(model, tokenizer, task, split, batch_size=cfg.eval_batch_size,
                                    max_length=cfg.max_length, max_samples=cfg.eval_samples,
                                    progress=cfg.progress)
            trainer.log({f"final_{split}_{k}": v for k, v in final[split].items() if k != "n"})
    eval_seconds = time.perf_counter() - start

    if state.is_main_process:
        if cfg.save_weights:
            _save_weights(model, tokenizer, run, is_peft, built.mutates_base)
        history = read_jsonl(metrics_path)
        losses = [r["loss"] for r in history if "loss" in r]
        summary = {
            "run": str(run),
            "method": spec.name,
            "base_method": spec.method,
            "task": task.name,
            "model": cfg.model,
            "seed": cfg.seed,
            "lr": lr,
            "rank": rank,
            "alpha": alpha,
            "steps": trainer.state.global_step,
            "final": final,
            "metric_split": cfg.eval_split,
            "accuracy": final.get(cfg.eval_split, {}).get("accuracy"),
            "test_accuracy": final.get("test", {}).get("accuracy"),
            "final_train_loss": losses[-1] if losses else None,
            "mean_train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "seconds": {"calibration": built.calibration_seconds, "initialization": built.init_seconds,
                        "training": train_seconds, "evaluation": eval_seconds},
            "init_report": built.report,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "init_restored": built.report.get("restored_from") is not None,
        }
        write_json_atomic(run / "summary.json", summary)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the run is finished: nothing left to resume
        if not cfg.save_weights:
            shutil.rmtree(run / "adapter_init", ignore_errors=True)
    state.wait_for_everyone()  # every process returns the summary the main one wrote
    return json.loads((run / "summary.json").read_text())


# What decides the initial adapter: a saved one is reused only when all of these match.
_INIT_KEYS = ("model", "task", "data", "eval_data", "seed", "max_length", "dtype", "train_samples",
              "calibration_batch_size", "method_spec", "effective", "splits")


def _init_fingerprint(resolved: dict) -> str:
    payload = {k: resolved.get(k) for k in _INIT_KEYS}
    payload["effective"] = {k: v for k, v in payload["effective"].items() if k != "lr"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _build_or_restore(spec, ctx: BuildContext, run: Path, fingerprint: str, is_main: bool):
    """Build the method, or, when this run directory already holds the initial adapter for exactly this
    configuration (a restart after Ctrl-C), rebuild the model from it without calibrating again. The saved
    initial adapter also serves the plain-LoRA conversion at the end."""
    init_dir, meta_path = run / "adapter_init", run / "init.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta and meta["fingerprint"] == fingerprint and init_dir.is_dir():
        model = restore_initial_adapter(ctx.model, init_dir, spec.method, meta["mutates_base"])
        return BuiltModel(model, calibration_seconds=meta["calibration_seconds"], init_seconds=meta["init_seconds"],
                          mutates_base=meta["mutates_base"], report={**meta["report"], "restored_from": str(init_dir)})
    built = build_method(spec, ctx)
    if is_main and hasattr(built.model, "peft_config"):
        meta_path.unlink(missing_ok=True)
        tmp = run / ".adapter_init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        built.model.save_pretrained(str(tmp))
        shutil.rmtree(init_dir, ignore_errors=True)
        os.replace(tmp, init_dir)
        # init.json last: its presence says adapter_init/ is complete
        write_json_atomic(meta_path, {"fingerprint": fingerprint, "mutates_base": built.mutates_base,
                                      "calibration_seconds": built.calibration_seconds,
                                      "init_seconds": built.init_seconds, "report": built.report})
    return built


def cpu_only() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def _needs_data(spec) -> bool:
    return METHODS[spec.method].data is not None


def _prefixed(metrics: dict, split: str) -> dict:
    return {f"{split}_{k}": v for k, v in metrics.items() if k != "n"}


def _save_weights(model, tokenizer, run: Path, is_peft: bool, mutates_base: bool) -> None:
    if not is_peft:
        model.save_pretrained(str(run / "model"))
        tokenizer.save_pretrained(str(run / "model"))
        return
    model.save_pretrained(str(run / "adapter"))
    if mutates_base and (run / "adapter_init").is_dir():
        # the difference to the initial adapter as a rank-2r LoRA of the original base, trained head included
        from ..conversion import save_as_lora

        save_as_lora(model, run / "adapter_lora", run / "adapter_init")


def steps_for(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))
