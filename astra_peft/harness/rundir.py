"""The owners of the folders the harness writes: a run folder (`RunDir`) and a comparison folder (`CompareDir`).

Each knows the name and format of every file it holds, writes them atomically (`astra_peft._io`) and reads them
back; no other module spells a file name of a run. Both carry a marker file, `.astra-run.json`, which says the
folder is ours and with which settings it was made; owned.py holds that machinery and the rules it enforces
(someone else's folder refused, only our own files ever removed, other settings refused, one writer at a time).
Paths built from user input go through `safe_name` and `inside`, so nothing is written outside --output.

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
import re
from pathlib import Path
from typing import Optional

from .._io import atomic_dir, json_text, write_json_atomic, write_text_atomic
from .owned import LOCK, MARKER, OwnedDir, RunLocked, UserError, settings_diff  # noqa: F401  (re-exported)


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


# -------------------------------------------------------------------------------------------------- a run


class RunDir(OwnedDir):
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

    def _completed(self, recorded: dict, current: dict) -> dict:
        """A FinetuneConfig field added since the folder was made is not in its record: the run had that field's
        default behaviour, so the default stands in (a new field with the default changes nothing)."""
        from dataclasses import MISSING, fields

        from .run_config import FinetuneConfig

        defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.default is not MISSING}
        missing = {k: defaults[k] for k in current if k not in recorded and k in defaults}
        return {**recorded, **missing} if missing else recorded

    def _has_results(self) -> bool:
        """Anything an earlier attempt produced (an initialisation, a logged step, a checkpoint, weights)."""
        return any(self.file(n).exists() for n in (*self.TRAINED, self.INIT, self.ADAPTER_INIT, self.ANALYSIS))

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


class _ReportDir(OwnedDir):
    """A folder of report files (REPORT) that astra writes and may overwrite only while they are as it left them:
    the marker keeps each one's content hash."""

    REPORT: tuple[str, ...] = ()

    def claim_folder(self) -> None:
        """Make the folder ours: new, empty or already ours (a comparison's runs have their own settings).

        Raises:
            UserError: If it is someone else's folder.
        """
        self.check_writable()
        self.path.mkdir(parents=True, exist_ok=True)
        if self.read_marker() is None:  # only a folder of ours from before markers has report files that are ours
            legacy = self._is_legacy()
            made = {n: _sha256(self.path / n) for n in self.REPORT if legacy and (self.path / n).is_file()}
            self._write_marker({}, made=made)

    def check_report_files(self) -> None:
        """Refuse to overwrite a report file astra did not make here: one it never wrote (the user's own
        summary.md, say) or one changed since (its content hash, kept in the marker, differs).

        Raises:
            UserError: Naming the file.
        """
        marker = self.read_marker() if self.path.is_dir() else None
        if marker is None and self._is_legacy():
            return  # a folder of ours from before markers: its report files are ours
        made = (marker or {}).get("made") or {}
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


class CompareDir(_ReportDir):
    """A comparison's folder: compare.json, the report files it made (listed in its marker) and runs/."""

    KIND = "comparison"
    COMPARE, RUNS = "compare.json", "runs"
    REPORT = ("summary.md", "summary.csv", "loss.png", "grad_norm.png", "forgetting.png")
    OWNED = (MARKER, LOCK, COMPARE, RUNS, *REPORT)
    LEGACY_FILE, LEGACY_KEYS = COMPARE, ("base", "methods", "seeds", "tasks")

    def run_dir(self, task_label: str, method_slug: str, seed: int) -> RunDir:
        """runs/TASK/METHOD/seedN, from sanitised names, checked to lie inside this folder."""
        return RunDir(inside(self.path, self.RUNS, safe_name(task_label), safe_name(method_slug), f"seed{int(seed)}"))

    def write_compare(self, payload: dict) -> None:
        write_json_atomic(self.path / self.COMPARE, payload)


class AnalysisDir(_ReportDir):
    """`astra analyze`'s output folder (RUN/analysis/ by default): the effective-rank table, CSV and chart."""

    KIND = "analysis"
    REPORT = ("effective_rank.md", "effective_rank.csv", "effective_rank.png")
    OWNED = (MARKER, LOCK, *REPORT)

    def check_writable(self) -> None:
        """Three files of its own: any folder will do (a marker of another kind aside), as long as no file of the
        same name is there that astra did not make (`check_report_files`)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path} is a file, not a folder")
        marker = self.read_marker() if self.path.is_dir() else None
        if marker is not None and marker.get("kind") != self.KIND:
            raise UserError(f"{self.path} is an astra {marker.get('kind')} folder, not an {self.KIND} folder; "
                            f"choose another --output")

    def _is_legacy(self) -> bool:  # written before markers: nothing but its report files, the CSV among them
        if self.marker_path.exists() or not self.path.is_dir():
            return False
        names = {p.name for p in self.path.iterdir()}
        return "effective_rank.csv" in names and names <= set(self.OWNED)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
