"""Quantization error at init of the routes to a 4-bit (bitsandbytes nf4) base, against the full-precision model.

Routes, each on the same tiny random LLaMA (fp32, CPU), r=8 on all seven projections, lora_alpha = s·r for
each `--scaling` s:
  qlora            plain QLoRA: the ORIGINAL model loaded in nf4, LoRA with B = 0 (computes deq(W)).
  loftq            one-shot LoftQ on that model: s·B·A = SVD_r(W − deq(W)), the best rank-r absorption of the
                   quantization error (written by hand as PEFT's _loftq_init_new does: PEFT's
                   replace_lora_weights_loftq hard-codes CUDA in peft 0.21.2).
  qpissa           PEFT's QPiSSA recipe: init_lora_weights="pissa" in fp32, the residual W − BA saved and
                   reloaded in nf4, the initial adapter loaded on it.
  astra-residual   astra_peft.quantized.quantize_astra_model: the same recipe with Astra's init (default
                   AstraConfig: smallest eigenvectors of the output covariance).
  astra-residual-largest   the same with eigen_selection="largest" (the authors' code).
  astra-native     astra_peft.quantized.initialize_astra_on_quantized: the ORIGINAL nf4 base untouched,
                   B = Q, A = Qᵀ(W − deq(W))/s.
Measured against the full-precision original (= the fp32 Astra model at init, to ~1e-6): max and mean
|Δlogits| over the non-padding positions of held-out batches, and ‖W_eff − W‖_F/‖W‖_F per LoRA layer
(W_eff = deq(base) + s·B·A), mean and max over the 14 layers. Means over `--seeds` random models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_qlora.py --out results/qlora_<commit>.txt

Two weight spectra: the random init (flat singular values) and a decaying one (σ_i ∝ 1/(i+1)), closer to
trained weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROUTES = ["qlora", "loftq", "qpissa", "astra-residual", "astra-residual-largest", "astra-native"]


def tiny_llama(seed: int, hidden: int, inter: int, spectrum: str = "random"):
    """spectrum 'random': the random init (flat singular values); 'decaying': each projection's singular values
    reshaped to σ_i ∝ 1/(i+1) (Frobenius norm kept), closer to trained weights, where PiSSA's principal part
    carries much of the weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    if spectrum == "decaying":
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
                    u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                    new = 1.0 / torch.arange(1, s.numel() + 1, dtype=s.dtype)
                    module.weight.copy_((u * (new * s.norm() / new.norm())) @ vh)
    return model


def batches(seed: int, n: int, size: int = 4, length: int = 48):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1::2, length // 2:] = 0  # right padding on every other row
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def loftq_one_shot(model, original) -> None:
    from astra_peft.layers import lora_layers, weight_matrix
    from astra_peft.quantized import dequantized_weight

    plain = dict(original.named_modules())
    for name, layer in lora_layers(model, "default").items():
        error = weight_matrix(plain[name]).detach() - dequantized_weight(layer.get_base_layer())
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        r, root = layer.r["default"], s[: layer.r["default"]].sqrt()
        layer.lora_B["default"].weight.data.copy_(u[:, :r] * root)
        layer.lora_A["default"].weight.data.copy_(root[:, None] * vh[:r] / layer.scaling["default"])


def build(route: str, original, original_dir: Path, work: Path, calib, r: int, alpha: int):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    from astra_peft import AstraConfig, initialize_astra_weights
    from astra_peft.quantized import (disable_cpu_weight_packing, initialize_astra_on_quantized, nf4_config,
                                      quantize_astra_model)

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS)

    def load_4bit(path):
        model = LlamaForCausalLM.from_pretrained(str(path), quantization_config=nf4_config())
        disable_cpu_weight_packing(model)
        return model

    if route in ("qlora", "loftq", "astra-native"):
        model = get_peft_model(load_4bit(original_dir), config)
        if route == "loftq":
            loftq_one_shot(model, original)
        elif route == "astra-native":
            initialize_astra_on_quantized(model, original, calib, AstraConfig(show_progress=False))
        return model
    fp = get_peft_model(LlamaForCausalLM.from_pretrained(str(original_dir)).eval(),
                        LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                   init_lora_weights="pissa" if route == "qpissa" else True))
    if route == "qpissa":  # PEFT's recipe (examples/pissa_finetuning): save the init adapter, unload, save residual
        fp.peft_config["default"].init_lora_weights = True  # as PEFT's example: do not run PiSSA again on load
        fp.save_pretrained(str(work / "pissa_init"))
        fp.unload().save_pretrained(str(work / "pissa_residual"))
        return PeftModel.from_pretrained(load_4bit(work / "pissa_residual"), str(work / "pissa_init"))
    selection = "largest" if route.endswith("largest") else "smallest"
    initialize_astra_weights(fp, calib, AstraConfig(eigen_selection=selection, show_progress=False))
    return quantize_astra_model(fp, work / route)


