"""Output a person can read: progress bars that suit where they are written, and no noise a user cannot act on.

Two steps, because some settings must be in place before a library is imported and some need it imported:
`prepare_output` (environment, warning filters, loggers; imports nothing heavy) runs first thing in the CLI;
`quiet_libraries` runs inside a command, once torch and transformers are loaded anyway.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Warnings raised inside libraries we call, about their own internals, which the user cannot act on. Each is
# filtered by its exact message only, so that any other warning still shows.
_IGNORED_WARNINGS = (
    # PEFT reads `model.is_gradient_checkpointing` (peft_model.py) in every get_peft_model; transformers 5
    # deprecated the property in favour of is_activation_checkpointing. Nothing in our code touches it.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    # PEFT's memory hint for EVA on large batches; calibration batches here are small and results do not change.
    (UserWarning, "lora with eva initialization used with low_cpu_mem_usage=False"),
    # PEFT's LoRA-GA preprocessing hooks fire on a model whose inputs are token ids (no grad): expected there.
    (UserWarning, "Full backward hook is firing when gradients are computed with respect to module outputs"),
)

# Loggers that report, at import, optional speed-ups for routes the `astra` CLI never takes.
_QUIET_LOGGERS = (
    # bitsandbytes' CPU backend tries the `kernels` package for a 4-bit matmul and logs a warning per process
    # when it is missing; the CLI loads no 4-bit model (QLoRA users calling the library still see it).
    "bitsandbytes.backends.cpu.ops",
)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (pytest capture, pipes closed early)
        return False


def prepare_output(progress: bool = True, *, stream=None) -> None:
    """Settings that must precede the heavy imports. Call before anything imports tqdm or transformers.

    Args:
        progress: False (--no-progress) turns every progress bar off: ours, transformers' ("Loading weights")
            and huggingface_hub's.
        stream: Where bars are drawn (default sys.stderr). When it is not a terminal (a log file, a pipe, CI),
            bars never move the cursor (tqdm nests a second bar one line down with ESC[A, which a log keeps as
            garbage) and redraw at most every 30 s instead of ten times a second. A user's own TQDM_* settings win.
    """
    stream = sys.stderr if stream is None else stream
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"  # the default for every tqdm bar created after this
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub and transformers at import
    if not _is_terminal(stream):
        os.environ.setdefault("TQDM_POSITION", "0")
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    for category, message in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_libraries(progress: bool = True) -> None:
    """Settings that need torch/transformers imported; call at the start of a command that uses them anyway."""
    import torch

    # DeepSpeed (imported by transformers' Trainer when installed) logs "Setting accelerator to CPU. If you
    # have GPU or other accelerator, we were unable to detect it." on stdout of every CPU-only run. Telling it
    # the answer it would reach is silent; on a machine with an accelerator nothing is set.
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    accelerated = (torch.cuda.is_available() or (mps is not None and mps.is_available())
                   or (xpu is not None and xpu.is_available()))
    if not accelerated:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not progress:
        # The environment set by prepare_output is read at import; transformers may have been imported earlier
        # in this process (a caller of cli.main), so switch its bars off directly as well.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
