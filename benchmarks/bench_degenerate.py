"""Degenerate-heavy spectra: the decomposition phase with `smallest` vs `largest` eigenvectors, side by side.

    .venv/bin/python benchmarks/bench_degenerate.py                 # 3 rounds
    .venv/bin/python benchmarks/bench_degenerate.py --quick         # 1 round

Model: a random-weight LLaMA with Gemma-3-270M's layer shapes (hidden 640, intermediate 2048, 18 blocks, 4 query
heads of 256, 1 KV head; vocabulary cut to 4096, which only the embedding sees), LoRA r=16 on all seven
projections (126 layers). q_proj (1024 × 640) and gate/up (2048 × 640) have 384 and 1408 structural zero
eigenvalues, and float32 accumulation leaves o_proj's output covariance with tens of negative round-off
eigenvalues: `smallest` (the default) selects in all of these degenerate spaces, through the null-space basis
(`spectrum._null_space_basis`), `largest` never does. The statistics (default AstraConfig: covariance, float32
accumulation) are collected once by a `prepare` process on random token ids (--sequences × --seq-len, seeded) and
saved; each configuration then runs in a fresh process: build the same seeded model, get_peft_model, load the
statistics, initialize_astra_weights(stats=...). Measured: the decomposition phase (AstraReport) and the CPU time
of the whole initialisation (time.process_time), with the ratio smallest ÷ largest paired per round.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ["smallest", "largest"]
SHAPES = dict(vocab_size=4096, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
              num_key_value_heads=1, head_dim=256, max_position_embeddings=512)


def build():
    import torch
    import transformers
    from peft import LoraConfig

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES)).eval()
    return model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)


def worker(config: str, args) -> None:
    import torch
    from peft import get_peft_model

    from astra_peft import ActivationStats, AstraConfig, collect_activation_stats, initialize_astra_weights

    C.set_worker_threads()
    model, lora = build()
    if config == "prepare":
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SHAPES["vocab_size"], (args.sequences, args.seq_len), generator=g)
        batches = [{"input_ids": ids[i : i + 8]} for i in range(0, args.sequences, 8)]
        stats = collect_activation_stats(model, batches, lora, AstraConfig(show_progress=False))
        stats.save(args.stats)
        C.emit({"seconds": stats.seconds})
        return
    peft_model = get_peft_model(model, lora)
    stats = ActivationStats.load(args.stats)
    cpu0, t0 = time.process_time(), time.perf_counter()
    report = initialize_astra_weights(peft_model, stats=stats,
                                      astra_config=AstraConfig(eigen_selection=config, show_progress=False))
    C.emit({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
            "decomposition_seconds": report.decomposition_seconds,
            "degenerate_layers": len(report.degenerate_layers),
            "degenerate_directions": sum(l.selection.n_degenerate for l in report.layers)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--out", default="degenerate.json", help="JSON file name under benchmarks/results/")
    ap.add_argument("--source", default="HEAD", help="git revision of astra_peft under test, or 'worktree'")
    ap.add_argument("--stats")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    if args.quick:
        args.repeats = 1
    C.pin_source(args.source)
    info = C.machine_info()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--sequences", str(args.sequences), "--seq-len", str(args.seq_len),
                 "--stats", os.path.join(tmp, "stats.safetensors")]
        C.RESULTS.mkdir(parents=True, exist_ok=True)
        with open(C.RESULTS / (Path(args.out).stem + ".log"), "w") as log:
            prep = C.run_worker(__file__, "prepare", extra, 3600, log, args.threads)
            if not prep["ok"]:
                raise SystemExit(f"preparing the statistics failed: {prep['error']}")
            results = C.run_rounds(__file__, CONFIGS, args.repeats, lambda c: extra, 3600, log, threads=args.threads)
    report(results, info, args, time.time() - t0, prep)


def report(results, info, args, wall, prep) -> None:
    keys = {"decomposition s": "decomposition_seconds", "init CPU s": "cpu_seconds", "init wall s": "seconds"}
    rows, summary = [], {}
    for cfg in CONFIGS:
        ok = [r for r in results[cfg] if r["ok"]]
        summary[cfg] = {k: C.summary([r[v] for r in ok]) for k, v in keys.items()}
        summary[cfg]["ratio_vs_largest"] = {
            k: C.summary(C.paired_ratios(results, cfg, "largest", lambda r, v=v: r[v])) for k, v in keys.items()}
        ratio = summary[cfg]["ratio_vs_largest"]
        rows.append([cfg, f"{len(ok)}/{len(results[cfg])}", ok[0]["degenerate_layers"] if ok else "–",
                     *(C.fmt_spread(summary[cfg][k], 1, 2) for k in keys),
                     *(C.fmt_spread(ratio[k], 1, 3) for k in ("decomposition s", "init CPU s"))])
    header = ["selection", "ok", "layers selecting degenerate", *(f"{k}, median [min–max]" for k in keys),
              "decomposition ÷ largest", "init CPU ÷ largest"]
    text = C.table(header, rows)
    loads = [r["loadavg_before"][0] for rs in results.values() for r in rs]
    title = (f"Decomposition, random-weight LLaMA with Gemma-3-270M shapes, r=16 x 126 layers, statistics of "
             f"{args.sequences}x{args.seq_len} random tokens (calibrated once, {prep['seconds']:.0f} s); "
             f"{args.repeats} round(s), each configuration a fresh process, {args.threads} thread(s); 1-min load "
             f"average {min(loads):.1f}–{max(loads):.1f}; astra_peft @ {C._PINNED.commit if C._PINNED else '?'}")
    print()
    print(title)
    print(text)
    d = summary["smallest"]["ratio_vs_largest"]["decomposition s"]
    if d.get("n"):
        print(f"target: smallest ÷ largest decomposition time {d['median']:.3f} (<= 1.10: "
              f"{'met' if d['median'] <= 1.10 else 'MISSED'})")
    payload = {"benchmark": "degenerate", "machine": info, "sources": C.check_sources(results),
               "loadavg_at_end": os.getloadavg(), "wall_seconds": wall,
               "setting": {"shapes": SHAPES, "targets": TARGETS, "r": 16, "sequences": args.sequences,
                           "seq_len": args.seq_len, "repeats": args.repeats, "threads": args.threads},
               "title": title, "table": text, "summary": summary, "raw": results}
    out = C.write_json(args.out, payload)
    out.with_suffix(".txt").write_text(title + "\n" + text + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
