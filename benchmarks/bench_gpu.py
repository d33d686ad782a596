"""GPU benchmark: Astra calibration + initialisation against a bare forward pass and PEFT's CorDA, on a
random-weight bf16 LLaMA with 7B-class shapes built on the device (nothing to download).

Each configuration runs in a fresh process (so peak memory is its own), one after the other, and appends
one JSON record to OUT/gpu_bench.jsonl as it finishes; the summary (ratios to the floor's time, memory
ratios to CorDA's) goes to OUT/gpu_bench.json. A configuration that fails or runs out of time is recorded
as such, never silently dropped.

    python benchmarks/bench_gpu.py --out "$OUT"                 # on the lent GPU machine (≈ 5 min budget)
    python benchmarks/bench_gpu.py --out /tmp/g --tiny --device cpu   # a smoke run of the same code on CPU

Shapes: LLaMA-2-7B's per-layer shapes (hidden 4096, intermediate 11008, 32 heads, vocab 32000), with
`--layers` decoder layers (default 8 of the real 32, so CorDA fits the budget: every per-layer cost
here scales linearly with the layer count, and the totals are reported per layer too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("floor", "astra-covariance", "astra-max_normalized", "corda")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        shape = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
                     vocab_size=128)
    else:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000)
    config = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=max(args.seq_len, 64), **shape)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    model.config.use_cache = False
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (args.sequences, args.seq_len), generator=g).to(args.device)
    return model, ids, shape


def lora_config(args, **kw):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, **kw)


def worker(name: str, args) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, ids, shape = build(args)
    batches = [{"input_ids": ids[i:i + args.batch_size], "attention_mask": torch.ones_like(ids[i:i + args.batch_size])}
               for i in range(0, len(ids), args.batch_size)]
    with torch.no_grad():  # warm-up: kernels, allocator and cuBLAS handles exist before anything is timed
        model(**batches[0], logits_to_keep=1)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() if cuda else 0
    phases = {}
    t0 = time.perf_counter()
    if name == "floor":
        with torch.no_grad():
            for b in batches:
                model(**b, logits_to_keep=1)
    elif name.startswith("astra-"):
        from peft import get_peft_model

        from astra_peft import AstraConfig, collect_activation_stats, initialize_astra_weights

        cfg = AstraConfig(statistic=name[len("astra-"):], show_progress=False)
        lc = lora_config(args)
        forward = lambda m, b: m(**b, logits_to_keep=1)  # noqa: E731 - the floor's forward, exactly
        stats = collect_activation_stats(model, batches, lc, cfg, forward_fn=forward)
        sync()
        phases["calibration"] = time.perf_counter() - t0
        peft_model = get_peft_model(model, lc)
        report = initialize_astra_weights(peft_model, stats=stats, astra_config=cfg)
        sync()
        phases.update(decomposition=report.decomposition_seconds, write=report.write_seconds,
                      layers=len(report.layers))
    elif name == "corda":
        from peft import get_peft_model
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        lc = lora_config(args, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))

        @torch.no_grad()
        def run_model():  # CorDA's hooks need one sequence per forward
            for seq in ids:
                model(input_ids=seq[None], logits_to_keep=1)

        preprocess_corda(model, lc, run_model=run_model)
        sync()
        phases["preprocess"] = time.perf_counter() - t0
        get_peft_model(model, lc)
    else:
        raise ValueError(f"unknown configuration {name!r}")
    sync()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - loaded) if cuda else None
    return {"config": name, "ok": True, "seconds": seconds, "peak_bytes_above_loaded": peak,
            "loaded_bytes": loaded, "phases": phases, "shape": shape, "layers": args.layers,
            "tokens": int(ids.numel()), "dtype": args.dtype, "device": args.device,
            "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Folder for gpu_bench.jsonl / gpu_bench.json (created).")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="Tiny shapes, for a smoke run on CPU.")
    p.add_argument("--budget", type=float, default=480.0, help="Seconds for all configurations together.")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_bench.jsonl"
    start, records = time.perf_counter(), []
    for name in args.configs.split(","):
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            record = {"config": name, "ok": False, "error": "skipped: the time budget was spent"}
        else:
            cmd = [sys.executable, __file__, "--worker", name] + [a for a in (argv or sys.argv[1:])]
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                record = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                    "config": name, "ok": False, "error": done.stderr[-2000:] or f"exit {done.returncode}"}
            except subprocess.TimeoutExpired:
                record = {"config": name, "ok": False, "error": f"timed out after {left:.0f} s"}
        records.append(record)
        with open(log, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps({k: record.get(k) for k in ("config", "ok", "seconds", "peak_bytes_above_loaded", "error")}),
              flush=True)
    ok = {r["config"]: r for r in records if r.get("ok")}
    floor, corda = ok.get("floor"), ok.get("corda")
    summary = {}
    for name, r in ok.items():
        summary[name] = {
            "seconds": r["seconds"],
            "seconds_per_layer": r["seconds"] / r["layers"],
            "time_vs_floor": r["seconds"] / floor["seconds"] if floor else None,
            "peak_MiB_above_loaded": r["peak_bytes_above_loaded"] / 2**20 if r["peak_bytes_above_loaded"] else None,
            "memory_vs_corda": (r["peak_bytes_above_loaded"] / corda["peak_bytes_above_loaded"]
                                if corda and corda["peak_bytes_above_loaded"] else None),
        }
    (out / "gpu_bench.json").write_text(json.dumps({"summary": summary, "records": records}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if len(ok) == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
