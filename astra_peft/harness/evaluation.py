"""Evaluation: accuracy and loss, batched, with a progress bar.

Rows are tokenised by `encoding.py`, the same code training uses, so that the sequence a model is scored on is
exactly the sequence it was trained on.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .validation import UserError

from .encoding import IGNORE_INDEX, Collator, encode_classification, encode_prompt_completion, pad_id  # noqa: E402


# ------------------------------------------------------------------------------------------ evaluation


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(items: list, size: int, desc: str, progress: bool):
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        yield items[start : start + size]


@torch.no_grad()
def sequence_nll(model, features: list[dict], collate: Collator) -> tuple[list, list, list]:
    """Per sequence: summed negative log-likelihood of its labelled tokens, their count, and the NLL of the last
    one (the EOS, when the sequence has it)."""
    batch = collate(features)
    batch = {k: v.to(_device(model)) for k, v in batch.items()}
    labels = batch.pop("labels")
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    rows = scored.nonzero()[:, 0]
    targets = labels[:, 1:][scored[:, :-1]]
    try:
        # Only the scored positions go through the (vocabulary-sized) output layer: most of a choice's
        # sequence is prompt. Models without a boolean `logits_to_keep` take the plain path below.
        logits = model(**batch, logits_to_keep=scored).logits
        if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
            raise TypeError
    except TypeError:
        logits = model(**batch).logits[:, :-1][scored[:, :-1]]
    nll = F.cross_entropy(logits.float(), targets, reduction="none").cpu()
    rows = rows.cpu()
    sums = torch.zeros(len(features)).index_add_(0, rows, nll)
    counts = torch.bincount(rows, minlength=len(features))
    last_index = torch.cumsum(counts, 0) - 1
    last = [nll[i].item() if c > 0 else 0.0 for i, c in zip(last_index.tolist(), counts.tolist())]
    return sums.tolist(), counts.tolist(), last


@torch.no_grad()
def evaluate_classification(model, tokenizer, rows, *, batch_size, max_length, desc, progress) -> dict:
    collate = Collator(pad_id(tokenizer))
    correct, loss_sum = 0, 0.0
    for chunk in _batches(rows, batch_size, desc, progress):
        batch = collate([encode_classification(tokenizer, r, max_length) for r in chunk])
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
    return _finite({"loss": loss_sum / len(rows), "accuracy": correct / len(rows), "n": len(rows)}, desc)


@torch.no_grad()
def evaluate_generation(model, tokenizer, rows, *, batch_size, max_length, desc, progress) -> dict:
    """Loss: mean NLL per completion token, EOS included, as in training. Accuracy, for rows with `choices` and
    `answer`: the choice with the highest summed log-likelihood after the prompt (multiple choice and yes/no
    alike). Each distinct continuation is run once, with EOS; a choice's score leaves the EOS term out, so a gold
    completion that equals its choice costs no second forward pass."""
    sequences, owners = [], []
    for i, row in enumerate(rows):
        for text in dict.fromkeys([*(row.get("choices") or []), row["completion"]]):
            sequences.append(encode_prompt_completion(tokenizer, row["prompt"], text, max_length))
            owners.append((i, text))
    collate = Collator(pad_id(tokenizer))
    total, count, choice, own = {}, {}, {}, {}
    # Similar lengths together: less padding; the order is fixed, so results are reproducible.
    order = sorted(range(len(sequences)), key=lambda j: len(sequences[j]["input_ids"]))
    for chunk in _batches(order, batch_size, desc, progress):
        sums, counts, lasts = sequence_nll(model, [sequences[j] for j in chunk], collate)
        for j, s, c, last in zip(chunk, sums, counts, lasts):
            total[owners[j]], count[owners[j]] = s, c
            choice[owners[j]] = s - last if sequences[j]["eos"] else s
            own[owners[j]] = c - 1 if sequences[j]["eos"] else c  # the text's own scored tokens, EOS left out

    loss_sum, token_sum, correct, scored = 0.0, 0, 0, 0
    for i, row in enumerate(rows):
        loss_sum += total[(i, row["completion"])]
        token_sum += count[(i, row["completion"])]
        choices, answer = row.get("choices"), row.get("answer")
        if choices and answer is not None:
            # A choice cut away entirely would score 0, the best possible: a win by truncation, not by the model.
            if empty := [c for c in choices if own[(i, c)] < 1]:
                raise UserError(f"{desc}: row {i + 1}: choice {empty[0]!r} has no token left to score at "
                                f"--max-length {max_length}; raise --max-length")
            best = min(range(len(choices)), key=lambda k: choice[(i, choices[k])])
            correct += int(best == int(answer))
            scored += 1
    if token_sum == 0:
        raise UserError(f"{desc}: no completion token is left to score at --max-length {max_length}; "
                        f"raise --max-length")
    metrics = {"loss": loss_sum / token_sum, "n": len(rows)}
    if scored:
        metrics["accuracy"] = correct / scored
    return _finite(metrics, desc)


@torch.no_grad()
def text_loss(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 256,
              desc: str = "text loss", progress: bool = False) -> dict:
    """A causal LM's mean NLL per token over plain `texts` (every token after the first of each text, truncated
    to `max_length`), token-weighted as the task loss is.

    Returns:
        {"loss": the mean, "texts": how many texts were scored, "tokens": how many tokens}.

    Raises:
        UserError: No text has two tokens at `max_length` (nothing to score), or the loss is not finite.
    """
    features = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:  # a lone token predicts nothing
            features.append({"input_ids": ids, "labels": ids})
    if not features:
        raise UserError(f"{desc}: no text has a token left to score at max length {max_length}")
    collate = Collator(pad_id(tokenizer))
    was_training = model.training
    model.eval()
    try:
        loss_sum, token_sum = 0.0, 0
        order = sorted(range(len(features)), key=lambda j: len(features[j]["input_ids"]))  # less padding
        for chunk in _batches(order, batch_size, desc, progress):
            sums, counts, _ = sequence_nll(model, [features[j] for j in chunk], collate)
            loss_sum, token_sum = loss_sum + sum(sums), token_sum + sum(counts)
    finally:
        model.train(was_training)
    return _finite({"loss": loss_sum / token_sum, "texts": len(features), "tokens": int(token_sum)}, desc)


def _finite(metrics: dict, desc: str) -> dict:
    """Metrics are numbers a user will trust: NaN or infinity (a model whose outputs overflowed) is an error."""
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{desc}: the {key} is {value}: the model's outputs are not finite (a diverged run or "
                            f"damaged weights)")
    return metrics


def evaluate(
    model,
    tokenizer,
    task,
    split: str,
    *,
    batch_size: int = 16,
    max_length: int = 256,
    max_samples: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Metrics of `model` on `task.splits[split]` (first `max_samples` rows): loss and, where defined, accuracy."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise UserError(f"--eval-samples must be an integer ≥ 1 (or left unset for all rows), got {max_samples!r}")
    rows = list(task.splits[split])[:max_samples]
    if not rows:
        raise ValueError(f"task {task.name!r} has no rows in split {split!r}")
    was_training = model.training
    model.eval()
    try:
        fn = evaluate_classification if task.kind == "classification" else evaluate_generation
        return fn(model, tokenizer, rows, batch_size=batch_size, max_length=max_length,
                  desc=f"eval {task.name}/{split}", progress=progress)
    finally:
        model.train(was_training)

