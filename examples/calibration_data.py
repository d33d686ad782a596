"""Calibrate Astra on a `datasets.Dataset` of raw text with `calibration_batches`.

Runs offline in seconds: a tiny random LLaMA and a word-level tokenizer built in memory stand in for a real
checkpoint (with one, use `AutoModelForCausalLM.from_pretrained(...)` and `AutoTokenizer.from_pretrained(...)`).

    python examples/calibration_data.py
"""

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from astra_peft import AstraConfig, calibration_batches, collect_activation_stats, initialize_astra_weights


def tiny_model_and_tokenizer():
    words = "the a cat dog sat ran on under mat log and then slept barked".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    tokenizer.pad_token = tokenizer.eos_token  # a tokenizer without a pad token needs one for batching
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval(), tokenizer


def main():
    model, tokenizer = tiny_model_and_tokenizer()
    dataset = Dataset.from_dict({"text": [
        "the cat sat on the mat", "a dog ran", "the dog sat under the log and then slept",
        "a cat ran on the log", "the dog barked", "a cat sat on a dog and the dog barked then ran",
    ] * 4})

    # Tokenise, cap at 16 rows, truncate to 32 tokens, pad on the right with an attention_mask.
    batches = calibration_batches(dataset, tokenizer, batch_size=4, max_samples=16, max_length=32)
    first = next(iter(batches))
    print(f"{len(batches)} batches; first: input_ids {tuple(first['input_ids'].shape)}, "
          f"{int((first['attention_mask'] == 0).sum())} padding positions (masked out of the statistics)")

    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    # Padding never enters the statistics: the same 16 rows one at a time, unpadded, give the same token count.
    padded = collect_activation_stats(model, batches, lora_config, AstraConfig(show_progress=False))
    one_by_one = [{"input_ids": torch.tensor([tokenizer(t)["input_ids"]])} for t in dataset["text"][:16]]
    alone = collect_activation_stats(model, one_by_one, lora_config, AstraConfig(show_progress=False))
    same = all(a.tokens == b.tokens and torch.allclose(a.gram, b.gram, rtol=1e-4, atol=1e-5)
               for a, b in zip(padded.accumulators, alone.accumulators))
    print(f"tokens counted: {padded.accumulators[0].tokens}; same statistics as unpadded rows: {same}")

    peft_model = get_peft_model(model, lora_config)
    report = initialize_astra_weights(peft_model, batches, AstraConfig(show_progress=False))
    print(f"Astra initialised {len(report.layers)} layers")


if __name__ == "__main__":
    main()
