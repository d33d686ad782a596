"""What the user gave, checked at the lowest level: the `UserError` every check raises, bounded reads of user
files, and the checks of a model directory and a loaded model.

This module imports nothing else of the harness (torch only inside `check_model`), so the modules that load
files and models (fetch, models, tasks) can use it without importing `validation`, which in turn looks up
their registries: no import circle.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

# Bounds on user files, checked before anything is allocated for them.
MAX_DATA_BYTES = 1 << 30  # one JSONL/text file
MAX_ROW_BYTES = 4 << 20  # one line of it
MAX_LABELS = 1000  # classes of a classification task: the head has one row per class


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a line of data), not a bug: the CLI prints the message on
    one line and exits with code 2. A ValueError, so callers that already catch ValueError keep working."""


# ------------------------------------------------------------------------------------------------ files

def check_regular_file(path, what: str, max_bytes: Optional[int] = None) -> Path:
    """`path` as a Path once it is known to be an existing regular file of at most `max_bytes`. Refused before any
    open(): a directory, a FIFO (an open would block), a device (/dev/zero never ends), a missing path. `what`
    names it in the message, e.g. "--data"."""
    path, max_bytes = Path(path), MAX_DATA_BYTES if max_bytes is None else max_bytes
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except NotADirectoryError:
        raise UserError(f"{what} {path}: no such file (a part of the path is not a folder)") from None
    except PermissionError:
        raise UserError(f"{what} {path}: permission denied") from None
    except OSError as err:
        raise UserError(f"{what} {path}: cannot be read ({err.strerror or err})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or \
            stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file"
        raise UserError(f"{what} {path} is {kind}; give a regular file")
    if info.st_size > max_bytes:
        raise UserError(f"{what} {path} is {info.st_size:,} bytes, above the limit of {max_bytes:,}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path}: permission denied")
    return path


def read_lines(path: Path, what: str, max_row_bytes: Optional[int] = None):
    """Yield (line number, text) of a checked regular file, each line read with a size limit and decoded as UTF-8;
    a longer line or bad bytes are refused naming the line."""
    max_row_bytes = MAX_ROW_BYTES if max_row_bytes is None else max_row_bytes
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(max_row_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_row_bytes:
                raise UserError(f"{path}:{lineno}: line longer than {max_row_bytes:,} bytes ({what})")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None


# ----------------------------------------------------------------------------------------------- models

def check_model_directory(name_or_path: str, builtin: dict) -> Optional[Path]:
    """None for a built-in model name; else the local model directory, refused at once if it is not one (a typo
    must not wait on hub retries: nothing here downloads from a model hub)."""
    if name_or_path in builtin:
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise UserError(f"--model {name_or_path!r} is neither a built-in model ({', '.join(builtin)}) nor an "
                        f"existing local directory")
    if not path.is_dir():
        raise UserError(f"--model {name_or_path}: is a file; give a model directory (with config.json)")
    if not (path / "config.json").is_file():
        raise UserError(f"--model {name_or_path}: the directory has no config.json; is it a model directory?")
    return path


def check_model(model, name: str, task_kind: str) -> None:
    """Refuse a loaded model that cannot give true numbers: a non-finite weight (named), or, for generation, a
    model whose outputs at one position depend on later tokens (an encoder such as BERT loaded as a causal LM
    sees the token it is asked to predict)."""
    import torch

    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise UserError(f"--model {name}: weight {pname} holds NaN or infinite values; the model is damaged")
        if task_kind == "generation" and not looks_causal(model):
            kind = getattr(model.config, "model_type", type(model).__name__)
            raise UserError(f"--model {name} is an encoder ({kind}: each position sees the tokens after it), so it "
                            f"cannot be trained on generation data (prompt/completion rows); use it with "
                            f"classification data (text/label rows) or choose a causal LM")


def looks_causal(model) -> bool:
    """True when the logits at position 0 do not depend on the token at position 1: two 2-token inputs that differ
    only in their second token, one forward pass."""
    import torch

    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 3:
        return True  # too small a vocabulary to probe; nothing to say
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2], [1, vocab - 1]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    finally:
        model.train(was_training)
    first = logits[:, 0]
    scale = first.abs().max().clamp_min(1.0)
    return bool(((first[0] - first[1]).abs().max() / scale) < 1e-4)
