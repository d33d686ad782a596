"""Calibration data: turn a `datasets.Dataset` or a list of rows into padded batches with an attention mask.

`datasets` is never imported here: a Dataset is read as what it is, a sized, indexable iterable of row
dicts, so the library does not depend on it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Iterable, Optional, Union

import torch
from torch.utils.data import DataLoader

# The only columns a calibration forward needs. Labels and other columns are dropped: they play no part in
# the statistics, and columns of other lengths would break padding.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def calibration_batches(
    data: Iterable,
    tokenizer=None,
    *,
    batch_size: int = 8,
    max_samples: Optional[int] = None,
    max_length: Optional[int] = None,
    text_field: str = "text",
    seed: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> DataLoader:
    """Padded calibration batches for `initialize_astra_weights` / `collect_activation_stats`.

    Padding comes from transformers' `DataCollatorWithPadding`, always on the right (a copy of the tokenizer
    is used when it pads on the left, so a causal model sees each row exactly as it would alone), and every
    batch carries an `attention_mask`, so padding never enters the statistics.

    ```python
    batches = calibration_batches(dataset, tokenizer, batch_size=8, max_samples=64, max_length=512)
    initialize_astra_weights(peft_model, batches, AstraConfig())
    ```

    Args:
        data (`datasets.Dataset`, list, or any iterable of rows):
            The calibration rows. A row is a string (raw text), or a mapping with `input_ids` (already
            tokenised; `attention_mask` and `token_type_ids` are kept when present, other columns such as
            `labels` are dropped), or a mapping with a text column named `text_field`. Rows may mix kinds.
            A `datasets.Dataset` with any format (python, torch, numpy) works; a `DatasetDict` must be
            given one split (`data["train"]`).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Tokenises text rows and pads. Required when any row is text, and must have a pad token
            (`tokenizer.pad_token = tokenizer.eos_token` is fine: padding is masked out of the statistics).
            Without it, tokenised rows are padded with id 0 and a matching attention mask.
        batch_size (`int`, defaults to 8):
            Rows per batch.
        max_samples (`int`, *optional*):
            Use at most this many rows: the first ones, or a random subset when `seed` is given.
        max_length (`int`, *optional*):
            Truncate every row to at most this many tokens (keeping its start).
        text_field (`str`, defaults to `"text"`):
            The column holding raw text in mapping rows without `input_ids`.
        seed (`int`, *optional*):
            When given, rows are drawn in a random order fixed by this seed (before `max_samples` is
            applied); `data` must then support `len()` and integer indexing, as a `Dataset` or list does.
        device (`str` or `torch.device`, *optional*):
            Put every batch's tensors there (the model's device); default: left on the CPU.

    Returns:
        `torch.utils.data.DataLoader`: re-iterable, `len()` is the number of batches; each batch is a dict
        of `(batch, seq_len)` tensors: `input_ids`, `attention_mask` (and `token_type_ids` when the rows
        have them). Rows are tokenised and checked once, here, so a bad row fails before any forward pass.

    Raises:
        TypeError: `data` is a string or a mapping (a `DatasetDict`, or one batch) instead of rows, or a row
            is neither text nor a mapping with `input_ids` / `text_field`.
        ValueError: no rows; text rows without a tokenizer; a tokenizer without a pad token; a row whose
            `input_ids` is not one sequence; `seed` on data without `len()`; a non-positive size argument.
    """
    for name, value in (("batch_size", batch_size), ("max_samples", max_samples), ("max_length", max_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(data, (str, bytes, Mapping)):
        raise TypeError(
            f"`data` is a {type(data).__name__}, not a collection of rows. Pass a list of rows or a "
            "`datasets.Dataset` (for a `DatasetDict`, one split such as `data['train']`)."
        )
    if tokenizer is not None and tokenizer.pad_token is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no pad token, which batching needs. Set one, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`: padding is masked out of the statistics, so which "
            "token pads does not matter."
        )
    rows = [_encode(i, row, tokenizer, text_field, max_length) for i, row in _select(data, max_samples, seed)]
    if not rows:
        raise ValueError("The calibration data has no rows.")
    collate = _Collate(tokenizer, device)
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _select(data, max_samples: Optional[int], seed: Optional[int]):
    """(index, row) pairs: the first `max_samples` rows, or a seeded random subset of them."""
    if seed is None:
        return itertools.islice(enumerate(data), max_samples)
    try:
        n = len(data)
    except TypeError:
        raise ValueError(
            f"`seed` draws a random subset, which needs data with len() and indexing; a {type(data).__name__} "
            "has no len(). Pass a list or a `datasets.Dataset`, or leave `seed` unset to take the first rows."
        ) from None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:max_samples]
    return ((i, data[i]) for i in order)


def _encode(index: int, row, tokenizer, text_field: str, max_length: Optional[int]) -> dict[str, list]:
    """One row as {model input: list of ints}, truncated to `max_length`."""
    if isinstance(row, Mapping) and "input_ids" in row:
        out = {}
        for key in MODEL_INPUTS:
            if row.get(key) is not None:
                out[key] = _ids(index, key, row[key])[:max_length]
        if "attention_mask" in out and len(out["attention_mask"]) != len(out["input_ids"]):
            raise ValueError(
                f"Calibration row {index}: 'attention_mask' has {len(out['attention_mask'])} entries for "
                f"{len(out['input_ids'])} input_ids."
            )
        return out
    text = row[text_field] if isinstance(row, Mapping) and text_field in row else row
    if not isinstance(text, str):
        what = f"a mapping with keys {sorted(map(str, row))}" if isinstance(row, Mapping) else f"of type {type(row).__name__}"
        raise TypeError(
            f"Calibration row {index} is {what}: expected a string, or a mapping with 'input_ids' (tokenised) or "
            f"a text column '{text_field}' (set `text_field=` to name another column)."
        )
    if tokenizer is None:
        raise ValueError(
            f"Calibration row {index} is raw text; pass `tokenizer=` to tokenise it (or give rows with 'input_ids')."
        )
    encoded = tokenizer(text, truncation=max_length is not None, max_length=max_length)
    return {k: list(encoded[k]) for k in MODEL_INPUTS if k in encoded}


def _ids(index: int, key: str, value) -> list:
    if hasattr(value, "tolist"):  # torch / numpy formats of a Dataset
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or any(not isinstance(v, int) for v in value):
        shape = tuple(getattr(value, "shape", ())) or type(value).__name__
        raise ValueError(
            f"Calibration row {index}: '{key}' must be one sequence of token ids (a flat list or 1-D tensor), got "
            f"{shape}. Rows are single sequences; to calibrate on ready-made batches, pass them (an iterable of "
            "dicts of (batch, seq_len) tensors) straight to `initialize_astra_weights`."
        )
    return list(value)


class _Collate:
    """transformers' `DataCollatorWithPadding`, padding on the right; torch's `pad_sequence` without a tokenizer."""

    def __init__(self, tokenizer, device):
        self.device = device
        self.pad = None
        if tokenizer is not None:
            from transformers import DataCollatorWithPadding

            if getattr(tokenizer, "padding_side", "right") != "right":
                tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its own padding side
                tokenizer.padding_side = "right"
            self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, rows: list[dict[str, list]]) -> dict[str, torch.Tensor]:
        rows = [{"attention_mask": [1] * len(r["input_ids"]), **r} for r in rows]
        if self.pad is not None:
            batch = dict(self.pad(rows))
        else:
            from torch.nn.utils.rnn import pad_sequence

            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise ValueError(f"Calibration rows in one batch have different columns: {[sorted(r) for r in rows]}.")
            # pad id 0 is as good as any: the attention mask takes padding out of the statistics
            batch = {k: pad_sequence([torch.tensor(r[k]) for r in rows], batch_first=True) for k in sorted(keys)}
        if self.device is not None:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        return batch
