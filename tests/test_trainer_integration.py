"""Astra with transformers `Trainer` and TRL `SFTTrainer` (issue 13, items 3 and 4): saved models and checkpoints
rebuild the trained model on the ORIGINAL base; a killed run resumes to the uninterrupted run's adapter; each
naive route is shown to be wrong (or refused)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import lora_config, tiny_llama, tiny_tokenizer  # noqa: E402

from astra_peft import AstraConfig  # noqa: E402

QUIET = dict(show_progress=False)
EXACT = 1e-5  # fp32: the plain-LoRA conversion reproduces the trained model up to rounding (~1e-7 here)
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n=40):
    return [f"the number {i} is {'even' if i % 2 == 0 else 'odd'}." * (1 + i % 3) for i in range(n)]


def _probe(tok):
    """A fixed padded batch the trained and the reloaded models are compared on."""
    return dict(tok(["the number 7 is odd.", "the number 12 is even. the number 3"], padding=True,
                    return_tensors="pt"))


def _logits(model, batch):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        model.train(was)


def _sft(out, *, max_steps=5, save_steps=0, model=None, callbacks=(), texts=None):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2, seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_strategy="no",
        report_to=[], use_cpu=True, bf16=False, max_length=64, disable_tqdm=True,  # bf16 defaults to True in TRL
    )
    kwargs = {"peft_config": lora_config("llama")} if model is None else {}
    return SFTTrainer(model=model or tiny_llama(), args=args, train_dataset=Dataset.from_dict({"text": texts or _texts()}),
                      processing_class=tiny_tokenizer(), callbacks=list(callbacks), **kwargs)


def _plain_trainer(out, *, max_steps=5):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = tiny_tokenizer()
    ds = Dataset.from_dict({"text": _texts()}).map(lambda r: tok(r["text"], truncation=True, max_length=64),
                                                   remove_columns=["text"])
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, seed=0, save_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=get_peft_model(tiny_llama(), lora_config("llama")), args=args, train_dataset=ds,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def _load(path):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_llama(), str(path))


def _naive_load(path, tmp_path):
    """What a user of plain PEFT gets from the residual-form adapter Trainer writes: it loaded as an ordinary
    LoRA onto the original base (as before this fix, when its config said init_lora_weights: true)."""
    import shutil

    copy = tmp_path / "naive"
    shutil.copytree(path, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["init_lora_weights"] = True
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return _load(copy)


# ---------------------------------------------------------------------------------- save_model → original base


@pytest.mark.parametrize("kind", ["sft", "trainer"])
def test_save_model_reloads_on_the_original_base(tmp_path, kind):
    from astra_peft.integrations import initialize_astra_for_trainer

    import itertools

    trainer = _sft(tmp_path / "run") if kind == "sft" else _plain_trainer(tmp_path / "run")
    state = torch.get_rng_state()
    batches = list(itertools.islice(trainer.get_train_dataloader(), 4))  # what the calibration will read
    torch.set_rng_state(state)
    padded = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    report = initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=4)
    assert len(report.layers) == 14
    assert real < padded and all(layer.tokens == real for layer in report.layers)  # the collator's padding left out
    trainer.train()
    batch = _probe(tiny_tokenizer())
    trained = _logits(trainer.model, batch)
    assert (trained - _logits(tiny_llama(), batch)).abs().max() > 1e-2  # training moved the model
    trainer.save_model(str(tmp_path / "final"))

    final = tmp_path / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # a plain rank-2r LoRA of the original base
    assert (_logits(_load(final), batch) - trained).abs().max() <= EXACT
    manifest = json.loads((final / "astra" / "astra.json").read_text())
    assert manifest["kind"] == "saved_model" and manifest["global_step"] == 5

    # The residual form is kept, marked: plain PEFT refuses it on the original base instead of a wrong model ...
    residual = final / "astra" / "residual"
    assert json.loads((residual / "adapter_config.json").read_text())["init_lora_weights"] == "astra"
    with pytest.raises(ValueError, match="astra"):
        _load(residual)
    # ... which is what it gave before: Trainer's own save loaded as an ordinary LoRA is far off.
    assert (_logits(_naive_load(residual, tmp_path), batch) - trained).abs().max() > 1e-2


# ----------------------------------------------------------------------------- checkpoints and resume


class _Recorder:
    """Logits of the live model at each checkpoint, and a simulated kill after one."""

    def __new__(cls, batch, kill_after=None):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self):
                self.at_save = {}

            def on_save(self, args, state, control, model=None, **kwargs):
                self.at_save[state.global_step] = _logits(model, batch)

            def on_step_end(self, args, state, control, **kwargs):
                if kill_after is not None and state.global_step > kill_after:
                    raise KeyboardInterrupt("simulated kill")

        return Recorder()


def _adapter(model):
    from peft.utils import get_peft_model_state_dict

    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def test_checkpoints_load_on_the_original_base(tmp_path):
    from astra_peft.integrations import initialize_astra_for_trainer

    batch = _probe(tiny_tokenizer())
    recorder = _Recorder(batch)
    trainer = _sft(tmp_path / "run", max_steps=6, save_steps=3, callbacks=[recorder])
    initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=4)
    trainer.train()
    for step in (3, 6):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (_logits(_load(checkpoint / "astra" / "lora"), batch) - recorder.at_save[step]).abs().max() <= EXACT
        # the checkpoint's own adapter is the residual form Trainer resumes from: marked, refused by plain PEFT
        assert json.loads((checkpoint / "adapter_config.json").read_text())["init_lora_weights"] == "astra"
        with pytest.raises(ValueError, match="astra"):
            _load(checkpoint)
        naive = _naive_load(checkpoint, tmp_path / f"naive{step}")
        assert (_logits(naive, batch) - recorder.at_save[step]).abs().max() > 1e-2


def _resumed(out, **init):
    from astra_peft.integrations import initialize_astra_for_trainer

    trainer = _sft(out, max_steps=6, save_steps=3)  # a new process: fresh model, fresh trainer
    initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=4, **init)
    return trainer


def test_resume_after_a_kill_gives_the_uninterrupted_adapter(tmp_path):
    from peft import get_peft_model

    from astra_peft.integrations import initialize_astra_for_trainer

    batch = _probe(tiny_tokenizer())
    whole = _sft(tmp_path / "whole", max_steps=6, save_steps=3)
    initialize_astra_for_trainer(whole, AstraConfig(**QUIET), num_batches=4)
    whole.train()
    expected, expected_logits = _adapter(whole.model), _logits(whole.model, batch)

    killed = _sft(tmp_path / "run", max_steps=6, save_steps=3, callbacks=[_Recorder(batch, kill_after=3)])
    initialize_astra_for_trainer(killed, AstraConfig(**QUIET), num_batches=4)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]

    resumed = _resumed(tmp_path / "run", resume_from_checkpoint=True)  # restores, does not calibrate
    resumed.train(resume_from_checkpoint=True)
    got = _adapter(resumed.model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)  # bit for bit
    assert torch.equal(_logits(resumed.model, batch), expected_logits)
    resumed.save_model(str(tmp_path / "final"))
    assert (_logits(_load(tmp_path / "final"), batch) - expected_logits).abs().max() <= EXACT

    # Naive route: a hand-built PeftModel resumed without restoring the residual base trains on the original
    # weights: the adapter loads without any error, yet the model is wrong.
    naive = _sft(tmp_path / "run", max_steps=6, save_steps=3, model=get_peft_model(tiny_llama(), lora_config("llama")))
    naive.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert (_logits(naive.model, batch) - expected_logits).abs().max() > 1e-2


def test_resume_on_a_fresh_initialisation_is_refused(tmp_path):
    """A resumed train() on a residual base other than the checkpoint's stops before the first step."""
    from astra_peft.integrations import initialize_astra_for_trainer

    first = _sft(tmp_path / "run", max_steps=3, save_steps=3)
    initialize_astra_for_trainer(first, AstraConfig(**QUIET), num_batches=4)
    first.train()

    other = _sft(tmp_path / "run", max_steps=6, save_steps=3)
    initialize_astra_for_trainer(other, AstraConfig(**QUIET), num_batches=2)  # calibrated afresh on other data
    with pytest.raises(RuntimeError, match="resume_from_checkpoint"):
        other.train(resume_from_checkpoint=True)

    # the same calibration again reproduces the checkpoint's initialisation bit for bit: that resume is exact
    same = _sft(tmp_path / "run", max_steps=4, save_steps=3)
    initialize_astra_for_trainer(same, AstraConfig(**QUIET), num_batches=4)
    same.train(resume_from_checkpoint=True)
    assert same.state.global_step == 4


