"""Shared plumbing of the benchmark drivers: fresh-process workers, peak-memory probes, machine info, tables.

Every driver runs each configuration in its own fresh Python process (`<driver> --worker CONFIG ...`), repeats
the set of configurations in rounds (rotating the order each round, so a slow spell on this shared machine does
not always hit the same configuration), and reports medians, the spread (min–max) and ratios of medians.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MARK = "@@RESULT@@ "


# ------------------------------------------------------------------------------------------------ code version
CORE_FILES = ("calibration.py", "_collector.py", "_workers.py", "stats.py", "spectrum.py", "initialization.py", "layers.py",
              "config.py")


def source_fingerprint(package_dir: Path | None = None) -> str:
    """sha256 (16 hex) of the core astra_peft sources in `package_dir` (default: the astra_peft this process
    imports): workers record it when they start, so a table mixing library versions is detected."""
    import hashlib

    if package_dir is None:
        package_dir = Path(ASTRA_DIR)
    h = hashlib.sha256()
    for name in CORE_FILES:
        path = Path(package_dir) / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"missing"))
    return h.hexdigest()[:16]


def _astra_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("astra_peft")
    return str(Path(spec.origin).parent) if spec and spec.origin else str(ROOT / "astra_peft")


ASTRA_DIR = _astra_dir()
SOURCE_AT_START = source_fingerprint()


class PinnedSource:
    """The astra_peft every worker of a run imports: a snapshot of a git commit (`git archive`, default HEAD) put
    first on PYTHONPATH, so teammates editing or committing the working tree during a long run cannot mix library
    versions in one table. `rev="worktree"` uses the working tree as it is (no pinning)."""

    def __init__(self, rev: str = "HEAD"):
        import tempfile

        self.rev = rev
        self.dir = None
        if rev == "worktree":
            self.commit = "worktree"
            self.fingerprint = source_fingerprint(ROOT / "astra_peft")
            return
        self.commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout.strip()
        self.dir = tempfile.mkdtemp(prefix=f"astra-src-{self.commit}-")
        archive = subprocess.run(["git", "archive", self.commit, "astra_peft"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", self.dir], input=archive, check=True)
        self.fingerprint = source_fingerprint(Path(self.dir) / "astra_peft")

    def env(self) -> dict:
        if self.dir is None:
            return {}
        return {"PYTHONPATH": os.pathsep.join([self.dir] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

    def describe(self) -> dict:
        return {"rev": self.rev, "commit": self.commit, "fingerprint": self.fingerprint,
                "pinned": self.dir is not None}

    def cleanup(self) -> None:
        if self.dir:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


_PINNED: PinnedSource | None = None


def pin_source(rev: str) -> PinnedSource:
    """Called once by a parent: every later run_worker uses this snapshot."""
    global _PINNED
    _PINNED = PinnedSource(rev)
    import atexit
    import signal

    atexit.register(_PINNED.cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `kill PID` still removes the snapshot
    print(f"astra_peft under test: {_PINNED.describe()}", flush=True)
    return _PINNED


def check_sources(results: dict) -> dict:
    """The core-source fingerprints the workers ran with (and the pinned snapshot); warns when they differ."""
    seen = {}
    for rs in results.values():
        for r in rs:
            if r.get("ok"):
                seen.setdefault(r.get("astra_src"), 0)
                seen[r.get("astra_src")] += 1
    if len(seen) > 1:
        print(f"WARNING: the astra_peft core sources changed during the run: fingerprints {seen}", flush=True)
    pinned = _PINNED.describe() if _PINNED else None
    if pinned and set(seen) - {pinned["fingerprint"]}:
        print(f"WARNING: workers did not all run the pinned snapshot {pinned}: {seen}", flush=True)
    return {"pinned": pinned, "fingerprints": seen, "consistent": len(seen) <= 1}


# ------------------------------------------------------------------------------------------------ machine info
def machine_info() -> dict:
    import torch

    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    for mod in ("peft", "transformers", "scipy", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------------ peak memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory of this process over a `with` block, two ways.

    `hwm`: the kernel's high-water mark VmHWM, reset at entry by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0):
    exact, no sampling gaps. `sampled`: the max of psutil RSS samples taken every `interval` s by a thread (a
    cross-check; it can miss spikes shorter than the interval; it costs well under 1% of a core). `base` is the RSS at entry; both peaks are in bytes.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self._peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            if rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sampled = max(self._peak, self._proc.memory_info().rss)
        self.hwm = _status_kib("VmHWM") * 1024 if self.hwm_reset else None
        self.end = self._proc.memory_info().rss
        return False

    def as_dict(self) -> dict:
        peak = self.hwm if self.hwm is not None else self.sampled
        return {
            "rss_before_bytes": self.base,
            "peak_rss_bytes": peak,
            "peak_rss_source": "VmHWM after clear_refs" if self.hwm is not None else "psutil sampling",
            "peak_rss_sampled_bytes": self.sampled,
            "rss_end_bytes": self.end,
            "peak_above_loaded_bytes": peak - self.base,
        }


# ------------------------------------------------------------------------------------------------ workers
def emit(result: dict) -> None:
    """Called by a worker: print its result as one marked JSON line for the parent."""
    result.setdefault("loadavg_end", os.getloadavg())
    result.setdefault("astra_src", SOURCE_AT_START)
    result.setdefault("astra_dir", ASTRA_DIR)
    print(MARK + json.dumps(result), flush=True)


def thread_env(threads: int) -> dict:
    """Environment pinning every thread pool (torch/OpenMP, OpenBLAS under SciPy, MKL) to `threads`."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n, "ASTRA_BENCH_THREADS": n}


