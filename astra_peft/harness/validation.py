"""Refuse what cannot give a true result, before anything runs: settings, input files, option paths, models.

Every check here raises `UserError`, a one-line message that names the flag, file or line at fault and says what
would be right; the command line prints it as ``astra: error: ...`` with exit code 2. Anything else that escapes
is a bug. The module imports neither torch nor transformers at import time: `FinetuneConfig` calls it on every
construction, and `astra models` must stay quick.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from .kinds import EVAL_SPLITS
from .user_input import (  # noqa: F401  (re-exported: the checks below and callers use them from here)
    MAX_DATA_BYTES,
    MAX_LABELS,
    MAX_ROW_BYTES,
    UserError,
    check_model,
    check_model_directory,
    check_regular_file,
    looks_causal,
    read_lines,
)

def flag(field: str) -> str:
    """The command-line flag of a FinetuneConfig field: max_steps → --max-steps."""
    return "--" + field.replace("_", "-")


# ------------------------------------------------------------------------------------------ settings

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(where: str, value, low: int, high: Optional[int] = None, what: str = "") -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = what or (f"an integer ≥ {low}" if high is None else f"an integer from {low} to {high}")
        raise UserError(f"{where} must be {bound}, got {value!r}")


def _check_float(where: str, value, *, positive: bool) -> None:
    ok = _is_number(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "a finite number > 0" if positive else "a finite number ≥ 0"
        raise UserError(f"{where} must be {bound}, got {value!r}")


# FinetuneConfig fields and what each must be. Kept as data so the docs and the tests can list them.
POSITIVE_INTS = ("rank", "batch_size", "grad_accum", "eval_batch_size", "calibration_samples",
                 "calibration_batch_size")
NON_NEGATIVE_INTS = ("eval_steps", "save_steps")
OPTIONAL_POSITIVE_INTS = ("train_samples", "eval_samples")
POSITIVE_FLOATS = ("alpha", "lr", "epochs")
NON_NEGATIVE_FLOATS = ("weight_decay", "warmup", "max_grad_norm")
SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers' set_seed also feeds
MIN_LENGTH = 2  # a causal LM scores token t from tokens < t: one token alone scores nothing


def validate_config(cfg) -> None:
    """Raise UserError naming the flag of the first setting of `cfg` (a FinetuneConfig) that cannot give a true
    result: non-finite or non-positive rates and scales, zero or negative sizes and counts, a --max-steps of 0, a
    --max-length too short to score a token, method-spec values of the same kinds, and option paths that would
    write or read outside the run's --output."""
    for name in ("model", "output"):
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{flag(name)} must be a non-empty string, got {value!r}")
    for name in POSITIVE_INTS:
        _check_int(flag(name), getattr(cfg, name), 1)
    for name in NON_NEGATIVE_INTS:
        _check_int(flag(name), getattr(cfg, name), 0)
    for name in OPTIONAL_POSITIVE_INTS:
        if getattr(cfg, name) is not None:
            _check_int(flag(name), getattr(cfg, name), 1, what="an integer ≥ 1 (or left unset for all rows)")
    for name in POSITIVE_FLOATS:
        _check_float(flag(name), getattr(cfg, name), positive=True)
    for name in NON_NEGATIVE_FLOATS:
        _check_float(flag(name), getattr(cfg, name), positive=False)
    if not (_is_int(cfg.max_steps) and (cfg.max_steps == -1 or cfg.max_steps >= 1)):
        raise UserError(f"--max-steps must be an integer ≥ 1, or -1 for --epochs over the train split; "
                        f"got {cfg.max_steps!r}")
    _check_int("--max-length", cfg.max_length, MIN_LENGTH,
               what=f"an integer ≥ {MIN_LENGTH} (a shorter sequence has no token to score)")
    _check_int("--seed", cfg.seed, 0, SEED_MAX)
    if cfg.eval_split not in EVAL_SPLITS:
        raise UserError(f"--eval-split must be {' or '.join(EVAL_SPLITS)}, got {cfg.eval_split!r}")
    targets = cfg.target_modules
    if targets is not None and (isinstance(targets, str) or not targets
                                or not all(isinstance(t, str) and t.strip() for t in targets)):
        raise UserError(f"--target-modules must be a non-empty list of module names, got {targets!r}")
    validate_spec(cfg.spec, output=cfg.output)  # the spec FinetuneConfig parsed, once
    check_inputs(cfg)
    check_output_folder(cfg.output)


def check_inputs(cfg) -> None:
    """The model, data and calibration files named by `cfg` exist and are what they should be, checked with a
    stat() each before any folder is made or any model is loaded."""
    from .models import BUILTIN_MODELS
    from .tasks import BUILTIN_CORPORA, BUILTIN_TASKS

    check_model_directory(cfg.model, BUILTIN_MODELS)
    if cfg.model in BUILTIN_MODELS or cfg.task in BUILTIN_TASKS or cfg.calibration_data in (*BUILTIN_CORPORA,
                                                                                            *BUILTIN_TASKS):
        from .models import cache_dir

        cache_dir()  # refuses $ASTRA_PEFT_CACHE naming a file, before anything is fetched into it
    if cfg.data is not None:
        check_regular_file(cfg.data, "--data")
    if cfg.eval_data is not None:
        check_regular_file(cfg.eval_data, "--eval-data")
    if cfg.task is not None and cfg.task not in BUILTIN_TASKS:
        if not cfg.task.endswith(".jsonl"):
            raise UserError(f"--task {cfg.task!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a .jsonl "
                            f"file")
        check_regular_file(cfg.task, "--task")
    if cfg.eval_data is not None and cfg.data is None:
        raise UserError("--eval-data goes with --data (a built-in --task has its own test split)")
    if cfg.calibration_data is not None:
        check_calibration_source(cfg.calibration_data, "--calibration-data")


