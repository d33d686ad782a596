"""Astra where people train: transformers `Trainer` / TRL `SFTTrainer` (one call before `train()`), and the
folder layout that keeps every checkpoint and saved model loadable on the ORIGINAL base model.

    from astra_peft.integrations import initialize_astra_for_trainer
    initialize_astra_for_trainer(trainer, AstraConfig(), num_batches=16)
    trainer.train()
    trainer.save_model("out")   # PeftModel.from_pretrained(original_base, "out") reproduces the trained model
"""

from .folders import ASTRA_MARKER, restore_astra_initialization
from .trainer import AstraTrainerCallback, initialize_astra_for_trainer

__all__ = ["ASTRA_MARKER", "AstraTrainerCallback", "initialize_astra_for_trainer", "restore_astra_initialization"]
