"""Degenerate eigenvalues per layer type of SmolLM2-135M, at the library's float64 tolerance and at a
float32-sized one (rtol = d·eps(float32)), on 16 × 128 tokens of `math-qa` text.

    python study/spectrum_report.py
"""

import collections

import torch
from peft import LoraConfig

from astra_peft import AstraConfig, collect_activation_stats
from astra_peft.harness.models import load_model
from astra_peft.spectrum import select_eigenvectors
from astra_peft.harness.tasks import load_task

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    model, tok = load_model("smollm2-135m", task_kind="generation")
    rows = load_task("math-qa").splits["train"][:300]
    ids = tok(" ".join(r["prompt"] + r["completion"] for r in rows), return_tensors="pt").input_ids[0]
    ids = ids[: 16 * 128].view(16, 128)
    batches = [{"input_ids": ids[i : i + 8], "attention_mask": torch.ones_like(ids[i : i + 8])} for i in (0, 8)]
    stats = collect_activation_stats(model, batches, LoraConfig(target_modules=TARGETS), AstraConfig())
    modules = dict(model.named_modules())
    counts = collections.defaultdict(lambda: collections.defaultdict(list))
    for name in stats.layers:
        layer = modules[name]
        d = layer.out_features
        for label, rtol in (("float64 tolerance", None), ("float32-sized tolerance", d * torch.finfo(torch.float32).eps)):
            _, sel = select_eigenvectors(stats.output_statistic(name, "covariance", layer.weight, layer.bias), 16,
                                         AstraConfig(null_space_rtol=rtol), name)
            counts[label][name.split(".")[-1]].append(sel.n_degenerate)
    print("degenerate eigenvalues per layer (min–max over the 30 blocks), d_out in brackets")
    for label, by_type in counts.items():
        print(f"  {label}:")
        for kind in TARGETS:
            v = by_type[kind]
            print(f"    {kind:10s} [{modules[next(n for n in stats.layers if n.endswith(kind))].out_features}] {min(v)}–{max(v)}")


if __name__ == "__main__":
    main()
