"""Where the built-in tasks' raw data come from, fetched offline from package registries and cached.

BIG-bench task files out of the `bigbench==1.0.0` sdist (PyPI), and Pang & Lee's sentence polarity CSV out of
Debian's `python3-pattern`. Only the few files needed are kept under `<cache>/data/`; the archives are removed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from .fetch import FetchError, atomic_path, cache_dir, downloads_dir, fetch_failure, fetch_pip_file, run_streaming

BIGBENCH = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
# cache name -> folder under bigbench/benchmark_tasks/ in the sdist. elementary_math_qa has five subtasks with the
# same questions and different hints; question_only is the plain word problem.
BIGBENCH_FILES = {
    "strategyqa": "strategyqa",
    "social_iqa": "social_iqa",
    "elementary_math_qa": "elementary_math_qa/question_only",
    "intent_recognition": "intent_recognition",
    "presuppositions_as_nli": "presuppositions_as_nli",
    "xsum": "gem/xsum",
}
PATTERN_DEB = "python3-pattern"
PANG_LEE_CSV = "polarity-en-pang&lee2.csv"
PANG_LEE_IN_DEB = f"usr/share/doc/python3-pattern/test/corpora/{PANG_LEE_CSV}"


def bigbench_file(key: str) -> Path:
    """`<cache>/data/bigbench/<folder>/task.json`; the first missing file triggers one pass over the sdist."""
    dest = cache_dir() / "data" / "bigbench" / BIGBENCH_FILES[key] / "task.json"
    if not dest.is_file():
        _extract_bigbench()
    return dest


def _extract_bigbench() -> None:
    root = cache_dir() / "data" / "bigbench"
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{folder}/task.json": root / folder / "task.json"
              for folder in BIGBENCH_FILES.values()}
    sdist = fetch_pip_file(BIGBENCH, BIGBENCH_SDIST)  # 358 MB; removed below once its few files are out
    with open(sdist, "rb") as raw, tqdm.wrapattr(raw, "read", total=sdist.stat().st_size,
                                                  desc="scan bigbench sdist") as reader:
        with tarfile.open(fileobj=reader, mode="r|gz") as tar:  # streaming: one sequential pass
            for member in tar:
                dest = wanted.get(member.name)
                if dest is not None and member.isfile():
                    with atomic_path(dest) as tmp:
                        tmp.write_bytes(tar.extractfile(member).read())
    missing = [str(p) for p in wanted.values() if not p.is_file()]
    if missing:
        raise FetchError(f"{sdist} lacks expected task files: {missing}; delete it and retry")
    sdist.unlink(missing_ok=True)


def pang_lee_file() -> Path:
    """`<cache>/data/pattern/polarity-en-pang&lee2.csv`, cut out of Debian's python3-pattern package."""
    dest = cache_dir() / "data" / "pattern" / PANG_LEE_CSV
    if dest.is_file():
        return dest
    deb = _apt_download(PATTERN_DEB)
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".deb-") as tmp:
        cmd = ["dpkg", "-x", str(deb), tmp]
        print(f"[astra-peft] unpacking {deb.name} ...", file=sys.stderr)
        code, output = run_streaming(cmd)
        src = Path(tmp) / PANG_LEE_IN_DEB
        if code != 0 or not src.is_file():
            raise fetch_failure(cmd, code, output, f"Unpack {deb.name} by other means (`ar x` then tar) and copy "
                                f"{PANG_LEE_IN_DEB} to {dest}")
        with atomic_path(dest) as part:
            shutil.copyfile(src, part)
    deb.unlink(missing_ok=True)
    return dest


_APT_NO_LISTS = re.compile(r"Unable to locate package|has no installation candidate|Can't select|404\s+Not Found")


def _apt_as_root() -> list[str]:
    """As root, apt downloads as the unprivileged `_apt` user, which cannot write into our cache (under root's
    private home, in a 0700 temp folder); apt then falls back to root and warns "Download is performed
    unsandboxed as root". Asking for root directly does the same download without the warning a user cannot
    act on. As any other user there is no sandbox to ask for."""
    return ["-o", "APT::Sandbox::User=root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


def _apt_download(package: str) -> Path:
    dl = downloads_dir()
    dl.mkdir(parents=True, exist_ok=True)
    if found := sorted(dl.glob(f"{package}_*.deb")):
        return found[-1]
    remedy = (f"Run `apt-get update` as root, or fetch {package}'s .deb on any Debian/Ubuntu machine "
              f"(`apt-get download {package}`) and put it in {dl}/, or copy the CSV to "
              f"{cache_dir() / 'data' / 'pattern' / PANG_LEE_CSV}")
    with tempfile.TemporaryDirectory(dir=dl, prefix=".apt-") as tmp:
        cmd = ["apt-get", "download", *_apt_as_root(), package]
        code, output = run_streaming(cmd, cwd=tmp)
        if code != 0 and _APT_NO_LISTS.search(output):  # empty or stale package lists: refresh once and retry
            update = ["apt-get", "update"]
            ucode, uout = run_streaming(update)
            if ucode != 0:
                raise fetch_failure(update, ucode, uout, remedy)
            code, output = run_streaming(cmd, cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if code != 0 or not debs:
            raise fetch_failure(cmd, code, output, remedy)
        final = dl / debs[-1].name
        shutil.move(debs[-1], final)
    return final
