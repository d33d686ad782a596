"""The study's evidence, one compact file per run folder: study/runs/<folder>.jsonl.gz.

    python study/pack_runs.py pack [FOLDER ...]     # fold study/runs/<folder>/ into <folder>.jsonl.gz
    python study/pack_runs.py unpack [FOLDER ...]   # write the packed files back under study/runs/<folder>/
    python study/pack_runs.py check [FOLDER ...]    # the packs round-trip, and agree with what is unpacked
    (no FOLDER: every folder that has a pack or an unpacked copy)

`astra compare` writes a run as many small files (config.json, metrics.jsonl, summary.json, ...); 1,600 of them
drowned the code in git. A pack holds the same files byte for byte: gzip (no time stamp, so packing the same files
gives the same bytes) of JSON lines, one line per run folder (`runs/TASK/METHOD/seedN`) plus one (".") for the
comparison's own files; each line is {"path": ..., "files": {relative name: text, or {"base64": ...} for a binary
file such as a plot}}, sorted by path. Only the packs are committed (study/.gitignore ignores the unpacked
folders); make_results.py and run_study.py read a folder as its pack overlaid with whatever is unpacked on disk,
a run folder on disk replacing the packed one wholesale (it is the newer: a run written or redone since).

Left out, as git left them out before: weights and checkpoints (*.safetensors, *.bin, *.pt, checkpoint-*/,
checkpoints/) and a writer's transient lock or temporary files. Left out as well: the plots (*.png), three
quarters of the packed bytes otherwise. They are views, drawn from the packed text (a comparison's loss.png and
grad_norm.png from the runs' metrics.jsonl, redrawn by its next `astra compare`; `astra analyze`'s
effective_rank.png from its effective_rank.csv), and nothing reads them: not make_results.py (it draws
docs/figures from the metrics), not the docs, not a resume. The ones committed before the packs stay in git's
history.
"""

from __future__ import annotations

import argparse
import base64
import csv
import gzip
import io
import json
import sys
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
SUFFIX = ".jsonl.gz"
ROOT_UNIT = "."
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".tmp", ".png")
SKIP_DIRS = ("checkpoints",)
SKIP_PREFIXES = ("checkpoint-", ".astra-tmp-")
SKIP_NAMES = (".astra-run.lock",)


def pack_path(folder: str) -> Path:
    return RUNS / f"{folder}{SUFFIX}"


def unit_of(rel: PurePosixPath) -> tuple[str, str]:
    """(run folder, name inside it) for a file's path relative to the folder: runs/TASK/METHOD/seedN/... belong to
    that run, anything else to the comparison itself (".")."""
    parts = rel.parts
    if len(parts) >= 5 and parts[0] == "runs":
        return "/".join(parts[:4]), "/".join(parts[4:])
    return ROOT_UNIT, rel.as_posix()


def _skipped(rel: PurePosixPath) -> bool:
    *dirs, name = rel.parts
    return (name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES) or name.startswith(SKIP_PREFIXES)
            or any(d in SKIP_DIRS or d.startswith(SKIP_PREFIXES) for d in dirs))


