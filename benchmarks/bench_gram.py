"""Diagnostic for part 1: the calibration's Gram update x.T @ x (what astra_peft.calibration runs per batch and
accumulator, torch.mm) vs BLAS syrk, which forms only one triangle of the symmetric product (half the flops).

    .venv/bin/python benchmarks/bench_gram.py [--repeats 3] [--dims 576,1536,4096] [--tokens 2048]

x: `--tokens` x d float32 (one part-1 batch of 8 x 256 tokens by default). Each configuration runs in its own
fresh process, `--repeats` rounds; a process reports the median of 9 timed calls after 2 warm-up calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def worker(config: str, tokens: int) -> None:
    threads = C.set_worker_threads()
    import scipy.linalg.blas as blas
    import torch

    kind, d = config.split("-")
    torch.manual_seed(0)
    x = torch.randn(tokens, int(d))
    xt = x.numpy().T  # Fortran-contiguous d x n, so syrk(xt) = xt @ xt.T = x.T @ x (upper triangle)
    fn = (lambda: x.T @ x) if kind == "mm" else (lambda: blas.ssyrk(1.0, xt))
    times = []
    for i in range(11):
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    C.emit({"seconds": statistics.median(times), "threads": threads})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dims", default="576,1536,4096")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.tokens)
        return
    dims = args.dims.split(",")
    configs = [f"{k}-{d}" for d in dims for k in ("mm", "syrk")]
    info = C.machine_info()
    with open(C.RESULTS / "gram.log", "w") as log:
        results = C.run_rounds(__file__, configs, args.repeats, lambda c: ["--tokens", str(args.tokens)], 600, log,
                               threads=args.threads)
    rows, summary = [], {}
    for d in dims:
        for k in ("mm", "syrk"):
            cfg = f"{k}-{d}"
            s = C.summary([r["seconds"] for r in results[cfg] if r["ok"]])
            ratio = C.summary(C.paired_ratios(results, cfg, f"mm-{d}", lambda r: r["seconds"]))
            summary[cfg] = {"seconds": s, "ratio_vs_mm": ratio}
            rows.append([d, "torch x.T @ x" if k == "mm" else "BLAS ssyrk (one triangle)", C.fmt_spread(s, 1e-3, 2),
                         f"{ratio['median']:.2f} [{ratio['min']:.2f}–{ratio['max']:.2f}]" if ratio.get("n") else "–"])
    text = C.table(["d", "Gram of x (tokens x d), float32", "ms, median [min–max]", "÷ torch, same round"], rows)
    print(f"\nGram update, {args.tokens} tokens, {args.repeats} rounds of fresh processes, {args.threads} thread(s)")
    print(text)
    print("wrote", C.write_json("gram.json", {"benchmark": "gram", "machine": info, "table": text,
                                              "summary": summary, "raw": results, "loadavg_at_end": os.getloadavg(),
                                              "setting": vars(args)}))


if __name__ == "__main__":
    main()
