"""Measuring a model as it runs: the effective rank (paper Eq. 9) of each layer's output activations.

This runs the model, so it lives apart from `spectrum.py` (linear algebra on a given matrix): it collects each
layer's output statistics with the calibration machinery (`calibration.effective_rank_stats`, hooks removed
in `finally`) and hands their eigenvalues to `spectrum.effective_rank`. The harness's `astra analyze`
(paper Figure 3: effective rank before and after fine-tuning) is built on it.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from .calibration import effective_rank_stats
from .layers import SUPPORTED_BASE_LAYERS, canonical_name, lora_layers
from .spectrum import effective_rank, eigenvalues


def effective_ranks(
    model: torch.nn.Module,
    dataloader,
    target_modules: list[str] | None = None,
    *,
    forward_fn=None,
    max_tokens: int | None = None,
    adapter_name: str = "default",
    show_progress: bool = True,
) -> dict[str, float]:
    """Effective rank (Eq. 9) of the output-activation covariance of each layer, as the model runs now.

    Args:
        model: A PeftModel (its LoRA layers of `adapter_name` are measured *with* their adapter, i.e. what the
            fine-tuned model computes) or a plain model.
        dataloader: Batches `model(**batch)` accepts (or `forward_fn(model, batch)` takes); positions with
            `attention_mask == 0` are left out.
        target_modules: Layer-name suffixes to measure (e.g. ``["q_proj", "up_proj"]``); on a plain model they
            are required. None: the LoRA layers of `adapter_name`.
        forward_fn: How to run the model on one batch, for models that need another call.
        max_tokens: Stop after the batch that brings the token count to this budget.
        adapter_name: The adapter whose layers are measured when `target_modules` is None.
        show_progress: Progress bars for the forward passes and for the per-layer eigenvalues (on a large
            model the eigenvalues take minutes; without a bar that time is silent).

    Returns:
        {layer name (canonical, as in the base model): effective rank}.

    Raises:
        ValueError: No layer matches (a plain model without `target_modules`, or suffixes that match nothing).
    """
    if target_modules is None:
        modules = lora_layers(model, adapter_name)
    else:
        suffixes = tuple(target_modules)
        modules = {
            canonical_name(n): m
            for n, m in model.named_modules()
            if isinstance(m, SUPPORTED_BASE_LAYERS + (LoraLayer,))
            and not n.endswith(".base_layer")
            and any(n == s or n.endswith("." + s) for s in suffixes)
        }
    if not modules:
        raise ValueError("No layer to measure: pass target_modules, or a PeftModel with LoRA layers.")
    stats = effective_rank_stats(model, dataloader, modules, forward_fn=forward_fn, max_tokens=max_tokens,
                                 show_progress=show_progress)
    names = tqdm(modules, desc="effective rank", unit="layer", disable=not show_progress)
    return {name: effective_rank(eigenvalues(stats.output_statistic(name, "covariance"))) for name in names}