def _encode(data: bytes):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _decode(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else base64.b64decode(value["base64"])


# ------------------------------------------------------------------------------------------------- reading


def read_disk(folder: str) -> dict[str, dict[str, bytes]]:
    """{run folder: {name: bytes}} of what is unpacked under study/runs/<folder>/ (empty if nothing is)."""
    base = RUNS / folder
    units: dict[str, dict[str, bytes]] = {}
    if not base.is_dir():
        return units
    for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = PurePosixPath(path.relative_to(base).as_posix())
        if _skipped(rel):
            continue
        unit, name = unit_of(rel)
        units.setdefault(unit, {})[name] = path.read_bytes()
    return units


_PACK_CACHE: dict = {}


def read_pack(folder: str) -> dict[str, dict[str, bytes]]:
    """{run folder: {name: bytes}} of the folder's pack (empty if it has none); cached while the file is unchanged."""
    path = pack_path(folder)
    if not path.is_file():
        return {}
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    if _PACK_CACHE.get(folder, (None,))[0] != stamp:
        units = {}
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                units[record["path"]] = {name: _decode(v) for name, v in record["files"].items()}
        _PACK_CACHE[folder] = (stamp, units)
    return _PACK_CACHE[folder][1]


def folder_files(folder: str) -> dict[PurePosixPath, bytes]:
    """Every file of study/runs/<folder>: the pack, with each run folder that is on disk taken from the disk."""
    units = dict(read_pack(folder))
    disk = read_disk(folder)
    root = {**units.get(ROOT_UNIT, {}), **disk.pop(ROOT_UNIT, {})}
    units.update(disk)
    if root:
        units[ROOT_UNIT] = root
    return {PurePosixPath(unit) / name: data for unit, files in units.items() for name, data in files.items()}


def collect_runs(folder: str) -> list[dict]:
    """astra_peft.harness.report.collect_runs for a packed folder: every finished run's summary (one with a
    "final"), plus its metrics.jsonl as `history`, in the order of their summary paths."""
    files = folder_files(folder)
    runs = []
    for path in sorted((p for p in files if p.name == "summary.json"), key=lambda p: p.parts):
        summary = json.loads(files[path])
        if "final" not in summary:  # a comparison's own summary, not a run's
            continue
        metrics = files.get(path.parent / "metrics.jsonl", b"").decode("utf-8")
        summary["history"] = [json.loads(line) for line in metrics.splitlines() if line.strip()]
        runs.append(summary)
    return runs


def run_folders(folder: str, task: str) -> list[str]:
    """The method folders (slugs) under runs/<task>/ of a folder."""
    return sorted({p.parts[2] for p in folder_files(folder) if len(p.parts) > 3 and p.parts[:2] == ("runs", task)})


def csv_rows(folder: str, pattern: str) -> dict[PurePosixPath, list[dict]]:
    """{path: rows} of the folder's CSV files whose path matches `pattern` (PurePath.match), sorted by path."""
    files = folder_files(folder)
    return {p: list(csv.DictReader(io.StringIO(files[p].decode("utf-8"), newline="")))
            for p in sorted(files, key=lambda p: p.parts) if p.match(pattern)}


def unpacked_only(folder: str) -> list[str]:
    """Run folders on disk that the pack lacks or holds otherwise: pack them before committing."""
    packed = read_pack(folder)
    return sorted(u for u, files in read_disk(folder).items() if u != ROOT_UNIT and packed.get(u) != files)


def folders() -> list[str]:
    names = {p.name[: -len(SUFFIX)] for p in RUNS.glob(f"*{SUFFIX}")}
    names |= {p.name for p in RUNS.iterdir() if p.is_dir()} if RUNS.is_dir() else set()
    return sorted(names)


# ------------------------------------------------------------------------------------------------- writing


def _pack_bytes(units: dict[str, dict[str, bytes]]) -> bytes:
    lines = [json.dumps({"path": unit, "files": {n: _encode(units[unit][n]) for n in sorted(units[unit])}},
                        ensure_ascii=False, separators=(",", ":")) + "\n" for unit in sorted(units)]
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write("".join(lines).encode("utf-8"))
    return out.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    from astra_peft._io import atomic_path  # the project's one atomic-write helper

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def pack(folder: str, replace: bool = False) -> int:
    """Fold the unpacked run folders into the pack (each replacing its packed version; the comparison's own files
    file by file). With `replace`, the pack becomes exactly what is on disk (to drop a run: unpack, delete, repack
    with replace). Returns how many run folders the pack holds."""
    disk = read_disk(folder)
    units = {} if replace else {u: dict(f) for u, f in read_pack(folder).items()}
    root = {**units.get(ROOT_UNIT, {}), **disk.pop(ROOT_UNIT, {})}
    units.update(disk)
    if root:
        units[ROOT_UNIT] = root
    if not units:
        return 0
    data = _pack_bytes(units)
    path = pack_path(folder)
    if not path.is_file() or path.read_bytes() != data:
        _write_atomic(path, data)
    return sum(u != ROOT_UNIT for u in units)


def unpack(folder: str) -> int:
    """Write the packed files back under study/runs/<folder>/. A run folder already on disk is left as it is (it is
    the newer: a run under way or redone); of the comparison's own files only the missing ones are written.
    Returns how many files were written."""
    base, written = RUNS / folder, 0
    for unit, files in read_pack(folder).items():
        if unit != ROOT_UNIT and (base / unit).exists():
            continue
        for name, data in files.items():
            path = base / unit / name
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written += 1
    return written


def check(folder: str) -> list[str]:
    """Problems with a folder's pack: it does not round-trip byte for byte, or an unpacked run differs from it."""
    problems = []
    packed = read_pack(folder)
    if packed and _pack_bytes(packed) != pack_path(folder).read_bytes():
        problems.append(f"{pack_path(folder)} is not in canonical form (repack it)")
    for unit in unpacked_only(folder):
        problems.append(f"{RUNS / folder / unit} is not packed as it is on disk (run: python study/pack_runs.py "
                        f"pack {folder})")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("pack", "unpack", "check"))
    p.add_argument("folders", nargs="*", help="folders under study/runs (default: all)")
    p.add_argument("--replace", action="store_true", help="pack: the pack becomes exactly what is on disk")
    args = p.parse_args(argv)
    names = args.folders or folders()
    failed = False
    for name in names:
        if args.action == "pack":
            print(f"{pack_path(name).relative_to(HERE.parent)}: {pack(name, args.replace)} run folders")
        elif args.action == "unpack":
            print(f"{RUNS.relative_to(HERE.parent) / name}: {unpack(name)} files written")
        else:
            problems = check(name)
            failed |= bool(problems)
            print("\n".join(problems) if problems else f"{name}: ok")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
