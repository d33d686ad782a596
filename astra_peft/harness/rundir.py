"""The files of a run directory (see `training`): atomic JSON, the metrics log, and which checkpoint to resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def write_json_atomic(path: Path, payload) -> None:
    # A temporary name of its own: two `astra compare` processes sharing one output folder both write
    # compare.json, and a shared ".compare.json.tmp" let one rename the other's file away mid-write.
    # (The pid, not mkstemp: mkstemp's 0600 mode would outlive the rename.)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_finished(run_dir) -> bool:
    return (Path(run_dir) / "summary.json").is_file()


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_valid_checkpoint(run_dir: Path) -> Optional[Path]:
    """Newest checkpoint whose trainer_state.json exists: the Trainer writes that file last, so a checkpoint
    cut short by Ctrl-C is passed over for the one before it."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = []
    for ckpt in folder.glob("checkpoint-*"):
        step = ckpt.name.rsplit("-", 1)[-1]
        if step.isdigit() and (ckpt / "trainer_state.json").is_file():
            found.append((int(step), ckpt))
    return max(found)[1] if found else None
