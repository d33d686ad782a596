"""The harness end to end on tiny random models saved to disk and tiny JSONL tasks: fast, no network."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("is the a cat dog red blue big small one two three four five six more than less Question Answer "
         "yes no good bad movie film great awful fun dull plot acting loved hated").split()


# ------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + ["?", ":", ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_tiny_llama(path: Path) -> Path:
    from conftest import tiny_model

    tok = _tokenizer(path)
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id).save_pretrained(path)
    return path


def make_tiny_bert(path: Path) -> Path:
    from conftest import tiny_model

    tok = _tokenizer(path)
    # no head: the harness loads it for classification and draws a fresh one, as for a real checkpoint
    tiny_model("bert", model_class="BertModel", vocab_size=len(tok), max_position_embeddings=128, num_labels=2,
               pad_token_id=tok.pad_token_id).save_pretrained(path)
    return path


def make_generation_jsonl(path: Path, n: int = 60) -> Path:
    rng = random.Random(0)
    numbers = ["one", "two", "three", "four", "five", "six"]
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.sample(range(6), 2)
            answer = 0 if a > b else 1
            row = {"prompt": f"Question: is {numbers[a]} more than {numbers[b]} ?\nAnswer:",
                   "completion": [" yes", " no"][answer], "choices": [" yes", " no"], "answer": answer}
            fh.write(json.dumps(row) + "\n")
    return path


def make_classification_jsonl(path: Path, n: int = 60, words: int = 4) -> Path:
    rng = random.Random(1)
    good, bad = ["great", "fun", "loved", "good"], ["awful", "dull", "hated", "bad"]
    with open(path, "w") as fh:
        for _ in range(n):
            label = rng.randrange(2)
            half = words // 2
            text = rng.choices(good if label else bad, k=half) + rng.choices(["movie", "film", "plot", "acting"],
                                                                             k=words - half)
            rng.shuffle(text)
            fh.write(json.dumps({"text": " ".join(text), "label": ["negative", "positive"][label]}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": str(make_tiny_llama(root / "llama")),
        "bert": str(make_tiny_bert(root / "bert")),
        "gen": str(make_generation_jsonl(root / "gen.jsonl")),
        "cls": str(make_classification_jsonl(root / "cls.jsonl")),
    }


def finetune(tiny, out, method="lora", model="llama", data="gen", **kw):
    from astra_peft.harness.training import FinetuneConfig, run_finetune

    settings = dict(model=tiny[model], data=tiny[data], method=method, output=str(out), max_steps=6,
                    batch_size=4, lr=5e-3, rank=4, alpha=8, calibration_samples=32, progress=False, save_steps=3)
    settings.update(kw)
    callbacks = settings.pop("callbacks", ())
    force = settings.pop("force", False)
    return run_finetune(FinetuneConfig(**settings), callbacks=callbacks, force=force)


# --------------------------------------------------------------------------------------------- methods


def test_method_specs_parse_and_name_runs():
    from astra_peft.harness.specs import parse_method_list, parse_method_spec

    spec = parse_method_spec("astra:eigen_selection=largest:lr=2e-4:calibration_samples=16")
    assert spec.method == "astra" and spec.options == {"eigen_selection": "largest"}
    assert spec.overrides == {"lr": 2e-4} and spec.calibration == {"calibration_samples": 16}
    assert spec.slug == "astra-eigen_selection=largest-lr=2e-4-calibration_samples=16"
    assert parse_method_spec("corda:corda_method=kpm").options == {"corda_method": "kpm"}
    assert [s.name for s in parse_method_list("astra, lora,dora:lr=1e-3")] == ["astra", "lora", "dora:lr=1e-3"]
    for bad, needle in [("astro", "unknown method"), ("astra:eigen_selection=biggest", "choose one of"),
                        ("lora:eigen_selection=largest", "has no option"), ("astra:lr", "KEY=VALUE"),
                        ("lora:calibration_samples=3", "has no option")]:
        with pytest.raises(ValueError, match=needle):
            parse_method_spec(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_method_list("lora,lora")
    # flags fill what the spec leaves open and never override it
    assert parse_method_spec("astra").with_defaults(statistic="second_moment").name == "astra:statistic=second_moment"
    kept = parse_method_spec("astra:statistic=covariance").with_defaults(statistic="second_moment")
    assert kept.options["statistic"] == "covariance"
    assert parse_method_spec("lora").with_defaults(eigen_selection="largest").name == "lora"


@pytest.mark.parametrize("method", ["milora", "pissa", "olora"])
def test_weight_driven_inits_keep_outputs(method):
    """MiLoRA (ours) and PEFT's PiSSA/OLoRA: W ← W − s·BA makes the adapted model start where the base was."""
    from conftest import tiny_model

    from astra_peft.harness.methods import BuildContext, build_method
    from astra_peft.harness.specs import parse_method_spec

    model = tiny_model("llama", vocab_size=50)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    original = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    ctx = BuildContext(model=model, task_kind="generation", target_modules=["q_proj", "v_proj", "up_proj"],
                       rank=4, alpha=8)
    built = build_method(parse_method_spec(method), ctx)
    assert built.mutates_base
    with torch.no_grad():
        out = built.model(input_ids=ids).logits
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    if method == "milora":
        layer = built.model.base_model.model.model.layers[0].mlp.up_proj
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        singular = torch.linalg.svdvals(original)
        # the adapter holds exactly the r smallest singular values of W
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], singular[-4:], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------- finetune


