"""Calibration batches from the collators and data sets people train with give the statistics of the bare rows.

The reference is always the same rows run one per batch, unpadded, as plain dicts; the model is float64 so
"the same statistics" can be checked to 1e-12 (padding changes GEMM shapes, so bit equality is not expected).
"""

import runpy
from collections import UserDict
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, lora_config, tiny_llama

from astra_peft import AstraConfig, calibration_batches, collect_activation_stats, initialize_astra_weights

CFG = AstraConfig(show_progress=False, accumulation_dtype="float64")
WORDS = [f"w{i}" for i in range(VOCAB - 6)]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "calibration_data.py"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer(padding_side="right", pad=True):
    """A word-level fast tokenizer built in memory (no hub): ids 0-3 are special, then one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = dict(pad_token="<pad>") if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   padding_side=padding_side, **specials)


def make_texts(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in lengths]


@pytest.fixture(scope="module")
def setup():
    """(model, tokenizer, texts, tokenised rows, reference statistics of the rows one at a time)."""
    tok = make_tokenizer()
    texts = make_texts()
    rows = [{"input_ids": tok(t)["input_ids"]} for t in texts]
    model = tiny_llama(torch.float64)
    reference = collect_activation_stats(model, [{"input_ids": torch.tensor([r["input_ids"]])} for r in rows],
                                         lora_config("llama"), CFG)
    assert reference.accumulators[0].tokens == sum(len(r["input_ids"]) for r in rows)
    return model, tok, texts, rows, reference


def assert_same_stats(stats, reference):
    assert len(stats.accumulators) == len(reference.accumulators)
    for got, want in zip(stats.accumulators, reference.accumulators):
        assert got.tokens == want.tokens
        assert torch.allclose(got.sum, want.sum, rtol=1e-12, atol=0)
        err = ((got.gram - want.gram).abs().max() / want.gram.abs().max()).item()
        assert err <= 1e-12, err


def _collators(tok):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TrlCollator

    return {
        "with_padding": DataCollatorWithPadding(tok),
        "language_modeling": DataCollatorForLanguageModeling(tok, mlm=False),
        "seq2seq": DataCollatorForSeq2Seq(tok),
        "trl": TrlCollator(pad_token_id=tok.pad_token_id),
    }


@pytest.mark.parametrize("name", ["with_padding", "language_modeling", "seq2seq", "trl"])
def test_collated_batches_give_the_statistics_of_unpadded_rows(setup, name):
    from torch.utils.data import DataLoader

    model, tok, _, rows, reference = setup
    loader = DataLoader(rows, batch_size=8, collate_fn=_collators(tok)[name])
    batches = list(loader)
    assert sum(int((b["attention_mask"] == 0).sum()) for b in batches) > 100  # padding is really there
    stats = collect_activation_stats(model, batches, lora_config("llama"), CFG)
    assert_same_stats(stats, reference)
    # and exactly what the same tensors give as a plain dict (transformers' collators return a BatchEncoding)
    plain = collect_activation_stats(model, [dict(b) for b in batches], lora_config("llama"), CFG)
    for got, want in zip(stats.accumulators, plain.accumulators):
        assert got.tokens == want.tokens and torch.equal(got.gram, want.gram) and torch.equal(got.sum, want.sum)


def test_any_mapping_is_read_as_a_batch(setup):
    model, _, _, rows, reference = setup
    padded = list(calibration_batches(rows, batch_size=8))
    stats = collect_activation_stats(model, [UserDict(b) for b in padded], lora_config("llama"), CFG)
    assert_same_stats(stats, reference)


@pytest.mark.parametrize("kind", ["dataset_tokenised", "dataset_text", "dataset_torch_format", "list_of_strings",
                                  "list_of_dicts", "tokenised_without_tokenizer"])
def test_calibration_batches_give_the_statistics_of_unpadded_rows(setup, kind):
    from datasets import Dataset

    model, tok, texts, rows, reference = setup
    data, tokenizer = {
        "dataset_tokenised": (Dataset.from_list(rows), tok),
        "dataset_text": (Dataset.from_dict({"text": texts, "label": list(range(len(texts)))}), tok),
        "dataset_torch_format": (Dataset.from_list(rows).with_format("torch"), tok),
        "list_of_strings": (texts, tok),
        "list_of_dicts": ([{"text": t} for t in texts], tok),
        "tokenised_without_tokenizer": (rows, None),
    }[kind]
    batches = calibration_batches(data, tokenizer, batch_size=8)
    assert len(batches) == 3
    first = next(iter(batches))
    assert set(first) == {"input_ids", "attention_mask"} and first["input_ids"].shape[0] == 8
    assert_same_stats(collect_activation_stats(model, batches, lora_config("llama"), CFG), reference)


def test_calibration_batches_cap_truncate_and_pad_on_the_right(setup):
    _, tok, texts, rows, _ = setup
    left = make_tokenizer(padding_side="left")
    batches = list(calibration_batches(texts, left, batch_size=4, max_samples=6, max_length=10))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert left.padding_side == "left"  # the caller's tokenizer is not changed
    kept = [ids[m.bool()].tolist() for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"])]
    assert kept == [r["input_ids"][:10] for r in rows[:6]]
    for b in batches:  # right padding: every row's mask is ones then zeros
        m = b["attention_mask"]
        assert torch.equal(m, m.sort(dim=1, descending=True, stable=True).values)
        assert int(m.sum(1).max()) == m.shape[1]


def test_calibration_batches_seed_draws_a_fixed_random_subset(setup):
    _, tok, texts, _, _ = setup

    def drawn(seed):
        return [t for b in calibration_batches(texts, tok, batch_size=5, max_samples=5, seed=seed)
                for t in tok.batch_decode(b["input_ids"], skip_special_tokens=True)]

    a, b = drawn(3), drawn(3)
    assert a == b and len(a) == 5 and set(a) <= set(texts) and a != texts[:5] and drawn(4) != a


def test_calibration_batches_drop_other_columns_and_keep_a_given_mask(setup):
    model, tok, texts, rows, reference = setup
    # rows padded ahead of time to a fixed length, with labels: padding stays masked, labels are not passed on
    fixed = tok(texts, padding="max_length", max_length=32)
    data = [{"input_ids": i, "attention_mask": m, "labels": i} for i, m in zip(fixed["input_ids"], fixed["attention_mask"])]
    batches = calibration_batches(data, tok, batch_size=8)
    assert set(next(iter(batches))) == {"input_ids", "attention_mask"}
    assert_same_stats(collect_activation_stats(model, batches, lora_config("llama"), CFG), reference)


def test_calibration_batches_initialise_a_model(setup):
    from peft import get_peft_model

    _, tok, texts, _, _ = setup
    model = get_peft_model(tiny_llama(), lora_config("llama"))
    batch = tok(texts[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
    report = initialize_astra_weights(model, calibration_batches(texts, tok, batch_size=4), CFG)
    assert len(report.layers) == 14
    with torch.no_grad():
        assert (model(**batch).logits - before).abs().max() <= 1e-4


@pytest.mark.parametrize("data, tokenizer, match", [
    (["some text"], None, r"row 0 is raw text; pass `tokenizer=`"),
    ([{"text": "w1 w2"}], None, r"row 0 is raw text"),
    ([], "tok", r"no rows"),
    ([{"question": "w1"}], "tok", r"row 0 is a mapping with keys \['question'\]: expected .*'input_ids'.*'text'"),
    ([["w1", "w2"]], "tok", r"row 0 is of type list"),
    ([{"input_ids": [1, 2]}, 7], "tok", r"row 1 is of type int"),
    ([{"input_ids": [[1, 2], [3, 4]]}], "tok", r"row 0: 'input_ids' must be one sequence"),
    ({"train": ["w1"]}, "tok", r"DatasetDict.*data\['train'\]"),
    ("w1 w2", "tok", r"`data` is a str"),
])
def test_calibration_batches_errors(data, tokenizer, match):
    with pytest.raises((TypeError, ValueError), match=match):
        calibration_batches(data, make_tokenizer() if tokenizer == "tok" else tokenizer)


def test_calibration_batches_need_a_pad_token():
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        calibration_batches(["w1 w2"], make_tokenizer(pad=False))


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(max_samples=0), dict(max_length=-1), dict(seed=1)])
def test_calibration_batches_bad_arguments(bad):
    data = (t for t in ["w1", "w2"])  # a generator: no len(), so `seed` cannot draw from it
    with pytest.raises(ValueError, match="positive integer" if "seed" not in bad else "needs data with len"):
        calibration_batches(data, make_tokenizer(), **bad)


@pytest.mark.parametrize("key", ["input_ids", "attention_mask"])
def test_one_dimensional_batch_is_refused(setup, key):
    model = setup[0]
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    batch[key] = batch[key][0]
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(4,\); expected \(batch, seq_len\)"):
        collect_activation_stats(model, [batch], lora_config("llama"), CFG)


def test_dataset_passed_as_the_dataloader_says_what_to_do(setup):
    from datasets import Dataset

    model, _, _, rows, _ = setup
    with pytest.raises(TypeError, match=r"'input_ids' is a list.*calibration_batches"):
        collect_activation_stats(model, Dataset.from_list(rows), lora_config("llama"), CFG)
    with pytest.raises(ValueError, match=r"'input_ids' has shape \(\d+,\); expected \(batch, seq_len\)"):
        collect_activation_stats(model, Dataset.from_list(rows).with_format("torch"), lora_config("llama"), CFG)
    with pytest.raises(TypeError, match=r"batch is a str.*calibration_batches"):
        collect_activation_stats(model, ["w1 w2 w3"], lora_config("llama"), CFG)


def test_packed_padding_free_batches_are_refused(setup):
    # TRL's padding_free batches put all rows in one; with SDPA they would attend to each other (measured:
    # Grams off by up to 80 %), so they are refused rather than silently mixed.
    from transformers import DataCollatorWithFlattening
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TrlCollator

    model, tok, _, rows, _ = setup
    for collate in (TrlCollator(pad_token_id=tok.pad_token_id, padding_free=True), DataCollatorWithFlattening()):
        batch = collate(rows[:4])
        with pytest.raises(ValueError, match=r"packed.*padding_free=False"):
            collect_activation_stats(model, [batch], lora_config("llama"), CFG)


def test_example_runs(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "same statistics as unpadded rows: True" in out


def test_data_module_never_imports_datasets():
    # `datasets` is an optional extra: a Dataset is read by duck typing (len, indexing, iteration of row dicts).
    import ast

    import astra_peft.data as data

    tree = ast.parse(Path(data.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and not {m for m in imported if m.split(".")[0] in ("datasets", "trl")}


def test_calibration_batches_put_tensors_on_the_device():
    batch = next(iter(calibration_batches(["w1 w2", "w3"], make_tokenizer(), device="meta")))
    assert {v.device.type for v in batch.values()} == {"meta"}
