"""Tokenisation, shared by training and evaluation, so that the sequence a model is scored on is exactly the
sequence it was trained on: prompt tokens, then completion tokens, then EOS; loss only on the completion
(labels −100 on the prompt and on padding). Classification rows are the text and an integer label.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .kinds import TaskKind

IGNORE_INDEX = -100  # the label torch's cross-entropy skips: prompt and padding positions


def encode_classification(tokenizer, row: dict, max_length: int) -> dict:
    ids = tokenizer(row["text"], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": int(row["label"])}


def encode_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> dict:
    """The sequence is prompt + completion + EOS (tasks guarantee the text rule `prompt + completion`); the
    completion keeps its own leading space, so tokenising the two parts apart loses nothing."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    has_eos = tokenizer.eos_token_id is not None
    if has_eos:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    if len(completion_ids) > max(max_length - 1, 1):
        completion_ids, has_eos = completion_ids[: max(max_length - 1, 1)], False
    # Cut the prompt from the left: its end (the question) and the whole answer matter most.
    keep = max_length - len(completion_ids)
    prompt_ids = prompt_ids[-keep:] if keep > 0 else []
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
            "eos": has_eos}


def encode_row(tokenizer, row: dict, kind: TaskKind, max_length: int) -> dict:
    if kind == "classification":
        return encode_classification(tokenizer, row, max_length)
    return encode_prompt_completion(tokenizer, row["prompt"], row["completion"], max_length)


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


class Collator:
    """Right-pads `input_ids`; `attention_mask` marks real tokens; sequence labels pad with −100."""

    def __init__(self, pad_token_id: int, with_labels: bool = True):
        self.pad_token_id = pad_token_id
        self.with_labels = with_labels

    def __call__(self, features: Sequence[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, : len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.with_labels and "labels" in features[0]:
            if isinstance(features[0]["labels"], int):
                batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
            else:
                labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
                for i, f in enumerate(features):
                    labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
                batch["labels"] = labels
        return batch
