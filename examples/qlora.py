"""Astra with a 4-bit (QLoRA, bitsandbytes nf4) base: initialise in full precision, train on the 4-bit residual.

Runs offline on CPU in seconds: a tiny random LLaMA saved to a temporary folder stands in for a real checkpoint
(with one, `AutoModelForCausalLM.from_pretrained(name)`; on a GPU use `nf4_config(torch.bfloat16)`).

    python examples/qlora.py
"""

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from astra_peft import AstraConfig, initialize_astra_weights, save_as_lora
from astra_peft.quantized import nf4_config, quantization_error, quantize_astra_model


def tiny_llama():
    torch.manual_seed(0)
    # hidden 64: bitsandbytes quantizes in blocks of 64 weights
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 96, (4, 24), generator=g) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def main(work: Path):
    original = tiny_llama()
    original.save_pretrained(work / "original")  # stands in for the hub checkpoint
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])

    # 1. Astra on the FULL-PRECISION model (it rewrites the frozen weights: W <- W - s*B*A).
    fp_model = get_peft_model(LlamaForCausalLM.from_pretrained(work / "original").eval(), lora_config)
    initialize_astra_weights(fp_model, batches(4, seed=1), AstraConfig(show_progress=False))

    # 2. Save the residual base and the initial adapter, reload the residual in nf4 with the adapter on it.
    #    work/astra/adapter is the initial adapter: keep it, save_as_lora needs it after training.
    model = quantize_astra_model(fp_model, work / "astra", nf4_config())
    del fp_model

    # 3. How far the 4-bit model is from the original, next to plain QLoRA (the original in nf4, LoRA B = 0).
    held_out = batches(2, seed=2)
    ours = quantization_error(model, original, held_out)
    qlora = get_peft_model(LlamaForCausalLM.from_pretrained(work / "original", quantization_config=nf4_config()),
                           lora_config)
    plain = quantization_error(qlora, original, held_out)
    print(f"mean |dlogits| vs the fp32 original: Astra on the 4-bit residual {ours['mean_abs_logits']:.4f}, "
          f"plain QLoRA {plain['mean_abs_logits']:.4f}")

    # 4. Train (a few SGD steps stand in for Trainer/TRL; prepare_model_for_kbit_training applies as usual).
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step, batch in enumerate(batches(3, seed=3)):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    print("trained 3 steps on the 4-bit residual base")

    # 5. Export: a plain LoRA adapter of the ORIGINAL base (rank 2r), usable without the residual checkpoint.
    folder = save_as_lora(model, work / "lora", initial_path=work / "astra" / "adapter")
    exported = PeftModel.from_pretrained(tiny_llama(), folder)
    print(f"plain LoRA adapter for the original base: {folder.name}/ (r={exported.peft_config['default'].r})")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="astra-qlora-") as tmp:  # everything written is removed at the end
        main(Path(tmp))
