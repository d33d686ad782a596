"""The owners of the folders the harness writes: a run folder (`RunDir`) and a comparison folder (`CompareDir`).

Each knows the name and format of every file it holds, writes them atomically (`astra_peft._io`) and reads them
back; no other module spells a file name of a run. Both carry a marker file, `.astra-run.json`, which says the
folder is ours and with which settings it was made; the rules that keep a user's files safe follow from it:

- a folder is written only when it is new, empty, or carries our marker; anything else is refused, naming it;
- starting afresh (`--restart`/`--force`) removes only the names listed in `OWNED`, never anything else;
- a marker made with other settings is refused with the settings that differ (or, asked to, started afresh);
- a lock file (`.astra-run.lock`, with the writer's pid) keeps a second process out while one is writing; a
  lock whose process has died is taken over (it is an flock, which the kernel releases with the process).

A run folder holds, in the order they are written:
  .astra-run.json  the marker: kind, settings and their fingerprint (written first)
  config.json      the resolved configuration (method spec, hyperparameters, data fingerprints, versions)
  init.json, adapter_init/   the adapter right after initialisation and what made it (for restarts, conversion)
  checkpoints/     Trainer checkpoints, for resuming; removed once the run is finished
  metrics.jsonl    one line per step (loss, grad_norm, learning_rate) and per evaluation
  adapter/ adapter_lora/ model/   the trained weights
  summary.json     final metrics: written last, so a run folder with a summary.json is finished
  error.txt        (comparisons) why the run failed; analysis/  `astra analyze`'s default output
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional

from .._io import TMP_PREFIX, atomic_dir, json_text, write_json_atomic, write_text_atomic

try:
    from .validation import UserError
except ImportError:  # pragma: no cover - validation.py is optional for this module
    UserError = ValueError

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


# ----------------------------------------------------------------------------------------- confined paths


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")


def safe_name(text: str) -> str:
    """A single, harmless path component made from `text` (a task label, a method spec): separators and
    anything else unusual become '_', and it never starts with '.' (no '..', no hidden name)."""
    return _UNSAFE.sub("_", str(text)).lstrip("._").rstrip("_") or "_"


def inside(root, *parts: str) -> Path:
    """`root` joined with `parts`, checked to lie under `root` once both are resolved (symlinks included).

    Raises:
        UserError: If the result would lie outside `root`.
    """
    root = Path(root)
    path = root.joinpath(*parts)
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UserError(f"refusing to write {path}: it lies outside the output folder {root}")
    return path


def check_output(output, *, model: Optional[str] = None, files=()) -> Path:
    """An --output that can hold our files without touching the user's: not empty, not a file, and neither the
    model's folder (or inside it, or holding it) nor a folder that holds the data or calibration files.

    Raises:
        UserError: Naming --output and the reason.
    """
    if output is None or not str(output).strip():
        raise UserError("--output is empty; give the folder to write the run into")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output} is a file, not a folder")
    real = out.resolve()
    if model and Path(model).expanduser().is_dir():
        real_model = Path(model).expanduser().resolve()
        if real == real_model or real_model in real.parents or real in real_model.parents:
            raise UserError(f"--output {output} is, lies inside or holds the model folder {model}; "
                            "choose a folder apart from the model")
    for file in files:
        if file and Path(file).expanduser().exists():
            real_file = Path(file).expanduser().resolve()
            if real == real_file or real in real_file.parents:
                raise UserError(f"--output {output} is or holds the input file {file}; choose a folder apart from "
                                "your data")
    return out


# ---------------------------------------------------------------------------------------------- owned folders


class _OwnedDir:
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
        diff = settings_diff(marker["settings"], settings)
        if restart or (diff and restart_if_changed):
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
        return marker.get("settings") if marker and marker.get("kind") == self.KIND else None

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


# -------------------------------------------------------------------------------------------------- a run


class RunDir(_OwnedDir):
    """One fine-tuning run's folder (see the module docstring for its files)."""

    KIND = "run"
    CONFIG, METRICS, SUMMARY, INIT, ERROR = "config.json", "metrics.jsonl", "summary.json", "init.json", "error.txt"
    ADAPTER_INIT, ADAPTER, ADAPTER_LORA, MODEL = "adapter_init", "adapter", "adapter_lora", "model"
    CHECKPOINTS, ANALYSIS, CLOCK = "checkpoints", "analysis", "harness_clock.json"
    OWNED = (MARKER, LOCK, CONFIG, METRICS, SUMMARY, INIT, ERROR, ADAPTER_INIT, ADAPTER, ADAPTER_LORA, MODEL,
             CHECKPOINTS, ANALYSIS, ".adapter_init.tmp")
    # What a fresh start (no checkpoint to resume) removes: everything an earlier attempt trained. adapter_init/
    # and init.json stay: init.json's fingerprint decides whether the initialisation can be reused.
    TRAINED = (METRICS, SUMMARY, ERROR, ADAPTER, ADAPTER_LORA, MODEL, CHECKPOINTS)
    LEGACY_FILE, LEGACY_KEYS = CONFIG, ("method_spec", "effective", "splits", "versions", "task_name")

    def _legacy_settings(self, settings: dict) -> dict:
        """The settings a run folder from before markers was made with, in `settings`' shape, from its config.json:
        every FinetuneConfig field, the task and its split hashes, and the model as named. (Its code versions are
        not compared: they were recorded, but any release since would differ.)"""
        config = self.read_config() or {}
        old = {key: config.get(key, value) for key, value in settings.items()
               if key not in ("model", "data", "versions")}
        model = settings.get("model")
        named = config.get("model")
        same_model = named == model or (isinstance(model, dict) and named is not None
                                        and str(Path(named).expanduser().resolve()) == model.get("path"))
        old["model"] = model if same_model else named
        data = dict(settings.get("data") or {})
        data.update({"task": config.get("task_name"), "kind": config.get("task_kind")})
        data.update({split: (info or {}).get("sha256") for split, info in (config.get("splits") or {}).items()})
        old["data"], old["versions"] = data, settings.get("versions")
        return old

    def file(self, name: str) -> Path:
        return self.path / name

    def is_finished(self) -> bool:
        return self.file(self.SUMMARY).is_file() and (self.is_ours() or self._is_legacy())

    # ---- JSON files

    def _read_json(self, name: str) -> Optional[dict]:
        path = self.file(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"{path} is damaged ({err}); start the run afresh with --restart") from None

    def read_summary(self) -> Optional[dict]:
        return self._read_json(self.SUMMARY)

    def read_config(self) -> Optional[dict]:
        return self._read_json(self.CONFIG)

    def read_init(self) -> Optional[dict]:
        return self._read_json(self.INIT)

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.file(self.CONFIG), config)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.file(self.SUMMARY), summary)

    def write_init(self, meta: dict) -> None:
        write_json_atomic(self.file(self.INIT), meta)

    def write_error(self, text: str) -> None:
        write_text_atomic(self.file(self.ERROR), text)

    # ---- the metrics log

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.file(self.METRICS))

    def append_metric(self, record: dict) -> None:
        with open(self.file(self.METRICS), "a") as fh:
            fh.write(json_text(record, indent=None, where=str(self.file(self.METRICS))) + "\n")

    def keep_metrics_until(self, step: int) -> None:
        """Drop what was logged after `step` (and every final evaluation): a resume logs it again."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step and not any(k.startswith("final_") for k in r)]
        write_text_atomic(self.file(self.METRICS), "".join(json_text(r, indent=None) + "\n" for r in kept))

    # ---- folders

    def adapter_dir(self, name: str) -> contextlib.AbstractContextManager:
        """A temporary folder that becomes `name` (adapter, adapter_lora, model, adapter_init) when complete."""
        return atomic_dir(self.file(name))

    def checkpoint(self) -> Optional[Path]:
        """The newest whole checkpoint. One whose trainer_state.json or weights cannot be read (a kill mid-save,
        a damaged disk) is passed over for the one before it.

        Raises:
            UserError: If checkpoints exist but none is whole (naming the damaged file).
        """
        folder = self.file(self.CHECKPOINTS)
        found = []
        for ckpt in folder.glob("checkpoint-*") if folder.is_dir() else ():
            step = ckpt.name.rsplit("-", 1)[-1]
            if step.isdigit():
                found.append((int(step), ckpt))
        damaged = None
        for step, ckpt in sorted(found, reverse=True):
            problem = _checkpoint_problem(ckpt, step)
            if problem is None:
                return ckpt
            damaged = damaged or problem
        if damaged and found:
            raise UserError(f"{damaged}, and no earlier checkpoint is whole; start the run afresh with --restart")
        return None

    @staticmethod
    def checkpoint_step(ckpt: Path) -> int:
        return json.loads((ckpt / "trainer_state.json").read_text())["global_step"]


def _checkpoint_problem(ckpt: Path, step: int) -> Optional[str]:
    """Why `ckpt` cannot be resumed from, or None. The Trainer writes trainer_state.json last."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing (the checkpoint was cut short)"
    try:
        if json.loads(state.read_text())["global_step"] != step:
            return f"{state} does not belong to step {step}"
    except (ValueError, KeyError, TypeError) as err:
        return f"{state} is damaged ({type(err).__name__}: {err})"
    for weights in ckpt.glob("*.safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - any failure to open means the file is not whole
            return f"{weights} is damaged ({err})"
    return None


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON-lines log. A cut last line (a kill mid-append) is dropped; a damaged line before the
    last is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            if number == len(lines):
                break  # the last line, cut short: the step it logged is logged again on resume
            raise UserError(f"{path}:{number}: damaged line ({err}); start the run afresh with --restart") from None
    return rows


# --------------------------------------------------------------------------------------------- a comparison


class CompareDir(_OwnedDir):
    """A comparison's folder: compare.json, the report files it made (listed in its marker) and runs/."""

    KIND = "comparison"
    COMPARE, RUNS = "compare.json", "runs"
    REPORT = ("summary.md", "summary.csv", "loss.png", "grad_norm.png")
    OWNED = (MARKER, LOCK, COMPARE, RUNS, *REPORT)
    LEGACY_FILE, LEGACY_KEYS = COMPARE, ("base", "methods", "seeds", "tasks")

    def claim_folder(self) -> None:
        """Make the folder ours (new, empty or already a comparison); the runs inside have their own settings.

        Raises:
            UserError: If it is someone else's folder.
        """
        self.check_writable()
        self.path.mkdir(parents=True, exist_ok=True)
        if self.read_marker() is None:  # new, empty, or ours from before markers: its report files are ours
            made = {n: _sha256(self.path / n) for n in self.REPORT if (self.path / n).is_file()}
            self._write_marker({}, made=made)

    def run_dir(self, task_label: str, method_slug: str, seed: int) -> RunDir:
        """runs/TASK/METHOD/seedN, from sanitised names, checked to lie inside this folder."""
        return RunDir(inside(self.path, self.RUNS, safe_name(task_label), safe_name(method_slug), f"seed{int(seed)}"))

    def write_compare(self, payload: dict) -> None:
        write_json_atomic(self.path / self.COMPARE, payload)

    def check_report_files(self) -> None:
        """Refuse to overwrite a report file this comparison did not make: one it never wrote (the user's own
        summary.md, say) or one changed since (its content hash, kept in the marker, differs).

        Raises:
            UserError: Naming the file.
        """
        made = (self.read_marker() or {}).get("made") or {}
        for name in self.REPORT:
            path = self.path / name
            if path.exists() and (not path.is_file() or made.get(name) != _sha256(path)):
                raise UserError(f"{path} was not made by astra (or was changed since); move it away (astra never "
                                f"overwrites files it did not make) or choose another --output")

    def record_report_files(self) -> None:
        """Note each report file's content hash in the marker: these are ours to overwrite next time."""
        marker = self.read_marker() or {}
        made = {n: _sha256(self.path / n) for n in self.REPORT if (self.path / n).is_file()}
        self._write_marker(marker.get("settings") or {}, made=made)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
