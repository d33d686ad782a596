"""Part 3: training step time of an Astra-initialised LoRA vs a plain LoRA, same rank, same batch, SmolLM2-135M.

    .venv/bin/python benchmarks/bench_training.py [--repeats 4] [--steps 10] [--warmup 2]

Both models: SmolLM2-135M fp32, LoRA r=16 (lora_alpha=16, no dropout) on all seven projections of all 30 blocks,
AdamW (lr 2e-4) on the adapter weights only, batch 4 x 128 tokens of `math-qa` training text (prompt + completion
rows joined by EOS, packed; step i reads the same tokens in both configurations), loss = next-token cross-entropy.
  lora    get_peft_model with PEFT's default init (A Kaiming-uniform, B = 0)
  astra   the same PeftModel after initialize_astra_weights (AstraConfig defaults, covariance, 8 x 256 calibration
          tokens); the initialisation runs once in a separate fresh process before the rounds and its state dict
          (adapter + residual base weights) is loaded by every astra worker, so only training is timed.
Each configuration runs in its own fresh process, `--repeats` rounds, order alternating; each process times
`--warmup` + `--steps` optimizer steps (forward, backward, AdamW step, zero_grad) and reports the median of the
measured steps, in wall time and in process CPU time (one thread per process, so CPU time is far less sensitive to
the other tenants of this shared 2-core machine). The table gives the median and spread over processes and the astra/lora ratio per round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_init import MODEL, calibration_ids, lora_config, materialise  # noqa: E402

CONFIGS = ["lora", "astra"]


def build(args):
    import torch
    from peft import get_peft_model

    from astra_peft.harness.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(MODEL, task_kind="generation")
    model.config.use_cache = False
    materialise(model)
    peft_model = get_peft_model(model, lora_config())
    return peft_model, tokenizer


def prepare(args) -> None:
    """Astra-initialise once and save the full state dict for the astra workers."""
    C.set_worker_threads()
    import torch

    from astra_peft import AstraConfig, initialize_astra_weights

    peft_model, tokenizer = build(args)
    ids = calibration_ids(tokenizer, args.task, 8, 256)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    t0 = time.perf_counter()
    report = initialize_astra_weights(peft_model, batches, AstraConfig(show_progress=False))
    torch.save(peft_model.state_dict(), Path(args.folder) / "astra_state.pt")
    C.emit({"seconds": time.perf_counter() - t0, "layers": len(report.layers)})


def worker(config: str, args) -> None:
    threads = C.set_worker_threads()
    import torch

    peft_model, tokenizer = build(args)
    if config == "astra":
        state = torch.load(Path(args.folder) / "astra_state.pt")
        missing, unexpected = peft_model.load_state_dict(state, strict=True), None
        del state
        b = next(m.lora_B["default"].weight for n, m in peft_model.named_modules() if hasattr(m, "lora_B"))
        assert b.abs().sum() > 0, "astra state was not loaded"
    elif config != "lora":
        raise ValueError(config)
    n_steps = args.warmup + args.steps
    ids = calibration_ids(tokenizer, args.task, n_steps * args.batch_size, args.seq_len)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    peft_model.train()
    times, cpu_times, losses = [], [], []
    for step in range(n_steps):
        x = ids[step * args.batch_size:(step + 1) * args.batch_size]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = peft_model(input_ids=x, attention_mask=torch.ones_like(x), labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(float(loss))
    C.emit({"median_step_s": statistics.median(times[args.warmup:]),
            "median_step_cpu_s": statistics.median(cpu_times[args.warmup:]), "step_s": times,
            "step_cpu_s": cpu_times, "losses": losses, "threads": threads,
            "trainable_params": sum(p.numel() for p in params)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--task", default="math-qa")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and BLAS in every worker (default 1: this 2-core machine is shared)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 measured steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--source", default="HEAD",
                    help="astra_peft under test: a git revision snapshotted for every worker (default HEAD), "
                         "or 'worktree' for the working tree as it is")
    ap.add_argument("--worker")
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.worker == "prepare":
        prepare(args)
        return
    if args.worker:
        worker(args.worker, args)
        return
    if args.quick:
        args.repeats, args.steps = 1, 2
    out = args.out or ("training_quick.json" if args.quick else "training.json")
    C.pin_source(args.source)
    info = C.machine_info()
    folder = Path(tempfile.mkdtemp(prefix="astra-trainbench-"))
    common = ["--folder", str(folder), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
              str(args.batch_size), "--seq-len", str(args.seq_len), "--task", args.task]
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        with open(C.RESULTS / (Path(out).stem + ".log"), "w") as log:
            prep = C.run_worker(__file__, "prepare", common, 3600, log, args.threads)
            if not prep["ok"]:
                raise SystemExit(f"Astra initialisation failed: {prep['error']}")
            print(f"astra initialisation (untimed for training): {prep['seconds']:.0f}s", flush=True)
            results = C.run_rounds(__file__, CONFIGS, args.repeats, lambda c: common, 3600, log,
                                   threads=args.threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    key = lambda r: r["median_step_s"]  # noqa: E731
    ckey = lambda r: r["median_step_cpu_s"]  # noqa: E731
    fmt_ratio = lambda x: f"{x['median']:.3f} [{x['min']:.3f}–{x['max']:.3f}]" if x.get("n") else "–"  # noqa: E731
    rows, summary = [], {}
    for cfg in CONFIGS:
        ok = [r for r in results[cfg] if r["ok"]]
        s, sc = C.summary([key(r) for r in ok]), C.summary([ckey(r) for r in ok])
        ratio = C.summary(C.paired_ratios(results, cfg, "lora", key))
        cratio = C.summary(C.paired_ratios(results, cfg, "lora", ckey))
        pooled = C.summary([t for r in ok for t in r["step_s"][args.warmup:]])
        summary[cfg] = {"median_step_s": s, "median_step_cpu_s": sc, "ratio_vs_lora_paired": ratio,
                        "cpu_ratio_vs_lora_paired": cratio, "all_measured_steps_s": pooled}
        rows.append([cfg, f"{s['n']}/{len(results[cfg])}", C.fmt_spread(s, 1e-3, 0), fmt_ratio(ratio),
                     C.fmt_spread(sc, 1e-3, 0), fmt_ratio(cratio)])
    text = C.table(["configuration", "ok", "wall ms/step, median [min–max]", "wall ÷ lora, same round",
                    "CPU ms/step", "CPU ÷ lora, same round"], rows)
    ratio_of_medians = (summary["astra"]["median_step_s"]["median"] / summary["lora"]["median_step_s"]["median"]
                        if summary["astra"]["median_step_s"].get("n") and summary["lora"]["median_step_s"].get("n")
                        else None)
    loads = [r["loadavg_before"][0] for rs in results.values() for r in rs]
    title = (f"Training step, SmolLM2-135M fp32, LoRA r=16 x 210 layers, batch {args.batch_size} x {args.seq_len}, "
             f"AdamW; {args.repeats} rounds x {len(CONFIGS)} fresh processes, {args.warmup} warm-up + {args.steps} "
             f"measured steps each, {args.threads} thread(s); load average {min(loads):.1f}–{max(loads):.1f}; "
             f"astra_peft @ {C._PINNED.commit if C._PINNED else '?'}")
    print()
    print(title)
    print(text)
    cpu_ratio_of_medians = (summary["astra"]["median_step_cpu_s"]["median"] /
                            summary["lora"]["median_step_cpu_s"]["median"]
                            if summary["astra"]["median_step_cpu_s"].get("n") and
                            summary["lora"]["median_step_cpu_s"].get("n") else None)
    if ratio_of_medians:
        print(f"astra / lora, ratio of medians: wall {ratio_of_medians:.3f}, CPU {cpu_ratio_of_medians:.3f}")
    sources = C.check_sources(results)
    payload = {"benchmark": "training", "machine": info, "sources": sources, "loadavg_at_end": os.getloadavg(),
               "wall_seconds": time.time() - t0, "title": title, "table": text,
               "ratio_of_medians": ratio_of_medians, "cpu_ratio_of_medians": cpu_ratio_of_medians, "summary": summary, "prepare": prep, "raw": results,
               "setting": vars(args)}
    print("wrote", C.write_json(out, payload))


if __name__ == "__main__":
    main()