def test_initialising_a_started_trainer_is_refused(tmp_path):
    """Initialising from a callback (the route that re-initialised over a resumed checkpoint) is refused."""
    from transformers import TrainerCallback

    from astra_peft.integrations import initialize_astra_for_trainer

    class InitInCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=2)

    trainer = _sft(tmp_path / "run", max_steps=2, callbacks=[InitInCallback()])
    before = _adapter(trainer.model)
    with pytest.raises(RuntimeError, match="before trainer.train"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in _adapter(trainer.model).items())


def test_errors_name_what_to_do(tmp_path):
    from astra_peft.integrations import initialize_astra_for_trainer

    short = _sft(tmp_path / "short", texts=["ab", "cd"] * 8)  # 4 rows of 3 tokens a batch
    with pytest.raises(ValueError, match="raise num_batches"):  # too few tokens for the smallest eigenvalues
        initialize_astra_for_trainer(short, AstraConfig(**QUIET), num_batches=2)
    trainer = _sft(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        initialize_astra_for_trainer(trainer, resume_from_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a PeftModel"):
        initialize_astra_for_trainer(_sft(tmp_path / "plain", model=tiny_llama()))
    sharded = _sft(tmp_path / "sharded")
    next(sharded.model.parameters()).ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    with pytest.raises(ValueError, match="ZeRO-3"):
        initialize_astra_for_trainer(sharded)
    initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=4)
    with pytest.raises(ValueError, match="overwrite the initial adapter"):
        trainer.save_model(str(tmp_path / "run" / "astra_init"))
    trainer = _sft(tmp_path / "other")
    (tmp_path / "other").mkdir(exist_ok=True)
    (tmp_path / "other" / "astra_init").mkdir()  # a folder of the user's: never replaced
    with pytest.raises(FileExistsError, match="not written by astra-peft"):
        initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=4)