def check_calibration_source(source: str, where: str) -> None:
    from .tasks import BUILTIN_CORPORA, BUILTIN_TASKS

    if source in BUILTIN_CORPORA or source in BUILTIN_TASKS:
        return
    if not source.endswith((".jsonl", ".txt")):
        raise UserError(f"{where} {source!r}: use {', '.join(BUILTIN_CORPORA)}, a built-in task or a .jsonl/.txt "
                        f"file")
    check_regular_file(source, where)


# Method options whose value must be a positive, finite number (whatever the method's own config says).
_SPEC_POSITIVE = {"lr": float, "alpha": float, "rank": int, "calibration_samples": int}
# Method options that name files the method reads and writes (PEFT's CorDA: torch.save/torch.load).
FILE_OPTIONS = ("cache_file", "covariance_file")


def validate_spec(spec, *, output: Optional[str] = None) -> None:
    """Values in a method spec (``astra:alpha=nan``, ``lora:rank=0``) held to the rules of their flags, every other
    float option finite, and options naming files confined to `output` (the run's folder)."""
    values = {**spec.overrides, **spec.calibration, **spec.options}
    for key, value in values.items():
        where = f"method spec {spec.name!r}: {key}"
        if key in _SPEC_POSITIVE:
            if _SPEC_POSITIVE[key] is int:
                _check_int(where, value, 1)
            else:
                _check_float(where, value, positive=True)
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value!r}")
        elif key in FILE_OPTIONS and value is not None:
            confine_option_path(spec.name, key, value, output)
        elif key == "calibration_data" and value is not None:
            check_calibration_source(value, f"method spec {spec.name!r}: calibration_data")


def confine_option_path(spec_name: str, key: str, value: str, output: Optional[str]) -> Path:
    """A file named by a method option must lie inside the run's --output folder (PEFT writes it there and reads
    it back with torch.load); anything else, `..` included, is refused. An existing one must be a regular file."""
    where = f"method spec {spec_name!r}: {key}={value}"
    if output is None:
        raise UserError(f"{where}: files named by method options are only allowed inside a run's --output folder")
    root = Path(output).expanduser().resolve()
    path = Path(value).expanduser()
    resolved = path.resolve()
    if ".." in path.parts or not resolved.is_relative_to(root) or resolved == root:
        raise UserError(f"{where}: must be a file inside the run's --output folder {output} "
                        f"(e.g. {key}={Path(output) / (key + '.pt')})")
    if resolved.exists() and not resolved.is_file():
        raise UserError(f"{where}: exists and is not a regular file")
    return resolved


# ----------------------------------------------------------------------------------------- output folder

def check_output_folder(output: str) -> None:
    """An --output that exists must be a folder we can write into; one that does not must have a writable folder
    above it. (What may be inside is the run folder's business: rundir.py.)"""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {output} is a file, not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"--output {output}: {probe} is a file, so no folder can be made under it")
    if probe.exists() and not _writable(probe):
        raise UserError(f"--output {output}: the folder {probe} is not writable")


def _writable(folder: Path) -> bool:
    # access(2) also answers EROFS for a read-only mount, even to root; nothing is written to find out.
    return os.access(folder, os.W_OK | os.X_OK)


# ------------------------------------------------------------------------------------- the command line

# Exceptions that describe what the user gave (or the world they run in): shown as one line, exit code 2.
# Anything else escaping a command is a bug: shown with its traceback and said to be one, exit code 1.
_USER_FACING = (ValueError, KeyError, RuntimeError)


def describe_error(err: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that ended a command: 2 and one ``astra: error: ...`` line for a user
    mistake or an operating-system refusal (naming the file), 1 and a request to report it for anything else."""
    if isinstance(err, OSError) and not isinstance(err, _USER_FACING):
        where = f"{err.filename}: " if err.filename else ""
        return 2, f"astra: error: {where}{err.strerror or err}"
    if isinstance(err, _USER_FACING):
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if not isinstance(err, RuntimeError):  # RuntimeErrors (fetch failures) may carry a remedy over lines
            message = " ".join(str(message).split("\n"))
        return 2, f"astra: error: {message}"
    return 1, (f"astra: internal error: {type(err).__name__}: {err}\n"
               f"This is a bug in astra-peft, please report it with the traceback above and the command you ran.")


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` as integers in the seed range, each once (two runs of one seed would share a folder)."""
    seeds = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            raise UserError(f"--seeds {text!r}: {part!r} is not an integer") from None
        _check_int("--seeds", seed, 0, SEED_MAX)
        if seed in seeds:
            raise UserError(f"--seeds {text!r}: seed {seed} is listed twice")
        seeds.append(seed)
    if not seeds:
        raise UserError(f"--seeds {text!r}: no seed given")
    return seeds


def check_count(where: str, value) -> int:
    """`value` if it is an integer ≥ 1; else UserError naming `where` (a flag such as --samples)."""
    _check_int(where, value, 1)
    return value
