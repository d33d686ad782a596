"""Astra on a DeepSpeed ZeRO-3 model: before `deepspeed.initialize`, with the HF Trainer, and after the engine exists.

Runs offline on CPU in well under a minute (a tiny random LLaMA, two processes, gloo):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_zero3.py [OUT_DIR]

Every rank calls `initialize_astra_weights` on its own share of the calibration data; the statistics are summed
over ranks, so every rank writes the same A, B and residual as one process with all the data would.

1. Before the engine (recommended): with `HfDeepSpeedConfig` alive, `from_pretrained` loads the model already
   partitioned; Astra gathers one layer at a time to calibrate and write; then `deepspeed.initialize` builds the
   optimizer from the initialised weights. A model built under `deepspeed.zero.Init` works the same way.
2. With the HF Trainer (`astra_with_trainer`): make `TrainingArguments(deepspeed=...)` first (it keeps the
   HfDeepSpeedConfig alive), load and wrap the model, call `initialize_astra_weights`, then build the Trainer and
   `trainer.train()`. (`astra_peft.integrations.initialize_astra_for_trainer` refuses ZeRO-3 models for now.)
3. After `deepspeed.initialize`: pass the engine (or `engine.module`). Astra also writes A and B into the
   optimizer's fp32 master partitions (ZeRO-3, and ZeRO-1/2's); without that, the first `engine.step()` would
   copy PEFT's default A/B back over them. Should a master not take the values, Astra raises rather than
   train from them.

To save the initial adapter (for `save_as_lora` after training), gather it first:
`model.save_pretrained(folder, state_dict=astra_peft.sharding.adapter_state_dict(model))`; PEFT's own
`save_pretrained` writes ZeRO-3's empty placeholders after `deepspeed.initialize`, without an error.

Do not wrap the call in `deepspeed.zero.GatheredParameters`: Astra gathers what it needs itself, and refuses to
write inside an outer gather (leaving it would discard the new weights).
"""

import sys
import tempfile
from functools import partial

import deepspeed
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from astra_peft import AstraConfig, initialize_astra_weights
from astra_peft.sharding import adapter_state_dict

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def ds_config(stage: int = 3, persistence_threshold: int = 0) -> dict:
    # persistence threshold 0: even this tiny model's parameters are partitioned, as a large model's are.
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
    }


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
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


def load_partitioned():
    """`from_pretrained` while a ZeRO-3 `HfDeepSpeedConfig` is alive: the model arrives partitioned over the ranks."""
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = [scratch]
        dist.broadcast_object_list(checkpoint, src=0)  # one folder, rank 0's, stands in for a hub checkpoint
        if dist.get_rank() == 0:
            tiny_llama().save_pretrained(checkpoint[0])
        dist.barrier()
        base = AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32)
        dist.barrier()  # every rank has read it before rank 0's folder goes
    assert all(hasattr(p, "ds_id") for p in base.parameters())  # loaded partitioned: ZeRO-3 parameters
    return base


def astra_before_engine(config: dict, my_batches: list[dict]):
    hf_deepspeed = HfDeepSpeedConfig(config)  # keep it alive until the engine exists, as the Trainer does
    model = get_peft_model(load_partitioned(), lora_config())
    initialize_astra_weights(model, my_batches, astra_config())  # before deepspeed.initialize / trainer.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    del hf_deepspeed
    return engine


def astra_after_engine(config: dict, my_batches: list[dict], pass_engine: bool = False):
    model = get_peft_model(tiny_llama(), lora_config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    initialize_astra_weights(engine if pass_engine else engine.module, my_batches, astra_config())
    return engine


def astra_with_trainer(my_batches: list[dict], train_rows: list[dict], out_dir: str):
    """The Trainer route: Astra after the model is built, before `trainer.train()` creates the engine."""
    from transformers import Trainer, TrainingArguments

    # TrainingArguments first: with a ZeRO-3 `deepspeed` config it keeps an HfDeepSpeedConfig alive, so the
    # model loads partitioned ("auto" values are filled in from these arguments).
    config = {**ds_config(), "train_micro_batch_size_per_gpu": "auto", "optimizer": None}
    config = {k: v for k, v in config.items() if v is not None}  # the Trainer builds its own AdamW
    args = TrainingArguments(output_dir=out_dir, deepspeed=config, per_device_train_batch_size=2, max_steps=1,
                             learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", use_cpu=True,
                             report_to=[], save_strategy="no")
    model = get_peft_model(load_partitioned(), lora_config())
    initialize_astra_weights(model, my_batches, astra_config())
    at_init = snapshot(model)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows)
    trainer.train()
    return at_init, snapshot(trainer.model_wrapped.module)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every LoRA A/B and target base weight, whole (gathered), by name."""
    keep = ("lora_A", "lora_B", "base_layer")
    named = [(n, p) for n, p in model.named_parameters() if any(k in n for k in keep)]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().clone() for n, p in named}


def train_step(engine, batch: dict) -> float:
    engine.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = engine(**batch, labels=labels).loss
    engine.backward(loss)
    engine.step()
    engine.eval()
    return loss.item()


def main(out_dir=None) -> dict:
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = calibration_batches()
    results = {}
    routes = {
        "before_engine": (astra_before_engine, ds_config()),
        "after_engine": (astra_after_engine, ds_config()),
        # the engine itself passed, its small parameters kept whole ("persistent"); and ZeRO-2's fp32 masters
        "after_engine_persistent": (
            partial(astra_after_engine, pass_engine=True), ds_config(persistence_threshold=10**6)
        ),
        "after_engine_zero2": (astra_after_engine, ds_config(stage=2)),
    }
    for route, (build, config) in routes.items():
        engine = build(config, batches[rank::world])
        at_init = snapshot(engine.module)
        # The initial adapter (e.g. for save_as_lora later): PEFT's own save_pretrained would write ZeRO-3's empty
        # placeholders, so gather it first (every rank), and let one rank write it.
        initial = adapter_state_dict(engine)
        if rank == 0 and out_dir:
            engine.module.save_pretrained(f"{out_dir}/{route}_initial_adapter", state_dict=initial)
        with torch.no_grad():
            logits = engine.module(**batches[0]).logits
        train_step(engine, batches[rank])
        after_step = snapshot(engine.module)
        b_moved = max((after_step[n] - at_init[n]).abs().max().item() for n in at_init if "lora_B" in n)
        if rank == 0:
            print(f"{route}: max |B after one step - B at init| = {b_moved:.2e} (lr {LR})")
        results[route] = {"init": at_init, "step": after_step, "logits": logits}
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            for batch in batches for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    with tempfile.TemporaryDirectory() as scratch:
        at_init, after_step = astra_with_trainer(batches[rank::world], rows, out_dir or scratch)
    results["trainer"] = {"init": at_init, "step": after_step}
    b_moved = max((after_step[n] - at_init[n]).abs().max().item() for n in at_init if "lora_B" in n)
    if rank == 0:
        print(f"trainer: max |B after one step - B at init| = {b_moved:.2e} (lr {LR})")
    if rank == 0 and out_dir:
        torch.save(results, f"{out_dir}/zero3.pt")
    dist.barrier()
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
