"""The configuration of one fine-tuning run, apart from the code that runs it.

It lives in its own module, with no torch, transformers or PEFT import, because the CLI derives one flag per
field from it: `astra --help` reads this dataclass and must answer in well under a second.
`astra_peft.harness.training` re-exports it, so `from astra_peft.harness.training import FinetuneConfig` still works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .kinds import MODEL_DTYPES, EvalSplit, ModelDtype


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults follow the paper's Appendix F where it has one (AdamW, cosine schedule,
    warmup ratio 0.03, no weight decay, dropout 0, LoRA rank 8 and α 16, 64 calibration samples)."""

    model: str = field(metadata={"help": "Built-in model name (see `astra models`) or a local model directory."})
    output: str = field(metadata={"help": "Run directory."})
    task: Optional[str] = field(default=None, metadata={"help": "Built-in task name (see `astra tasks`)."})
    data: Optional[str] = field(default=None, metadata={"help": "A task as a JSONL file, instead of --task."})
    eval_data: Optional[str] = field(
        default=None, metadata={"help": "With --data: a JSONL test split (else dev and test are carved from it)."}
    )
    method: str = field(default="astra", metadata={"help": "Method spec: METHOD[:KEY=VALUE]..."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling α/r)."})
    target_modules: Optional[list] = field(
        default=None, metadata={"help": "Module names to adapt; default: every linear layer of the blocks."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1: `epochs` over the train split."})
    epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    batch_size: int = field(default=8, metadata={"help": "Per-device train batch size."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and calibration sample."})
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per training sequence."})
    warmup: float = field(default=0.03, metadata={"help": "Warmup: a ratio of the steps if < 1, else steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    scheduler: str = field(default="cosine", metadata={"help": "transformers lr_scheduler_type."})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimizer name."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: none)."})
    dtype: ModelDtype = field(default="float32", metadata={"help": "Model dtype: float32 or bfloat16."})
    train_samples: Optional[int] = field(default=None, metadata={"help": "Use only this many training rows."})
    eval_split: EvalSplit = field(default="dev", metadata={"help": "Split evaluated during training: dev or test."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on at most N rows per split."})
    eval_batch_size: int = field(default=16, metadata={"help": "Sequences per evaluation batch."})
    calibration_samples: int = field(default=64, metadata={"help": "Calibration samples (data-driven methods)."})
    calibration_data: Optional[str] = field(
        default=None,
        metadata={"help": "Calibrate on another task, a text corpus (e.g. xsum) or a text/JSONL file."},
    )
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per calibration batch."})
    forgetting_data: Optional[str] = field(
        default=None,
        metadata={"help": "Causal LMs: measure forgetting as the mean token loss on held-out general text (xsum, or a "
                          "text/JSONL file) before and after fine-tuning; off by default."},
    )
    forgetting_samples: int = field(default=64, metadata={"help": "Texts scored by --forgetting-data."})
    forgetting_max_length: int = field(default=256, metadata={"help": "Maximum tokens per --forgetting-data text."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps, for resuming."})
    save_weights: bool = field(default=True, metadata={"help": "Save the trained adapter (or full model)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    threads: Optional[int] = field(
        default=None,
        metadata={"help": "CPU threads for torch; default: the cores not already busy (see harness/threads.py)."},
    )

    def __post_init__(self):
        if (self.task is None) == (self.data is None):
            raise ValueError("give exactly one of --task or --data")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be {' or '.join(MODEL_DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        # Imported here, not at the top: the method registry imports torch, and this module must stay light
        # so that `astra --help` can list these fields as flags without it.
        from .specs import MethodSpec, parse_method_spec

        # The spec is parsed once, here (failing before any model is loaded): `self.spec` is the typed
        # MethodSpec the run builds from, and `method` keeps its text, the run's name in config.json and
        # tables. A MethodSpec passed as `method` (the CLI and compare have parsed it already) is taken as is.
        spec = self.method if isinstance(self.method, MethodSpec) else parse_method_spec(self.method)
        self.method, self.spec = spec.name, spec
        from .validation import validate_config

        validate_config(self)  # non-finite or nonsensical settings, named by their flag (issue 16)
        from .forgetting import check_forgetting_settings

        check_forgetting_settings(self)
