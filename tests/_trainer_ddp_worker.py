"""torchrun worker for test_trainer_integration.py::test_sft_trainer_under_torchrun: SFTTrainer with Astra on two
CPU ranks (gloo); each rank calibrates on its own shard of the training batches."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import test_trainer_integration as T
from astra_peft import AstraConfig
from astra_peft.integrations import initialize_astra_for_trainer
from conftest import tiny_tokenizer


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer = T._sft(out / "run", max_steps=4, save_steps=2)
    initialize_astra_for_trainer(trainer, AstraConfig(show_progress=False), num_batches=4)
    rank = dist.get_rank()
    torch.save(T._adapter(trainer.model), out / f"init{rank}.pt")
    trainer.train()
    trainer.save_model(str(out / "final"))
    torch.save(T._logits(trainer.model, T._probe(tiny_tokenizer())), out / f"trained{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