def test_calibration_leaves_the_random_state_alone(tmp_path):
    from astra_peft.integrations import initialize_astra_for_trainer

    trainer = _sft(tmp_path / "run")
    state = torch.get_rng_state()
    initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=4)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.slow
def test_sft_trainer_under_torchrun(tmp_path):
    """Two CPU ranks (gloo): every rank initialises identically from the union of its shards, the saved model
    reloads on the original base, and only rank 0 writes."""
    here = Path(__file__).parent
    env = {**_env(), "PYTHONPATH": f"{here}{__import__('os').pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(here / "_trainer_ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    inits = [torch.load(tmp_path / f"init{r}.pt") for r in (0, 1)]
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])
    trained = torch.load(tmp_path / "trained0.pt")
    assert torch.equal(trained, torch.load(tmp_path / "trained1.pt"))
    assert (_logits(_load(tmp_path / "final"), _probe(tiny_tokenizer())) - trained).abs().max() <= EXACT
    for step in (2, 4):
        assert (tmp_path / "run" / f"checkpoint-{step}" / "astra" / "lora" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "trainer_trl.py"), "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reloaded on the original base: max |Δlogits|" in result.stdout


def _env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_names_the_calibration_flags_when_data_is_too_small(tmp_path, capsys):
    """`astra finetune` on a tiny data set with the default Astra: the error says which flags give more tokens,
    and the flag it names does fix it."""
    from test_harness import make_tiny_llama

    from astra_peft.harness.cli import main

    model = make_tiny_llama(tmp_path / "llama")
    words = ["one", "two", "three", "four", "five", "six"]
    pairs = [(a, b) for a in range(6) for b in range(6) if a != b][:16]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {words[a]} more than {words[b]} ?",
                                        "completion": " yes" if a > b else " no"}) + "\n" for a, b in pairs))
    base = ["finetune", "--model", str(model), "--data", str(data), "--max-steps", "1", "--no-progress",
            "--calibration-samples", "4"]  # 4 short rows: fewer tokens than the smallest eigenvalues need
    assert main(base + ["--output", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "calibration tokens" in err and "--calibration-data" in err and "--calibration-samples" in err

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("is one more than two ? no . is six more than four ? yes . is three more than five ? no\n" * 8)
    assert main(base + ["--output", str(tmp_path / "fixed"), "--calibration-data", str(corpus)]) == 0


# ------------------------------------------------------------------------------------- library pieces


def _initialised(tmp_path):
    from peft import get_peft_model

    from astra_peft import initialize_astra_weights
    from conftest import make_batches

    model = get_peft_model(tiny_llama(), lora_config("llama", alpha=7))  # alpha 7: float32 rounding order shows
    initialize_astra_weights(model, make_batches(), AstraConfig(**QUIET))
    model.save_pretrained(str(tmp_path / "init"))
    return model


def _bases(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def test_restore_rebuilds_the_residual_base_bit_for_bit(tmp_path):
    from peft import get_peft_model

    from astra_peft.integrations import restore_astra_initialization

    model = _initialised(tmp_path)
    fresh = get_peft_model(tiny_llama(), lora_config("llama", alpha=7))
    restore_astra_initialization(fresh, tmp_path / "init")
    expected, got = _bases(model), _bases(fresh)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(_adapter(fresh).values(), _adapter(model).values()))
    with pytest.raises(RuntimeError, match="already initialised"):  # a second residual is never stacked
        restore_astra_initialization(fresh, tmp_path / "init")

    other = get_peft_model(tiny_llama(), lora_config("llama", r=8, alpha=7))
    before = _bases(other)
    with pytest.raises(ValueError, match="other LoRA settings"):
        restore_astra_initialization(other, tmp_path / "init")
    assert all(torch.equal(v, before[k]) for k, v in _bases(other).items())  # untouched


def test_save_as_lora_draws_no_random_number_and_keeps_the_initial_adapter(tmp_path):
    from astra_peft import save_as_lora

    model = _initialised(tmp_path)
    for p in model.parameters():
        if p.requires_grad:
            p.data += 0.01  # "trained"
    batch = _probe(tiny_tokenizer())
    trained = _logits(model, batch)
    state, flags = torch.get_rng_state(), {n: p.requires_grad for n, p in model.named_parameters()}
    save_as_lora(model, tmp_path / "lora", tmp_path / "init")
    assert torch.equal(state, torch.get_rng_state())  # PEFT's own route draws (a temporary adapter's init)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()} and list(model.peft_config) == ["default"]
    assert (_logits(_load(tmp_path / "lora"), batch) - trained).abs().max() <= EXACT
    initial = (tmp_path / "init" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="overwrite"):
        save_as_lora(model, tmp_path / "init", tmp_path / "init")
    assert (tmp_path / "init" / "adapter_model.safetensors").read_bytes() == initial


def test_resume_refuses_a_foreign_or_damaged_checkpoint(tmp_path):
    from peft import get_peft_model

    from astra_peft.integrations import initialize_astra_for_trainer
    from conftest import tiny_model

    first = _sft(tmp_path / "run", max_steps=3, save_steps=3)
    initialize_astra_for_trainer(first, AstraConfig(**QUIET), num_batches=4)
    first.train()

    other_base = _sft(tmp_path / "run", model=get_peft_model(tiny_model("llama", seed=1), lora_config("llama")))
    with pytest.raises(ValueError, match="another base model"):
        initialize_astra_for_trainer(other_base, resume_from_checkpoint=True)

    initial = tmp_path / "run" / "checkpoint-3" / "astra" / "initial"
    get_peft_model(tiny_llama(), lora_config("llama")).save_pretrained(str(tmp_path / "plain"))
    (initial / "adapter_model.safetensors").write_bytes((tmp_path / "plain" / "adapter_model.safetensors").read_bytes())
    damaged = _sft(tmp_path / "run", model=get_peft_model(tiny_llama(), lora_config("llama")))
    before = _bases(damaged.model)
    with pytest.raises(ValueError, match="damaged"):
        initialize_astra_for_trainer(damaged, resume_from_checkpoint=True)
    assert all(torch.equal(v, before[k]) for k, v in _bases(damaged.model).items())
