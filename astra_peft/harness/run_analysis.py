"""`astra analyze`: the effective rank of each adapted layer's output activations before and after fine-tuning
(the paper's Figure 3), measured on a finished run directory. It rebuilds both models from what the run saved
and hands them to the library's `effective_ranks`; evaluation (accuracy, loss) is `evaluation.py`'s.
"""

from __future__ import annotations

from .encoding import Collator, encode_row, pad_id
from .validation import UserError


def analyze_run(run_dir, *, split: str = "dev", samples: int = 64, batch_size: int = 8, progress: bool = True):
    """Effective rank (paper Eq. 9) of every adapted layer's output activations, before and after fine-tuning.

    The fine-tuned model is rebuilt from the saved weights: the plain-LoRA conversion (adapter_lora/) or the
    adapter itself on the original base, merged; or model/ for full fine-tuning.

    Args:
        run_dir: A finished run directory (one with a summary).
        split: The task split whose rows are fed through both models.
        samples: How many rows of `split` to use (the first ones).
        batch_size: Rows per forward pass.
        progress: Show progress bars.

    Returns:
        (before, after): the base model's and the fine-tuned model's {layer name: effective rank}.

    Raises:
        ValueError: The run is not finished, has no saved weights, or its adapter needs a residual base that was
            not converted to a plain LoRA; the task has no rows in `split`.
        UserError: `samples` is not a positive integer, or the task has no split `split`.
    """
    from peft import PeftModel

    from .. import effective_ranks
    from .models import load_model
    from .rundir import RunDir
    from .tasks import load_jsonl_task, load_task

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"--samples must be an integer ≥ 1, got {samples!r}")
    rundir = RunDir(run_dir)
    run = rundir.path
    if not rundir.file(RunDir.SUMMARY).is_file():
        raise ValueError(f"{run} is not a finished run (no {RunDir.SUMMARY})")
    config = rundir.read_config()
    task = load_task(config["task"]) if config.get("task") else load_jsonl_task(config["data"], config.get("eval_data"))
    num_labels = len(task.labels) if task.kind == "classification" else None
    targets = config["effective"]["target_modules"]
    if isinstance(targets, str):
        targets = None

    if split not in task.splits:
        raise UserError(f"--split {split!r}: the task has splits {', '.join(task.splits)}")
    rows = list(task.splits[split])[:samples]
    if not rows:
        raise ValueError(f"task {task.name!r} has no {split!r} rows to analyse")

    def measure(model, tokenizer):
        features = [{"input_ids": encode_row(tokenizer, r, task.kind, config["max_length"])["input_ids"]}
                    for r in rows]
        collate = Collator(pad_id(tokenizer), with_labels=False)
        batches = [collate(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
        model.eval()
        return effective_ranks(model, batches, targets or _linear_names(model), show_progress=progress)

    base, tokenizer = load_model(config["model"], task_kind=task.kind, num_labels=num_labels)
    before = measure(base, tokenizer)
    del base
    if rundir.file(RunDir.MODEL).is_dir():
        tuned, tokenizer = load_model(str(rundir.file(RunDir.MODEL)), task_kind=task.kind, num_labels=num_labels)
    else:
        tuned, tokenizer = load_model(config["model"], task_kind=task.kind, num_labels=num_labels)
        lora = rundir.file(RunDir.ADAPTER_LORA)
        adapter = lora if lora.is_dir() else rundir.file(RunDir.ADAPTER)
        if not adapter.is_dir():
            raise ValueError(f"{run} has no saved adapter (was it run with --no-save-weights?)")
        # every PEFT run keeps adapter_init (for restarts); only a rewritten base makes `adapter` unusable alone
        init = rundir.read_init() or {}
        if adapter != lora and init.get("mutates_base", rundir.file(RunDir.ADAPTER_INIT).is_dir()):
            raise ValueError(f"{run}: the adapter needs its residual base and no plain-LoRA conversion was saved")
        tuned = PeftModel.from_pretrained(tuned, str(adapter)).merge_and_unload()
    after = measure(tuned, tokenizer)
    return before, after


def _linear_names(model) -> list[str]:
    from .models import default_target_modules

    return default_target_modules(model)
