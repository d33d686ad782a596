"""Folders astra owns: the marker that says so, the settings a folder was made with, the lock, and the rules
that keep a user's files safe (rundir.py's RunDir and CompareDir build on `OwnedDir`):

- a folder is written only when it is new, empty, or carries our marker; anything else is refused, naming it;
- starting afresh (`--restart`/`--force`) removes only the names listed in `OWNED`, never anything else;
- a marker made with other settings is refused with the settings that differ (or, asked to, started afresh);
- a lock file (`.astra-run.lock`, with the writer's pid) keeps a second process out while one is writing; a
  lock whose process has died is taken over (it is an flock, which the kernel releases with the process);
- a folder written before folders carried a marker is recognised by its own record (LEGACY_FILE) when nothing
  else is in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional

from .._io import TMP_PREFIX, write_json_atomic

from .validation import UserError


class RunLocked(UserError):
    """Another live process is writing the folder."""


MARKER = ".astra-run.json"
LOCK = ".astra-run.lock"
FORMAT = 1


def _settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def settings_diff(old: dict, new: dict, limit: int = 6) -> str:
    """The settings that differ, as 'key: old → new; ...' (at most `limit`, then a count); '' if none."""
    a, b = _flatten(old or {}), _flatten(new or {})
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    shown = [f"{k}: {a.get(k, '<unset>')} → {b.get(k, '<unset>')}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


class OwnedDir:
    """A folder with our marker: claiming it, clearing what we made in it, locking it, its JSON files."""

    KIND = "?"
    OWNED: tuple[str, ...] = ()
    # A folder written before folders carried a marker is recognised by this file of ours holding these keys
    # (and nothing in the folder but names we own): the study's packed run folders, older users' runs.
    LEGACY_FILE: Optional[str] = None
    LEGACY_KEYS: tuple[str, ...] = ()

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    # ---- the marker

    def read_marker(self) -> Optional[dict]:
        """The marker, or None if the folder has none.

        Raises:
            UserError: If the marker is unreadable (naming it).
        """
        if not self.marker_path.is_file():
            return None
        try:
            marker = json.loads(self.marker_path.read_text())
            if not isinstance(marker, dict) or "kind" not in marker:
                raise ValueError("not a marker")
        except ValueError as err:
            raise UserError(f"{self.marker_path} is damaged ({err}); start afresh with --restart (it removes "
                            f"only the files astra made there) or choose another --output") from None
        return marker

    def _write_marker(self, settings: Optional[dict], **extra) -> None:
        marker = {"kind": self.KIND, "format": FORMAT, "settings": settings,
                  "fingerprint": _settings_fingerprint(settings) if settings is not None else None, **extra}
        write_json_atomic(self.marker_path, marker)

    def is_ours(self) -> bool:
        try:
            marker = self.read_marker()
        except ValueError:
            return True  # our marker, damaged
        return marker is not None and marker.get("kind") == self.KIND

    def _is_empty(self) -> bool:
        # what a killed claim can leave behind (the lock, a temporary file) does not make a folder the user's
        return not any(p.name != LOCK and not p.name.startswith(TMP_PREFIX) for p in self.path.iterdir())

    def check_writable(self) -> None:
        """Refuse (without writing anything) a folder that is neither new, nor empty, nor ours.

        Raises:
            UserError: Naming the folder and why it is refused.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file, not a folder")
        if not self.path.is_dir() or self._is_empty():
            return
        marker = self.read_marker()
        if marker is None and self._is_legacy():
            return
        if marker is None:
            raise UserError(f"{self.path} is not empty and is not an astra {self.KIND} folder (it has no {MARKER}); "
                            f"astra writes only into a new or empty folder or one it made itself, so nothing of "
                            f"yours is overwritten. Choose another --output")
        if marker.get("kind") != self.KIND:
            raise UserError(f"{self.path} is an astra {marker.get('kind')} folder, not a {self.KIND} folder; choose "
                            f"another --output")

    def claim(self, settings: dict, *, restart: bool = False, restart_if_changed: bool = False) -> str:
        """Make the folder ours for `settings`. Returns "new" (nothing of an earlier run in it), "same" (made with
        these settings: resume or reuse) or "restarted" (started afresh: our earlier files removed).

        Raises:
            UserError: The folder is not ours (see `check_writable`), or was made with other settings and neither
                `restart` nor `restart_if_changed` is set (naming the settings that differ).
        """
        if restart and self.marker_path.is_file() and self._marker_damaged():
            self.restart(settings)  # our marker, unreadable: what we made is ours to remove
            return "restarted"
        self.check_writable()
        self.path.mkdir(parents=True, exist_ok=True)
        marker = self.read_marker()
        if marker is None and self._is_legacy():
            marker = {"settings": self._legacy_settings(settings)}  # what its own record says it was made with
            if not settings_diff(marker["settings"], settings) and not restart:
                self._write_marker(settings)
                return "same"
        if marker is None:
            self._write_marker(settings)
            return "new"
        if marker.get("settings") is None:  # a restart cut short: our files, no valid state
            self.restart(settings)
            return "new"
        diff = settings_diff(self._completed(marker["settings"], settings), settings)
        # A folder with nothing made yet (a run that failed before its first result: a mistyped --model, say)
        # has nothing to keep stale: it starts afresh with the new settings.
        if restart or (diff and (restart_if_changed or not self._has_results())):
            self.restart(settings)
            return "restarted"
        if not diff:
            return "same"
        raise UserError(f"{self.path} holds a {self.KIND} made with other settings ({diff}); rerun with those "
                        f"settings to resume or reuse it, use --restart to start it afresh (this removes only the "
                        f"files astra made there), or choose another --output")

    def _is_legacy(self) -> bool:
        if self.LEGACY_FILE is None or self.marker_path.exists() or not self.path.is_dir():
            return False
        owned = set(self.OWNED)
        for entry in self.path.iterdir():
            leftover = entry.name.startswith(TMP_PREFIX) or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
            if entry.name not in owned and not leftover:
                return False
        try:
            record = json.loads((self.path / self.LEGACY_FILE).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and all(key in record for key in self.LEGACY_KEYS)

    def _legacy_settings(self, settings: dict) -> dict:
        return settings  # overridden where the legacy record says more

    def _completed(self, recorded: dict, current: dict) -> dict:
        return recorded  # overridden where settings added since have a known value for older folders

    def _has_results(self) -> bool:
        return True  # overridden where a folder can tell it holds nothing worth keeping

    def recorded_settings(self, current: dict) -> Optional[dict]:
        """The settings the folder says it was made with (its marker, or the record of a folder from before
        markers, read in `current`'s shape); None for a folder that is new, empty or not ours."""
        if not self.path.is_dir():
            return None
        if self._is_legacy():
            return self._legacy_settings(current)
        try:
            marker = self.read_marker()
        except ValueError:
            return None
        recorded = marker.get("settings") if marker and marker.get("kind") == self.KIND else None
        return self._completed(recorded, current) if recorded else recorded

    def _marker_damaged(self) -> bool:
        try:
            self.read_marker()
        except ValueError:
            return True
        return False

    def restart(self, settings: Optional[dict]) -> None:
        """Remove what we made here (only `OWNED` names) and mark the folder for `settings`."""
        self._write_marker(None)  # first: a kill while clearing leaves a folder that no settings can resume
        self.clear()
        self._write_marker(settings)

    def clear(self, names=None) -> None:
        """Remove the `names` we own (default: all of `OWNED` but the marker and lock) and temporary leftovers."""
        names = self.OWNED if names is None else names
        for name in names:
            if name in (MARKER, LOCK):
                continue
            _remove(self.path / name)
        for leftover in self.path.glob(TMP_PREFIX + "*"):
            _remove(leftover)

    # ---- the lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock for the block.

        Raises:
            UserError: If another live process holds it (naming its pid).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = _acquire(self.path / LOCK)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path / LOCK)
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _acquire(path: Path) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: an exclusive create, stale if its pid is gone
        fcntl = None
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise NotImplementedError("fcntl")  # pragma: no cover
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise RunLocked(f"{path.parent} is being written by another astra process ({holder}); wait for it to "
                            f"finish or stop it, then run again") from None
        # a process that released and removed the lock just before we locked it: our lock is on a dead file
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)
    raise UserError(f"{path}: could not take the lock (it keeps changing hands); run again")