def set_worker_threads() -> int:
    """In a worker: make torch use the thread count the parent chose (the env already covers BLAS)."""
    import torch

    n = int(os.environ.get("ASTRA_BENCH_THREADS", "0") or 0)
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def run_worker(script: str, config: str, extra: list[str], timeout: float, log, threads: int = 1) -> dict:
    """Run `python script --worker config *extra` in a fresh process; return its emitted result (or the failure)."""
    cmd = [sys.executable, script, "--worker", config, *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               **thread_env(threads), **(_PINNED.env() if _PINNED else {}))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code = "timeout"
    wall = time.perf_counter() - t0
    if log is not None:
        log.write(f"==== {' '.join(cmd)}  (exit {code}, {wall:.1f}s)\n{out}\n---- stderr\n{err[-4000:]}\n")
        log.flush()
    lines = [l for l in out.splitlines() if l.startswith(MARK)]
    if code != 0 or not lines:
        tail = "\n".join(err.strip().splitlines()[-8:])
        return {"config": config, "ok": False, "error": f"exit {code}: {tail}", "process_wall_s": wall,
                "loadavg_before": load_before}
    result = json.loads(lines[-1][len(MARK):])
    result.update(config=config, ok=True, process_wall_s=wall, loadavg_before=load_before)
    return result


def run_rounds(script: str, configs: list[str], repeats: int, extra_for, timeout: float, log, on_result=None,
               threads: int = 1):
    """Round-robin: every round runs each config once in a fresh process, the order rotated by one each round."""
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rnd in range(repeats):
        k = rnd % len(configs)
        order = configs[k:] + configs[:k]
        for config in order:
            res = run_worker(script, config, extra_for(config), timeout, log, threads)
            res["round"] = rnd
            results[config].append(res)
            status = "ok" if res["ok"] else "FAILED " + res["error"][-300:]
            print(f"[round {rnd + 1}/{repeats}] {config}: {status} ({res['process_wall_s']:.0f}s process, "
                  f"load {res['loadavg_before'][0]:.2f})", flush=True)
            if on_result:
                on_result(results)
    return results


# ------------------------------------------------------------------------------------------------ statistics
def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def paired_ratios(results: dict, config: str, baseline: str, key) -> list[float]:
    """key(result) of `config` over key(result) of `baseline` in the same round (same machine conditions)."""
    base = {r["round"]: key(r) for r in results.get(baseline, []) if r["ok"]}
    out = []
    for r in results.get(config, []):
        if r["ok"] and r["round"] in base and base[r["round"]]:
            out.append(key(r) / base[r["round"]])
    return out


def fmt_spread(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    if not s or s.get("n", 0) == 0:
        return "n/a"
    return f"{s['median'] / scale:.{digits}f} [{s['min'] / scale:.{digits}f}–{s['max'] / scale:.{digits}f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    from astra_peft._io import atomic_path  # the project's one atomic-write helper

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path
