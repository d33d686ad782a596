"""Atomic writes, the project's one helper for them: a file or folder appears complete or not at all.

Every writer (statistics files, the plain-LoRA conversion, the harness's run folders and model cache) goes through
`atomic_path`, `atomic_dir` or `write_json_atomic`, so a kill mid-write never leaves a half file under its final
name. The temporary name is next to the destination (same file system, so the final rename is atomic) and unique
per process and call: two processes writing one file never rename each other's half-written file away.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)

# Temporary names start with this, so a folder's owner can recognise (and clear) what a killed writer left.
TMP_PREFIX = ".astra-tmp-"


def _tmp_name(dest: Path) -> str:
    return f"{TMP_PREFIX}{dest.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `dest`; it becomes `dest` only if the block finishes.

    Args:
        dest: The final file path. Its folder is created if needed.

    Returns:
        A context manager yielding the temporary path to write to.

    Raises:
        OSError: If the folder cannot be created or the rename fails; the temporary file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_tmp_name(dest), suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a shared cache or run folder is meant to be read
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `dest`; it becomes `dest` only if the block finishes.

    Args:
        dest: The final folder path.
        keep_existing: If `dest` exists when the block finishes, keep it and discard the new copy (a shared cache:
            a concurrent process finished first). Otherwise the old folder is replaced.

    Returns:
        A context manager yielding the temporary folder to fill.

    Raises:
        OSError: If the rename fails; the temporary folder is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_tmp_name(dest), suffix=".part"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp (and some savers) leave owner-only modes
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)
        if keep_existing:
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
                shutil.rmtree(tmp)  # a concurrent process finished first: keep its copy
            return
        old = None
        if dest.exists():
            # a folder cannot be replaced by a rename: move the old one aside first, remove it after
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_tmp_name(dest), suffix=".old"))
            os.rename(dest, old / "x")
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(payload, *, indent: int | None = 2, where: str = "JSON") -> str:
    """`payload` as strict JSON: NaN and infinities are refused (they are not JSON, and no reader should see a
    number that is not one).

    Raises:
        ValueError: Naming `where` and the offending key when a value is not finite.
    """
    try:
        return json.dumps(payload, indent=indent, sort_keys=True, default=str, allow_nan=False)
    except ValueError:
        raise ValueError(f"{where}: refusing to write a non-finite number ({_first_non_finite(payload)})") from None


def _first_non_finite(payload, path: str = "") -> str:
    if isinstance(payload, float) and not math.isfinite(payload):
        return f"{path or 'value'} = {payload}"
    items = payload.items() if isinstance(payload, dict) else enumerate(payload) if isinstance(payload, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return ""


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write `payload` as indented, sorted, strict JSON to `path` atomically.

    Raises:
        ValueError: If the payload holds NaN or an infinity (naming the file and the key); nothing is written.
    """
    write_text_atomic(path, json_text(payload, where=str(path)) + "\n")