@pytest.mark.parametrize("method", ["astra", "lora", "pissa", "dora"])
def test_finetune_generation_run_directory(tiny, tmp_path, method):
    summary = finetune(tiny, tmp_path / method, method=method, eval_steps=3)
    run = tmp_path / method
    for name in ("config.json", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()  # finished: nothing to resume
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all("learning_rate" in r for r in steps)
    assert any("dev_accuracy" in r for r in records) and any("final_test_accuracy" in r for r in records)
    assert set(summary["seconds"]) == {"calibration", "initialization", "training", "evaluation"}
    assert summary["trainable_parameters"] > 0 and summary["steps"] == 6
    assert {"dev", "test"} <= set(summary["final"]) and 0 <= summary["accuracy"] <= 1
    if method in ("astra", "pissa"):  # base rewritten: a plain LoRA of rank 2r for the original base is saved
        cfg = json.loads((run / "adapter_lora" / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    if method == "astra":
        assert summary["seconds"]["calibration"] > 0
        config = json.loads((run / "config.json").read_text())
        assert config["method_spec"]["method"] == "astra" and config["splits"]["train"]["size"] > 0


def test_converted_adapter_reproduces_the_finetuned_model(tiny, tmp_path):
    """adapter_lora on the ORIGINAL base scores the dev split exactly as the fine-tuned model did (PEFT's
    conversion of the rewritten-base adapter to a rank-2r plain LoRA)."""
    from peft import PeftModel

    from astra_peft.harness.evaluation import evaluate
    from astra_peft.harness.models import load_model
    from astra_peft.harness.tasks import load_jsonl_task

    summary = finetune(tiny, tmp_path / "run", method="astra", max_steps=3)
    model, tok = load_model(tiny["llama"], task_kind="generation")
    task = load_jsonl_task(tiny["gen"])
    base_loss = evaluate(model, tok, task, "dev", progress=False)["loss"]
    tuned = PeftModel.from_pretrained(model, str(tmp_path / "run" / "adapter_lora"))
    metrics = evaluate(tuned, tok, task, "dev", progress=False)
    assert metrics["loss"] == pytest.approx(summary["final"]["dev"]["loss"], rel=1e-4)
    assert metrics["loss"] != pytest.approx(base_loss, rel=1e-4)  # and training did move it


@pytest.mark.parametrize("method", ["lora", "astra", "full"])
def test_finetune_classification(tiny, tmp_path, method):
    summary = finetune(tiny, tmp_path / method, method=method, model="bert", data="cls")
    assert 0 <= summary["accuracy"] <= 1
    if method == "full":
        assert (tmp_path / method / "model" / "config.json").is_file()
        assert summary["trainable_parameters"] == summary["total_parameters"]
    else:  # the classification head is trained with the adapter
        assert summary["trainable_parameters"] < summary["total_parameters"]
        saved = (tmp_path / method / "adapter" / "adapter_model.safetensors")
        from safetensors import safe_open

        with safe_open(str(saved), "pt") as fh:
            assert any("classifier" in k for k in fh.keys())
        if method == "astra":  # the plain-LoRA conversion carries the trained head too
            with safe_open(str(tmp_path / method / "adapter_lora" / "adapter_model.safetensors"), "pt") as fh:
                assert any("classifier" in k for k in fh.keys())
    # the fine-tuned model is rebuilt from what was saved, for every kind of run (a LoRA run keeps adapter_init
    # for restarts, yet its adapter needs no residual base)
    from astra_peft.harness.run_analysis import analyze_run

    before, after = analyze_run(tmp_path / method, samples=8, progress=False)
    assert before and before.keys() == after.keys()


@pytest.mark.parametrize("method", ["eva", "corda", "corda:corda_method=kpm", "lora-ga", "rslora", "milora",
                                    "olora"])
def test_every_other_method_trains(tiny, tmp_path, method):
    """Each method trains (the adapter moves away from its initialisation), and the model it started from, rebuilt
    from the saved initial adapter as the method declares (methods.BaseRebuild), gives the base model's outputs:
    every method here promises unchanged outputs at init (B₀ = 0, or W ← W − s·B₀A₀)."""
    from safetensors.torch import load_file

    from astra_peft.harness.methods import METHODS
    from astra_peft.harness.restore import restore_initial_adapter
    from astra_peft.harness.models import load_model

    summary = finetune(tiny, tmp_path / "run", method=method, max_steps=2, save_steps=0)
    assert summary["steps"] == 2 and summary["method"] == method
    run = tmp_path / "run"
    init, trained = (load_file(str(run / d / "adapter_model.safetensors")) for d in ("adapter_init", "adapter"))
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init if "lora_" in k), "training left the adapter as it was"
    base, _ = load_model(tiny["llama"], task_kind="generation")
    ids = torch.randint(4, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        started = restore_initial_adapter(base, run / "adapter_init", summary["base_method"]).eval()
        assert METHODS[summary["base_method"]].base.rewrites_base == (summary["base_method"] in ("corda", "lora-ga",
                                                                                                 "milora", "olora"))
        torch.testing.assert_close(started(input_ids=ids).logits, reference, atol=1e-4, rtol=1e-4)


def test_same_seed_same_metrics(tiny, tmp_path):
    for name in ("a", "b"):
        finetune(tiny, tmp_path / name, method="astra", eval_steps=2)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    finetune(tiny, tmp_path / "c", method="astra", eval_steps=2, seed=1)
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() != (tmp_path / "c" / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("method", ["pissa", "astra", "lora"])
def test_interrupted_run_resumes_to_the_same_result(tiny, tmp_path, method):
    """Ctrl-C at step 4 (checkpoint at 3): never looks finished; the rerun rebuilds the initial model from
    adapter_init/ without calibrating again, resumes, and ends exactly where an uninterrupted run ends."""
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    whole = finetune(tiny, tmp_path / "whole", method=method)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny, tmp_path / "cut", method=method, callbacks=[CtrlC()])
    assert not (tmp_path / "cut" / "summary.json").exists()  # never looks finished
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-3").is_dir()
    summary = finetune(tiny, tmp_path / "cut", method=method)
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["init_restored"]
    assert summary["final"] == whole["final"]
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    if method == "astra":  # the residual-form adapter says so, resumed or not: PEFT refuses it on the original base
        for run in ("whole", "cut"):
            saved = json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text())
            assert saved["init_lora_weights"] == "astra", run


def test_calibration_on_other_data(tiny, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(40)))
    summary = finetune(tiny, tmp_path / "run", method=f"astra:calibration_data={text}", max_steps=2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["effective"]["calibration_data"] == str(text) and summary["steps"] == 2


# ------------------------------------------------------------------------------------------- report


def test_compare_writes_table_and_plots_and_skips_finished_runs(tiny, tmp_path):
    from astra_peft.harness.compare import run_compare
    from astra_peft.harness.training import FinetuneConfig

    base = FinetuneConfig(model=tiny["llama"], data=tiny["gen"], output=str(tmp_path), max_steps=4, batch_size=4,
                          lr=5e-3, rank=4, alpha=8, calibration_samples=32, progress=False, save_steps=0)
    methods = "astra,astra:eigen_selection=largest,lora:lr=1e-2"
    logs = []
    paths = run_compare(base, methods, [0, 1], output=tmp_path / "cmp", log=logs.append)
    for key in ("summary_md", "summary_csv", "loss_png", "grad_norm_png"):
        assert Path(paths[key]).stat().st_size > 0
    table = Path(paths["summary_md"]).read_text()
    assert "astra:eigen_selection=largest" in table and " ± " in table
    lines = Path(paths["summary_csv"]).read_text().splitlines()
    assert lines[0].startswith("split,method") and len(lines) >= 4
    run = tmp_path / "cmp" / "runs" / "gen" / "lora-lr=1e-2" / "seed1"
    assert json.loads((run / "summary.json").read_text())["lr"] == 1e-2
    assert len([m for m in logs if "running" in m]) == 6
    logs.clear()
    run_compare(base, methods, [0, 1], output=tmp_path / "cmp", log=logs.append)
    assert len([m for m in logs if "skipped" in m]) == 6 and not any("running" in m for m in logs)


def test_table_of_accuracy_or_held_out_loss():
    from astra_peft.harness.report import markdown_table

    def run(method, seed, acc, loss):
        return {"method": method, "task": "t", "seed": seed, "final": {"test": {"accuracy": acc, "loss": loss}},
                "seconds": {"calibration": 1.0, "initialization": 1.0, "training": 2.0}}

    runs = [run("a", 0, 0.5, 2.0), run("a", 1, 0.7, 2.5), run("b", 0, 0.4, 3.0)]
    accuracy, loss = (markdown_table(runs, "test", metric=m).splitlines()[2:4] for m in ("accuracy", "loss"))
    assert accuracy[0].split(" | ")[2] == "60.00 ± 14.14" and loss[0].split(" | ")[2] == "2.2500 ± 0.3536"
    assert accuracy[1].split(" | ")[2] == "40.00" and loss[1].split(" | ")[2] == "3.0000"  # one seed: no spread


def test_effective_rank_report(tmp_path):
    from astra_peft.harness.report import effective_rank_table, write_effective_rank

    before = {"model.layers.0.self_attn.q_proj": 10.0, "model.layers.1.self_attn.q_proj": 12.0,
              "model.layers.0.mlp.up_proj": 20.0}
    after = {k: v + 1 for k, v in before.items()}
    rows = effective_rank_table(before, after)
    assert {r["layer_type"]: r["before"] for r in rows} == {"self_attn.q_proj": 11.0, "mlp.up_proj": 20.0}
    paths = write_effective_rank(rows, tmp_path)
    assert all(Path(p).stat().st_size > 0 for p in paths.values())


def test_task_labels_for_directories():
    from astra_peft.harness.compare import task_label

    assert task_label("mr", None) == "mr"
    assert task_label("/data/my_task.jsonl", None) == "my_task"
    assert task_label(None, "rel/other.jsonl") == "other"
