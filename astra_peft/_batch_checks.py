"""Checks of a calibration batch before any hook sees it: its padding mask, and the shapes and layouts refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch


def _padding_mask(batch) -> Optional[torch.Tensor]:
    """The batch's non-padding positions, or None when every position counts (then rows are a view of the
    activations, not a gather copy of them).

    Any Mapping counts, not only dict: transformers' collators return `BatchEncoding`, a UserDict, and
    reading only dicts would count their padding. Raises if `input_ids`/`attention_mask` is not a
    (batch, seq_len) tensor, since any other shape would make the mask silently ignored or misaligned.
    """
    if not isinstance(batch, Mapping):
        return None
    for key in ("input_ids", "attention_mask"):
        _check_batch_tensor(batch, key)
    mask = batch.get("attention_mask")
    if mask is None and _is_packed(batch):
        # Several sequences in one row, told apart only by position_ids: eager/SDPA attention lets each attend
        # to the ones before it, and padding to a multiple (position 0) looks like one-token sequences, so the
        # statistics would describe text that does not exist.
        raise ValueError(
            "A calibration batch is packed (padding-free: several sequences per row, position_ids restarting, no "
            "attention_mask), as TRL's `padding_free=True`/`packing=True` or `DataCollatorWithFlattening` make "
            "it. Calibrate on padded batches instead: `astra_peft.calibration_batches(rows, tokenizer)`, or "
            "TRL's `DataCollatorForLanguageModeling(pad_token_id=..., padding_free=False)`."
        )
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()


def _is_packed(batch: Mapping) -> bool:
    if any(key in batch for key in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")):
        return True
    pos = batch.get("position_ids")
    if not torch.is_tensor(pos) or pos.dim() != 2 or pos.shape[1] < 2:
        return False
    return bool((pos[:, 1:] != pos[:, :-1] + 1).any())


def _check_batch_tensor(batch: Mapping, key: str) -> None:
    value = batch.get(key)
    if value is None:
        return
    hint = (
        "collate rows into padded batches first, e.g. with `astra_peft.calibration_batches(data, tokenizer)` or "
        "`DataLoader(rows, batch_size=..., collate_fn=DataCollatorWithPadding(tokenizer))`"
    )
    if not torch.is_tensor(value):
        raise TypeError(
            f"Calibration batch '{key}' is a {type(value).__name__}, not a tensor of shape (batch, seq_len); {hint}."
        )
    if value.dim() != 2:
        single = " (one un-batched row? add a batch dimension with `.unsqueeze(0)`, or" if value.dim() == 1 else " ("
        raise ValueError(
            f"Calibration batch '{key}' has shape {tuple(value.shape)}; expected (batch, seq_len){single} {hint})."
        )
