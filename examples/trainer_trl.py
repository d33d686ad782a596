"""Astra with TRL's SFTTrainer (the same call works with transformers' Trainer), offline, in seconds on a CPU.

    python examples/trainer_trl.py --output /tmp/astra-sft

1. Build the trainer as usual (here with `peft_config`, so SFTTrainer makes the PeftModel).
2. `initialize_astra_for_trainer(trainer, ...)`: calibrates on the trainer's own training batches, initialises,
   saves the initial adapter to <output>/astra_init and installs the callback that keeps every checkpoint and
   `save_model()` loadable on the ORIGINAL base model.
3. `trainer.train()`, `trainer.save_model(...)`: the saved folder is a plain LoRA of the original base.
4. Resume a killed run: build the trainer again, pass the same `resume_from_checkpoint` to both calls.

The model and tokenizer are tiny random stand-ins built in memory; use your own
`AutoModelForCausalLM.from_pretrained(...)` and tokenizer in practice.
"""

import argparse
import string

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from astra_peft import AstraConfig
from astra_peft.integrations import initialize_astra_for_trainer


def tiny_model():
    torch.manual_seed(0)  # the same "pretrained" weights every time it is built
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.ascii_letters + string.digits + " .,!?'-:;":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_trainer(output, max_steps):
    texts = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'}." * (1 + i % 3) for i in range(40)]
    args = SFTConfig(output_dir=output, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
                     save_steps=3, logging_strategy="no", report_to=[], use_cpu=True, bf16=False, max_length=64,
                     disable_tqdm=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"])
    return SFTTrainer(model=tiny_model(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                      processing_class=tiny_tokenizer(), peft_config=lora)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="Folder for the run (checkpoints, astra_init, final/).")
    out = parser.parse_args().output
    batch = dict(tiny_tokenizer()(["the number 7 is odd.", "the number 12 is even."], padding=True,
                                  return_tensors="pt"))

    trainer = make_trainer(f"{out}/run", max_steps=6)
    report = initialize_astra_for_trainer(trainer, AstraConfig(show_progress=False), num_batches=8)
    print(report.summary())
    trainer.train()
    trainer.save_model(f"{out}/final")
    trained = logits(trainer.model, batch)

    reloaded = PeftModel.from_pretrained(tiny_model(), f"{out}/final")  # the untouched original base
    print(f"reloaded on the original base: max |Δlogits| = {(logits(reloaded, batch) - trained).abs().max():.2e}")

    # Resume from checkpoint-3 in a new trainer, as after a crash: the initialisation is restored, not redone.
    resumed = make_trainer(f"{out}/run", max_steps=6)
    initialize_astra_for_trainer(resumed, resume_from_checkpoint=f"{out}/run/checkpoint-3")
    resumed.train(resume_from_checkpoint=f"{out}/run/checkpoint-3")
    print(f"resumed from checkpoint-3: max |Δlogits| vs the uninterrupted run = "
          f"{(logits(resumed.model, batch) - trained).abs().max():.2e}")


if __name__ == "__main__":
    main()