def measure(seeds: list[int], hidden: int, inter: int, r: int, alpha: int, spectrum: str) -> dict:
    from astra_peft.quantized import quantization_error

    results = {route: [] for route in ROUTES}
    for seed in seeds:
        original = tiny_llama(seed, hidden, inter, spectrum)
        calib, held_out = batches(100 + seed, 8), batches(200 + seed, 4)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            original.save_pretrained(str(work / "original"))
            for route in ROUTES:
                torch.manual_seed(seed)
                model = build(route, original, work / "original", work, calib, r, alpha)
                results[route].append(quantization_error(model, original, held_out))
    return results


def render(results: dict, args, spectrum: str, alpha: int) -> str:
    base = results["qlora"]

    def mean(route, key):
        return statistics.mean(x[key] for x in results[route])

    def layer_stat(route, fn):
        return statistics.mean(fn(x["layers"].values()) for x in results[route])

    rows = []
    for route, runs in results.items():
        ratios = [x["mean_abs_logits"] / b["mean_abs_logits"] for x, b in zip(runs, base)]
        layer_ratios = [statistics.mean(x["layers"].values()) / statistics.mean(b["layers"].values())
                        for x, b in zip(runs, base)]
        rows.append([route, f"{mean(route, 'max_abs_logits'):.4f}", f"{mean(route, 'mean_abs_logits'):.5f}",
                     f"{statistics.mean(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]",
                     f"{layer_stat(route, statistics.mean):.4f}", f"{layer_stat(route, max):.4f}",
                     f"{statistics.mean(layer_ratios):.3f} [{min(layer_ratios):.3f}–{max(layer_ratios):.3f}]"])
    title = (f"Quantization error at init vs the fp32 original; tiny random LLaMA ({spectrum} singular values) "
             f"hidden={args.hidden}, "
             f"intermediate={args.intermediate}, 2 layers, r={args.rank}, lora_alpha={alpha} (s={alpha / args.rank:g}) "
             f"on {len(TARGETS)} projections, nf4 "
             f"(blocksize 64, no double quant, fp32 compute, CPU); mean over seeds {args.seeds}, "
             f"[min–max] of the per-seed ratio to qlora")
    header = ["route", "max|Δlogits|", "mean|Δlogits|", "mean|Δlogits| ÷ qlora", "layer rel.err mean",
              "layer rel.err max", "layer mean ÷ qlora"]
    return f"{title}\n{table(header, rows)}\n"


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scaling", type=float, nargs="+", default=[1.0, 2.0],
                        help="s = lora_alpha / r; Astra's residual W − s·B·A removes B·A's part of W only at s = 1")
    parser.add_argument("--spectrum", nargs="+", choices=["random", "decaying"], default=["random", "decaying"])
    parser.add_argument("--out", help="also write the table to benchmarks/<OUT>")
    parser.add_argument("--commit", help="the label of the astra_peft under test (default: git HEAD + working tree)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    text = ""
    for spectrum in args.spectrum:
        for scale in args.scaling:
            alpha = round(scale * args.rank)
            with contextlib.redirect_stderr(io.StringIO()):  # loading bars and bitsandbytes' CPU notices
                results = measure(args.seeds, args.hidden, args.intermediate, args.rank, alpha, spectrum)
            table_text = render(results, args, spectrum, alpha) + "\n"
            print(table_text, end="", flush=True)
            text += table_text
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip() + " (+ working tree)"
    text += f"astra_peft @ {commit}; torch {torch.__version__}, bitsandbytes {_version('bitsandbytes')}, peft " \
            f"{_version('peft')}, transformers {_version('transformers')}\n"
    print(text.splitlines()[-1])
    if args.out:
        path = Path(__file__).resolve().parent / args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    main()
