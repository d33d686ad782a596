"""Astra: Activation-Space Tail-Eigenvector Low-Rank Adaptation, on top of Hugging Face PEFT.

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=[...]))
    initialize_astra_weights(peft_model, calibration_dataloader, AstraConfig())
"""

from .calibration import collect_activation_stats
from .config import AstraConfig
from .conversion import save_as_lora
from .initialization import AstraReport, initialize_astra_weights
from .spectrum import effective_rank, effective_ranks
from .stats import ActivationStats

__all__ = [
    "AstraConfig",
    "AstraReport",
    "ActivationStats",
    "collect_activation_stats",
    "effective_rank",
    "effective_ranks",
    "initialize_astra_weights",
    "save_as_lora",
]
__version__ = "0.1.0"
