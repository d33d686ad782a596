"""Astra with ranks allocated by each layer's effective rank, under uniform r's parameter budget.

Runs offline in seconds (a tiny random LLaMA stands in for `AutoModelForCausalLM.from_pretrained(...)`):

    python examples/rank_allocation.py
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from astra_peft import allocate_ranks, collect_activation_stats, initialize_astra_weights


def main():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(1, 96, (16, 24), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4])} for i in range(0, 16, 4)]
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    with torch.no_grad():
        before = base(**batches[0]).logits

    stats = collect_activation_stats(base, batches, lora_config)
    peft_model = get_peft_model(base, allocate_ranks(base, stats, lora_config).apply(lora_config))
    initialize_astra_weights(peft_model, stats=stats)

    ranks = {name: layer.r["default"] for name, layer in peft_model.named_modules() if hasattr(layer, "lora_A")}
    print("ranks:", sorted(set(ranks.values())), f"over {len(ranks)} layers")
    with torch.no_grad():
        print(f"max |Δlogits| at init: {(peft_model(**batches[0]).logits - before).abs().max():.1e}")


if __name__ == "__main__":
    main()
