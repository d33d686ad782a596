"""Part 2: the subset eigensolver astra-peft uses vs a full `torch.linalg.eigh`, fp32 and fp64.

    .venv/bin/python benchmarks/bench_eigensolver.py [--repeats 3] [--dims 576,1536,4096] [--ranks 8,64,128]

Test matrices: M = Q diag(λ) Qᵀ built in float64 from a Haar-random orthogonal Q (seeded) and λ log-spaced over
[1e-3, 1] (condition number 1e3: above astra-peft's null-space threshold d·eps·λ_max in fp32 for every d here, so
no eigenvalue counts as degenerate and every solver answers the same question). Q's columns are the exact
eigenvectors, so each result is also compared with the truth. fp32 runs use M rounded to float32.

Configurations, each timed in its own fresh process, `--repeats` rounds (order rotated each round):
  full      torch.linalg.eigh(M): all d eigenpairs (LAPACK syevd).
  tail-r    astra_peft.spectrum.eigenvectors(M, 0, r-1): SciPy/LAPACK syevr, only the r smallest.
  head-r    astra_peft.spectrum.eigenvectors(M, d-r, d-1): the r largest (eigen_selection='largest').
  select-r  astra_peft.spectrum.select_eigenvectors(M, r, AstraConfig()): what initialize_astra_weights runs per
            layer: one Householder reduction giving all eigenvalues (for the null-space threshold and the report)
            and the r smallest eigenvectors (MRRR on the tridiagonal matrix, dormqr back-transform), signs.
Times: the process CPU time of the one timed call (time.process_time; one thread per process, so it is far less
sensitive than wall time to the other tenants of this shared machine), wall time alongside.
Angles: sin of the largest principal angle between the two r-dimensional subspaces, computed in float64.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LAM_LO, LAM_HI = 1e-3, 1.0


def spectrum(d: int):
    import numpy as np

    return np.logspace(np.log10(LAM_LO), np.log10(LAM_HI), d)


def build_matrix(d: int, folder: Path, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed + d)
    q, rr = np.linalg.qr(rng.standard_normal((d, d)))
    q *= np.sign(np.diag(rr))  # Haar measure
    lam = spectrum(d)
    m = (q * lam) @ q.T
    m = (m + m.T) / 2
    np.save(folder / f"M{d}.npy", m)
    np.save(folder / f"Q{d}.npy", q)  # column i: eigenvector of λ_i (ascending)


def sin_max_angle(a, b) -> float:
    """sin of the largest principal angle between span(a) and span(b) (both d × r), in float64."""
    import numpy as np

    qa, _ = np.linalg.qr(np.asarray(a, dtype=np.float64))
    qb, _ = np.linalg.qr(np.asarray(b, dtype=np.float64))
    resid = qb - qa @ (qa.T @ qb)
    return float(np.linalg.norm(resid, 2))


def parse_config(config: str):
    d, dtype, solver = config.split(":")
    r = None
    if solver != "full":
        solver, r = solver.rsplit("-", 1)
        r = int(r)
    return int(d), dtype, solver, r


# ------------------------------------------------------------------------------------------------ worker
def worker(config: str, folder: Path, save: bool) -> None:
    import numpy as np
    import torch

    from astra_peft import AstraConfig
    from astra_peft.spectrum import eigenvectors, select_eigenvectors

    threads = C.set_worker_threads()
    d, dtype, solver, r = parse_config(config)
    m64 = torch.from_numpy(np.load(folder / f"M{d}.npy"))
    m = m64.to(getattr(torch, dtype)).contiguous()
    t0, c0 = time.perf_counter(), time.process_time()
    if solver == "full":
        values, vectors = torch.linalg.eigh(m)
    elif solver == "tail":
        vectors = eigenvectors(m, 0, r - 1)
    elif solver == "head":
        vectors = eigenvectors(m, d - r, d - 1)
    elif solver == "select":
        vectors, info = select_eigenvectors(m, r, AstraConfig(show_progress=False), "bench")
        assert info.n_selected_degenerate == 0, "a degenerate direction was selected: the test spectrum is wrong"
    else:
        raise ValueError(solver)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    result = {"d": d, "dtype": dtype, "solver": solver, "r": r, "seconds": seconds, "cpu_seconds": cpu_seconds,
              "torch_threads": threads}
    q = np.load(folder / f"Q{d}.npy")
    v = vectors.double().numpy()
    if solver == "full":
        result["sin_vs_truth"] = {str(rr): {"tail": sin_max_angle(v[:, :rr], q[:, :rr]),
                                            "head": sin_max_angle(v[:, -rr:], q[:, -rr:])} for rr in RANKS}
    else:
        lo = 0 if solver in ("tail", "select") else d - r
        result["sin_vs_truth"] = sin_max_angle(v, q[:, lo:lo + r])
    if save:
        np.save(folder / f"V_{config.replace(':', '_')}.npy", v)
    C.emit(result)


RANKS = [8, 64, 128]


# ------------------------------------------------------------------------------------------------ parent
def main() -> None:
    global RANKS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dims", default="576,1536,4096")
    ap.add_argument("--ranks", default="8,64,128")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and BLAS in every worker (default 1: this 2-core machine is shared)")
    ap.add_argument("--out", default="eigensolver.json")
    ap.add_argument("--source", default="HEAD",
                    help="astra_peft under test: a git revision snapshotted for every worker (default HEAD), "
                         "or 'worktree' for the working tree as it is")
    ap.add_argument("--worker")
    ap.add_argument("--folder")
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    RANKS = [int(x) for x in args.ranks.split(",")]
    if args.worker:
        worker(args.worker, Path(args.folder), args.save)
        return

    dims = [int(x) for x in args.dims.split(",")]
    dtypes = args.dtypes.split(",")
    C.pin_source(args.source)
    info = C.machine_info()
    folder = Path(tempfile.mkdtemp(prefix="astra-eigbench-"))
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    log = open(C.RESULTS / (Path(args.out).stem + ".log"), "w")
    try:
        for d in dims:
            build_matrix(d, folder)
        configs = [f"{d}:{dt}:{s}" for d in dims for dt in dtypes
                   for s in ["full"] + [f"{kind}-{r}" for r in RANKS for kind in ("tail", "head", "select")]]
        first_round = set()

        def extra(config):
            save = config not in first_round
            first_round.add(config)
            return ["--folder", str(folder), "--ranks", args.ranks] + (["--save"] if save else [])

        t0 = time.time()
        results = C.run_rounds(__file__, configs, args.repeats, extra, timeout=1800, log=log,
                               threads=args.threads)
        import numpy as np

        # solver vs full eigh: sin of the largest principal angle, from the saved first-round vectors
        rows, records = [], []
        for d in dims:
            for dt in dtypes:
                full_file = folder / f"V_{d}_{dt}_full.npy"
                full_v = np.load(full_file) if full_file.exists() else None
                full_s = C.summary([r["cpu_seconds"] for r in results[f"{d}:{dt}:full"] if r["ok"]])
                full_w = C.summary([r["seconds"] for r in results[f"{d}:{dt}:full"] if r["ok"]])
                for r in RANKS:
                    for kind in ("tail", "head", "select"):
                        cfg = f"{d}:{dt}:{kind}-{r}"
                        s = C.summary([x["cpu_seconds"] for x in results[cfg] if x["ok"]])
                        sw = C.summary([x["seconds"] for x in results[cfg] if x["ok"]])
                        ratio = C.paired_ratios(results, cfg, f"{d}:{dt}:full", lambda x: x["cpu_seconds"])
                        vf = folder / f"V_{d}_{dt}_{kind}-{r}.npy"
                        sin_eigh = None
                        if full_v is not None and vf.exists():
                            ref = full_v[:, :r] if kind in ("tail", "select") else full_v[:, -r:]
                            sin_eigh = sin_max_angle(np.load(vf), ref)
                        ok = [x for x in results[cfg] if x["ok"]]
                        full_ok = [x for x in results[f"{d}:{dt}:full"] if x["ok"]]
                        sin_truth = ok[0]["sin_vs_truth"] if ok else None
                        sin_full_truth = (full_ok[0]["sin_vs_truth"][str(r)]["head" if kind == "head" else "tail"]
                                          if full_ok else None)
                        rec = {"d": d, "dtype": dt, "solver": kind, "r": r, "cpu_seconds": s, "seconds": sw,
                               "full_eigh_cpu_seconds": full_s, "full_eigh_seconds": full_w,
                               "speedup_vs_full_median": (full_s["median"] / s["median"]) if s.get("n") and
                               full_s.get("n") else None,
                               "wall_speedup_vs_full_median": (full_w["median"] / sw["median"]) if sw.get("n") and
                               full_w.get("n") else None,
                               "cpu_time_ratio_vs_full_paired": C.summary(ratio),
                               "sin_angle_vs_full_eigh": sin_eigh, "sin_angle_vs_truth": sin_truth,
                               "full_eigh_sin_angle_vs_truth": sin_full_truth}
                        records.append(rec)
                        rows.append([d, dt.replace("float", "fp"), f"{kind}-{r}", C.fmt_spread(s, 1e-3, 0),
                                     C.fmt_spread(full_s, 1e-3, 0),
                                     f"{rec['speedup_vs_full_median']:.1f}×" if rec["speedup_vs_full_median"] else "n/a",
                                     f"{rec['wall_speedup_vs_full_median']:.1f}×" if rec["wall_speedup_vs_full_median"]
                                     else "n/a",
                                     f"{sin_eigh:.1e}" if sin_eigh is not None else "n/a",
                                     f"{sin_truth:.1e}" if sin_truth is not None else "n/a",
                                     f"{sin_full_truth:.1e}" if sin_full_truth is not None else "n/a"])
        header = ["d", "dtype", "solver", "CPU ms, median [min–max]", "full eigh CPU ms", "speed-up (CPU)",
                  "speed-up (wall)",
                  "sin∠(solver, eigh)", "sin∠(solver, exact)", "sin∠(eigh, exact)"]
        text = C.table(header, rows)
        print()
        print(f"Eigensolver: median of {args.repeats} fresh processes each; λ log-spaced over "
              f"[{LAM_LO:g}, {LAM_HI:g}]; {args.threads} thread(s) per process; astra_peft @ {C._PINNED.commit}")
        print(text)
        sources = C.check_sources(results)
        payload = {"benchmark": "eigensolver", "machine": info, "sources": sources, "loadavg_at_end": os.getloadavg(),
                   "wall_seconds": time.time() - t0, "repeats": args.repeats, "threads": args.threads,
                   "matrix": f"Q diag(logspace({LAM_LO:g},{LAM_HI:g},d)) Q^T, Q Haar (seed 0+d), float64, cast for fp32",
                   "table": text, "rows": records, "raw": results}
        print("wrote", C.write_json(args.out, payload))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        log.close()


if __name__ == "__main__":
    main()
