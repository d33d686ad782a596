"""How many CPU threads a run uses: chosen deliberately, printed, and recorded in the run's config.json.

torch's default is one thread per physical core, whatever else the machine is doing. On a busy machine that is
the worst choice: OpenMP threads spin-wait for each other at every parallel region, and a thread that lost its
core to another process holds every other thread up. Measured on 2 cores at load ~5 (issue 17): a forward pass
took 3.4 s with torch's 2 threads and 1.1 s with 1; a 5-step fine-tune spent 590 s of CPU against 97 s idle.
So the default is the number of cores that are not already busy, never more than the physical cores, at least 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Libraries that size their own thread pools from these variables (read by processes we start, e.g. torchrun
# workers, and by OpenMP/MKL runtimes that have not started yet in this one).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # one line, printed with the run

    def describe(self) -> str:
        return f"threads: {self.threads} ({self.reason})"


def usable_cores() -> tuple[int, int]:
    """(physical cores, logical CPUs this process may run on). Affinity (taskset, containers) caps both."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:  # psutil is in the [harness] extra; be safe if a caller runs without it
        physical = logical
    return max(1, min(physical, logical)), max(1, logical)


def choose_threads(requested: int | None = None, *, environ=None, loadavg=None, cores=None) -> ThreadChoice:
    """The thread count for a run: `requested` (--threads) if given, else $OMP_NUM_THREADS if set, else
    min(physical cores, logical CPUs not busy by the 1-minute load average), at least 1, shared between the
    processes of this machine when a launcher (torchrun, accelerate) started several ($LOCAL_WORLD_SIZE).

    The load average counts runnable processes, so `logical - load` is roughly how many CPUs nothing else
    wants right now; asking for more only makes our own threads wait on each other (see the module docstring).

    Raises:
        ValueError: `requested` or $OMP_NUM_THREADS is not a positive integer.
    """
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return ThreadChoice(requested, "--threads")
    if environ.get("OMP_NUM_THREADS"):
        raw = environ["OMP_NUM_THREADS"]
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {raw!r}; or pass --threads N")
        return ThreadChoice(int(raw), "from OMP_NUM_THREADS; --threads N to change")
    physical, logical = cores if cores is not None else usable_cores()
    try:
        load = loadavg if loadavg is not None else os.getloadavg()[0]
    except OSError:  # no load average on this system: torch's own default
        return ThreadChoice(physical, f"{physical} physical cores; --threads N to change")
    free = logical - int(round(load))
    local = environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    threads = max(1, min(physical, free) // processes)
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return ThreadChoice(threads, f"{physical} physical cores, load {load:.1f} on {logical} CPUs{shared}; "
                                 "--threads N to change")


def apply_threads(threads: int) -> None:
    """Use `threads` in this process (torch) and in every process it starts (environment)."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none; recorded with each run so that wall times
    made at different loads can be told apart."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
