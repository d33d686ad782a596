"""TRL's trainers that score a reference (DPO here; KTO, GRPO and RLOO take the same path): given a PeftModel and no
ref_model they score it with the adapters disabled, which after Astra is the residual base. The one-call route
refuses them; the route it names (Astra first, the PeftModel passed) gives the original model as reference."""

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import lora_config, make_batches, tiny_llama, tiny_tokenizer  # noqa: E402

from astra_peft import AstraConfig  # noqa: E402

QUIET = dict(show_progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dpo(out, model, **kwargs):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = {"prompt": [f"the number {i} is" for i in range(16)],
            "chosen": [" even." if i % 2 == 0 else " odd." for i in range(16)],
            "rejected": [" odd." if i % 2 == 0 else " even." for i in range(16)]}
    args = DPOConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     bf16=False, logging_strategy="no", save_strategy="no", disable_tqdm=True, max_length=64)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                      processing_class=tiny_tokenizer(), **kwargs)


def _reference(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))


def test_dpo_scoring_its_reference_with_adapters_disabled_is_refused(tmp_path):
    """DPOTrainer(peft_config=...) scores the reference with the adapters disabled, which after Astra is the
    residual base: refused, model untouched, nothing written. The naive library call shows why."""
    from astra_peft import initialize_astra_for_trainer, initialize_astra_weights

    trainer = _dpo(tmp_path / "run", tiny_llama(), peft_config=lora_config("llama"))
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"DPOTrainer scores its reference .*initialize_astra_weights"):
        initialize_astra_for_trainer(trainer, AstraConfig(**QUIET), num_batches=2)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in state.items())
    assert not (tmp_path / "run" / "astra_init").exists()
    before = _reference(trainer)
    initialize_astra_weights(trainer.model, make_batches(), AstraConfig(eigen_selection="largest", **QUIET))
    assert (_reference(trainer) - before).abs().max() > 1e-2  # the reference moved: what the refusal prevents


def test_dpo_on_a_model_initialised_first_scores_the_original_reference(tmp_path):
    """The route the refusal names: Astra first, the PeftModel passed; TRL's 'ref' adapter (a copy of the initial
    adapter) on the residual base is the original model."""
    from peft import get_peft_model

    from astra_peft import initialize_astra_weights

    model = get_peft_model(tiny_llama(), lora_config("llama"))
    initialize_astra_weights(model, make_batches(), AstraConfig(eigen_selection="largest", **QUIET))
    trainer = _dpo(tmp_path / "astra", model)
    assert "ref" in trainer.model.peft_config
    original = _reference(_dpo(tmp_path / "plain", tiny_llama(), peft_config=lora_config("llama")))
    assert (_reference(trainer) - original).abs().max() <= 1e-4
