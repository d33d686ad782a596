"""Tiny random models of the three supported families, and calibration batches for them."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# The one factory of tiny random-weight models (every test builds its models here): per family, the config
# class, the default model class and the default sizes; any config field can be overridden per call.
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=64)),
    "bert": ("BertConfig", "BertForSequenceClassification", dict(hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=64,
                                                                 max_position_embeddings=64, num_labels=3)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def tiny_model(family="llama", *, model_class=None, dtype=torch.float32, seed=0, **config):
    """A tiny random-weight model of `family`, in eval mode, the same weights for the same arguments.

    `model_class` names another transformers class for the same config (e.g. "BertModel", without a head);
    `config` overrides the family's defaults (e.g. vocab_size=len(tokenizer), pad_token_id=...)."""
    import transformers

    config_cls, default_cls, sizes = TINY_FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{"vocab_size": VOCAB, **sizes, **config})
    torch.manual_seed(seed)
    return getattr(transformers, model_class or default_cls)(cfg).to(dtype).eval()


def tiny_llama(dtype=torch.float32):
    return tiny_model("llama", dtype=dtype)


def tiny_bert():
    return tiny_model("bert")


def tiny_gpt2():
    return tiny_model("gpt2")


def tiny_tokenizer():
    """A character-level fast tokenizer built in memory (no hub), ids < VOCAB: <pad>=0, </s>=1, <unk>=2."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.ascii_letters + string.digits + " .,!?'-:;":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


MODELS = {
    "llama": (tiny_llama, LLAMA_TARGETS, {}),
    "bert": (tiny_bert, BERT_TARGETS, {}),
    "gpt2": (tiny_gpt2, GPT2_TARGETS, {"fan_in_fan_out": True}),
}


def make_batches(n_batches=4, batch_size=4, length=20, seed=1, pad_rows=True):
    """Batches with right padding on some rows, so padding handling is always exercised."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, length), generator=g)
        mask = torch.ones_like(ids)
        if pad_rows:
            for row in range(1, batch_size, 2):
                cut = int(torch.randint(length // 2, length, (1,), generator=g))
                mask[row, cut:] = 0
                ids[row, cut:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def lora_config(family, r=4, alpha=8, **kw):
    from peft import LoraConfig

    _, targets, extra = MODELS[family]
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **{**extra, **kw})


def peft_model(family, r=4, alpha=8, **kw):
    from peft import get_peft_model

    factory = MODELS[family][0]
    return get_peft_model(factory(), lora_config(family, r, alpha, **kw))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin-waiting, ~10x faster here. Modules
    that train use it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun(script, *args, nproc: int = 2, timeout: int = 240, env=None):
    """Run `script` under `python -m torch.distributed.run --standalone` with `nproc` CPU processes (one thread
    each, tests/ and the repository on PYTHONPATH, `env` added); assert it succeeded and return the result."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
                "PYTHONPATH": os.pathsep.join([str(root / "tests"), str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done
