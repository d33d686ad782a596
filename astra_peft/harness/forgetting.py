"""The forgetting measure (--forgetting-data): how much fine-tuning costs a causal LM on general text.

The number is the model's mean token loss on a fixed set of general texts that are neither training nor calibration
data, measured twice: on the base model as loaded, before the method is built (Astra, PiSSA and CorDA rewrite the
frozen weights, so "before" is never the rewritten model), and on the fine-tuned model after training. `forgetting`
is after − before: positive when fine-tuning made the model worse at text it was not trained on.

The texts are the first --forgetting-samples of the corpus's held-out share (tasks.FORGETTING_SHARE, chosen by each
text's hash): the same texts for every method and seed. Calibration on the same corpus samples only the rest, and
whatever the sources, each run checks that no forgetting text is a calibration text or a training row.

No torch import at module level: FinetuneConfig (run_config.py, which `astra --help` reads) calls
`check_forgetting_settings` when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .validation import MIN_LENGTH, UserError, check_calibration_source

# A training text at least this long found inside a forgetting text (or the other way round) is an overlap; shorter
# ones (" yes", a one-word label) would match any article by chance.
MIN_OVERLAP_CHARS = 32


@dataclass(frozen=True)
class ForgettingSet:
    """The texts the forgetting measure scores, and the corpus they came from (as given to --forgetting-data)."""

    source: str
    texts: tuple[str, ...]


def check_forgetting_settings(cfg) -> None:
    """The forgetting flags of a FinetuneConfig, checked before anything is loaded.

    Raises:
        UserError: Naming the flag: a sample count below 1, a max length too short to score a token, or a
            --forgetting-data that is neither a built-in corpus or task nor a .jsonl/.txt file.
    """
    for name, low in (("forgetting_samples", 1), ("forgetting_max_length", MIN_LENGTH)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"--{name.replace('_', '-')} must be an integer ≥ {low}, got {value!r}")
    source = cfg.forgetting_data
    if source is None:
        return
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"--forgetting-data must be a non-empty string, got {source!r}")
    check_calibration_source(source, "--forgetting-data")


def forgetting_set(cfg, task) -> Optional[ForgettingSet]:
    """The texts to score (None when --forgetting-data is unset), refused where the number would not mean
    forgetting.

    Raises:
        UserError: The task is a classification task (its model has a classification head, not a language-model
            head to score text with); the corpus has no text in its held-out share; or a forgetting text is
            (or contains, or lies inside) one of the task's training rows.
    """
    source = cfg.forgetting_data
    if source is None:
        return None
    if task.kind == "classification":
        raise UserError(f"--forgetting-data measures a causal LM's token loss on text, but task {task.name!r} is "
                        f"a classification task (its model gets a classification head); leave --forgetting-data "
                        f"unset for it")
    from .tasks import FORGETTING_SHARE, load_text_corpus

    try:
        texts = load_text_corpus(source, "forgetting")[: cfg.forgetting_samples]
    except KeyError as err:
        raise UserError(f"--forgetting-data {source!r}: {err.args[0]}") from None
    if not texts:
        raise UserError(f"--forgetting-data {source!r}: none of its texts falls in the share held out for the "
                        f"forgetting measure (one text in {FORGETTING_SHARE}, by hash); give a larger corpus")
    train = [r["text"] if "text" in r else r["prompt"] + r["completion"] for r in task.splits["train"]]
    hit = first_overlap(texts, train)
    if hit is not None:
        raise UserError(f"--forgetting-data {source!r}: text {hit + 1} of the forgetting set overlaps a training "
                        f"row of task {task.name!r} ({_short(texts[hit])}); forgetting must be measured on text "
                        f"the run never trains on: use another corpus")
    return ForgettingSet(source, tuple(texts))


def calibration_part(calibration_source: str, forgetting: Optional[ForgettingSet]) -> Optional[str]:
    """The part of the calibration corpus to sample: "calibration" (all but the forgetting share) when the
    forgetting measure scores the same corpus, else None (all of it, as without the measure)."""
    if forgetting is None:
        return None
    return "calibration" if same_corpus(calibration_source, forgetting.source) else None


def same_corpus(a: str, b: str) -> bool:
    """The same built-in name, or two paths to one file."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_file() and pb.is_file() and pa.resolve() == pb.resolve()


def check_disjoint(calibration_texts: Sequence[str], forgetting: Optional[ForgettingSet],
                   calibration_source: str) -> None:
    """Checked, not assumed: no calibration text is (or contains, or lies inside) a forgetting text. The share
    split makes this hold for one corpus; two different files may still share lines.

    Raises:
        UserError: Naming both flags and the text.
    """
    if forgetting is None:
        return
    hit = first_overlap(forgetting.texts, calibration_texts)
    if hit is not None:
        raise UserError(f"--forgetting-data {forgetting.source!r}: text {hit + 1} of the forgetting set "
                        f"({_short(forgetting.texts[hit])}) is also calibration data (--calibration-data "
                        f"{calibration_source!r}); give the two flags corpora that share no text")


def first_overlap(texts: Sequence[str], others: Sequence[str]) -> Optional[int]:
    """The index of the first of `texts` that equals one of `others` up to whitespace, contains one or lies inside
    one (the contained text at least MIN_OVERLAP_CHARS characters long); None if none does."""
    normal = [" ".join(o.split()) for o in others]
    exact, long = set(normal), [o for o in normal if len(o) >= MIN_OVERLAP_CHARS]
    for i, text in enumerate(texts):
        t = " ".join(text.split())
        if t in exact or any(o in t for o in long) or (len(t) >= MIN_OVERLAP_CHARS and any(t in o for o in normal)):
            return i
    return None


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def measure(model, tokenizer, forgetting: ForgettingSet, cfg) -> dict:
    """The model's mean token loss on the forgetting texts: {"loss", "texts", "tokens"}."""
    from .evaluation import text_loss

    return text_loss(model, tokenizer, forgetting.texts, batch_size=cfg.eval_batch_size,
                     max_length=cfg.forgetting_max_length, desc="forgetting", progress=cfg.progress)


def summary_fields(forgetting: Optional[ForgettingSet], before: Optional[dict], after: Optional[dict]) -> dict:
    """The summary.json keys of the measure (none when it is off)."""
    if forgetting is None:
        return {}
    if (before["texts"], before["tokens"]) != (after["texts"], after["tokens"]):
        raise RuntimeError("forgetting: before and after scored different tokens; this is a bug")
    return {"forgetting_data": forgetting.source, "forget_loss_before": before["loss"],
            "forget_loss_after": after["loss"], "forgetting": after["loss"] - before["loss"],
            "forgetting_texts": before["texts"], "forgetting_tokens": before["tokens"]}
