"""Astra on an FSDP2 model (`torch.distributed.fsdp.fully_shard`), before sharding or after it.

Runs offline on CPU in seconds (a tiny random LLaMA, two processes, gloo):

    torchrun --nproc_per_node 2 examples/fsdp2.py [OUT_DIR]

Every rank calls `initialize_astra_weights` on its own share of the calibration data; the statistics are summed
over ranks, so every rank writes the same A, B and residual as one process with all the data would.

- Before sharding: initialise the PeftModel, then `fully_shard` it and build the optimizer.
- After sharding: the weights are DTensors; Astra reads each layer whole (`full_tensor()`) and writes A, B and
  the residual back with `distribute_tensor` to the same mesh and placements. FSDP2's optimizer steps on those
  very DTensors, so training starts from Astra's values.

FSDP1 (`FullyShardedDataParallel`, flat parameters) is refused with an error naming the module: initialise
before wrapping, or use FSDP2.
"""

import sys
from functools import partial

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from astra_peft import AstraConfig, initialize_astra_weights, save_as_lora
from astra_peft.sharding import adapter_state_dict

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # intermediate_size 65: gate/up's 65 rows split 33 + 32 over two ranks, so uneven shards are exercised too
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=65, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)


def astra_config() -> AstraConfig:
    return AstraConfig(accumulation_dtype="float64", show_progress=False)


def calibration_batches(n_batches: int = 4, batch_size: int = 4, length: int = 20) -> list[dict]:
    """Random token batches, odd rows right-padded (what a padding collator gives)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, 96, (batch_size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1::2, length // 2 :] = 0
        batches.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return batches


def shard(model, per_layer: bool = True):
    if per_layer:
        for layer in model.base_model.model.model.layers:  # each decoder layer its own FSDP unit, then the root
            fully_shard(layer)
    fully_shard(model)
    return model


def astra_before_sharding(my_batches: list[dict]):
    model = get_peft_model(tiny_llama(), lora_config())
    initialize_astra_weights(model, my_batches, astra_config())
    return shard(model)


def astra_after_sharding(my_batches: list[dict], per_layer: bool = True):
    model = shard(get_peft_model(tiny_llama(), lora_config()), per_layer)
    initialize_astra_weights(model, my_batches, astra_config())
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every LoRA A/B and target base weight, whole, by name (a collective: every rank calls it)."""
    model.reshard()  # read the shards themselves: after a forward the root unit holds unsharded copies
    keep = ("lora_A", "lora_B", "base_layer")
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if any(k in n for k in keep)}


def train_step(model, optimizer, batch: dict) -> float:
    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return loss.item()


def main(out_dir=None) -> dict:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = calibration_batches()
    results = {}
    routes = {
        "before_sharding": astra_before_sharding,
        "after_sharding": astra_after_sharding,
        # one FSDP unit: every target layer is in the root, which a forward leaves unsharded
        "after_sharding_root_only": partial(astra_after_sharding, per_layer=False),
    }
    for route, build in routes.items():
        model = build(batches[rank::world])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
        at_init = snapshot(model)
        # The initial adapter (e.g. for save_as_lora later): whole tensors, not this rank's DTensor shards.
        initial = adapter_state_dict(model)
        if rank == 0 and out_dir:
            model.save_pretrained(f"{out_dir}/{route}_initial_adapter", state_dict=initial)
        with torch.no_grad():
            logits = model(**batches[0]).logits
        train_step(model, optimizer, batches[rank])
        after_step = snapshot(model)
        if out_dir:  # the trained adapter as a plain LoRA of the ORIGINAL base (every rank calls it; rank 0 writes)
            save_as_lora(model, f"{out_dir}/{route}_lora", f"{out_dir}/{route}_initial_adapter")
            with torch.no_grad():
                trained_logits = model(**batches[0]).logits
        b_moved = max((after_step[n] - at_init[n]).abs().max().item() for n in at_init if "lora_B" in n)
        if rank == 0:
            print(f"{route}: max |B after one step - B at init| = {b_moved:.2e} (lr {LR})")
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        results[route] = {"init": at_init, "step": after_step, "logits": logits, "trainable": trainable}
        if out_dir:
            results[route]["trained_logits"] = trained_logits
    if rank == 0 and out_dir:
        torch.save(results, f"{out_dir}/fsdp2.pt")
    dist.barrier()
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
