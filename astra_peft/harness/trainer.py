"""The Trainer a run uses: transformers' own, so `accelerate launch` and `torchrun` work unchanged, with our
evaluation (accuracy by likelihood, not only loss) and every log line written to metrics.jsonl."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

# Keys of Trainer logs kept out of metrics.jsonl: times (so two runs with one seed give byte-identical files;
# wall times live in summary.json) and the end-of-training averages, which after a resume cover only the resumed
# part (the per-step losses are all there).
_DROPPED_KEYS = ("runtime", "per_second", "train_loss", "total_flos")


def cpu_only() -> bool:
    """True on a machine with neither CUDA nor MPS: the Trainer and the process group must be told to use CPU."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


class _NothingLeftToTrain(Exception):
    """Raised at the start of a resumed training whose checkpoint is already at the last step."""


def make_trainer(*, model, cfg, run, lr: float, train_features, collate, evaluator,
                 prior_train_seconds: float = 0.0, callbacks: Sequence = ()):
    """A plain transformers Trainer (so `accelerate launch` / `torchrun` work unchanged) whose evaluation is
    ours (accuracy by likelihood, not just loss) and whose logs go to the run folder's metrics.jsonl (`run` is a
    rundir.RunDir)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .._io import write_json_atomic
    from .rundir import RunDir

    class HarnessTrainer(Trainer):
        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            except _NothingLeftToTrain:
                return None  # the checkpoint's weights and state are loaded: the run continues from there

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            metrics = evaluator(self.model)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    class MetricsWriter(TrainerCallback):
        """Every log line (loss, grad_norm, learning_rate each step; evaluations) → metrics.jsonl."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {k: v for k, v in logs.items() if not any(t in k for t in _DROPPED_KEYS)}
            if set(record) <= {"epoch"}:
                return
            record["step"] = state.global_step
            run.append_metric(record)

    class StopIfDone(TrainerCallback):
        """A checkpoint saved at the last step (the run was killed after it, before its summary) resumes into
        the Trainer's epoch loop, which takes one more step before it checks for the end (121 of 120): stop
        before the first one. The checkpoint's weights are loaded by then."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise _NothingLeftToTrain

    class Clock(TrainerCallback):
        """Keeps the training wall time with each checkpoint, so a resumed run reports its whole cost."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                seconds = prior_train_seconds + time.perf_counter() - self.start
                write_json_atomic(ckpt / RunDir.CLOCK, {"train_seconds": seconds})

    args = TrainingArguments(
        output_dir=str(run.file(RunDir.CHECKPOINTS)),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        learning_rate=lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and stops the run), never averaged away
        eval_strategy="steps" if cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=2,  # the newest may be cut short by Ctrl-C; the one before it then serves
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.dtype == "bfloat16" and torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=not cfg.progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=cpu_only(),
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = HarnessTrainer(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=train_features[:1] if cfg.eval_steps > 0 else None,  # unused: our evaluate() has its data
        data_collator=collate,
        # FiniteGuard first: a NaN loss or weight stops the run (naming the step) before it is logged or saved.
        callbacks=[_finite_guard(), MetricsWriter(), Clock(), StopIfDone(), *callbacks],
    )
    # The stock callbacks print every step's log dict under the bar (or to stdout without one); those
    # numbers are in metrics.jsonl, so the bar just shows the latest loss.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if cfg.progress:
        trainer.add_callback(_quiet_progress_cls()())
    return trainer


def _finite_guard():
    from .guards import FiniteGuard

    return FiniteGuard()


def _quiet_progress_cls():
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:  # named like the other phases' bars (calibration, eval ...)
                self.training_bar.set_description("training", refresh=False)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

    return QuietProgress
