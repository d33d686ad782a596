"""Built-in tasks on real data, provisioned offline from registry packages, with fixed train/dev/test splits.

Sources (fetched by sources.py): BIG-bench task files from the `bigbench==1.0.0` sdist, and Pang & Lee's sentence
polarity CSV shipped in Debian's `python3-pattern`.

Generation rows follow one rule: the training text is exactly `prompt + completion`, and choice i is scored as
`prompt + choices[i]`. Prompts end in "Answer:", completions and choices carry their own leading space, and
`completion.startswith(choices[answer])` holds for every built-in generation task.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from ..config import check_choices
from .kinds import TaskKind
from .sources import BIGBENCH, PANG_LEE_CSV, PATTERN_DEB, bigbench_file, pang_lee_file
from .user_input import MAX_LABELS, UserError, check_regular_file, read_lines

# Splits never depend on a run's seed: every run and every method sees the same rows.
SPLIT_SEED = 1234

MAX_PROMPT_WORDS = 120  # drops 17 of 7,688 math questions; keeps every prompt within a couple hundred tokens


@dataclass
class Task:
    """Classification rows: {"text": str, "label": int}. Generation rows: {"prompt", "completion", "choices",
    "answer"}, where choices/answer are None for free-form data (see the module docstring for the text rule)."""

    name: str
    kind: TaskKind
    labels: list[str] | None
    splits: dict[str, list[dict]]  # "train", "dev", "test"

    def __post_init__(self):
        check_choices(self)

    def split_info(self) -> dict:
        return {split: {"size": len(rows), "sha256": rows_sha256(rows)} for split, rows in self.splits.items()}


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: what `astra tasks` lists, how its rows are split, and `build`, which fetches (first use
    only) and reads the raw data into (labels or None, rows, group keys or None)."""

    name: str
    kind: TaskKind
    description: str
    source: str
    n_test: int
    n_dev: int
    build: Callable[[], tuple] = field(compare=False, repr=False)

    def __post_init__(self):
        check_choices(self)


def rows_sha256(rows: list[dict]) -> str:
    canonical = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def fixed_split(rows: list[dict], n_test: int, n_dev: int, groups: list[str] | None = None) -> dict[str, list[dict]]:
    """Shuffle with SPLIT_SEED and cut test, dev, then train. Rows sharing a group key (the same question, or an
    NLI premise's minimal pairs) stay in one split, so a split can overshoot its size by less than one group."""
    keys = groups if groups is not None else [str(i) for i in range(len(rows))]
    members: dict[str, list[dict]] = defaultdict(list)
    for key, row in zip(keys, rows):
        members[key].append(row)
    order = list(members)  # first-appearance order, so the shuffle only depends on the data and SPLIT_SEED
    random.Random(SPLIT_SEED).shuffle(order)
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for key in order:
        name = "test" if len(splits["test"]) < n_test else "dev" if len(splits["dev"]) < n_dev else "train"
        splits[name].extend(members[key])
    if not splits["train"]:
        raise UserError(f"{len(rows)} rows are too few for {n_test} test and {n_dev} dev rows")
    return splits


def _clean(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------- built-in tasks
def _bigbench_examples(key: str) -> list[dict]:
    """Examples with exact duplicates dropped, and dropped entirely when copies disagree on the answer."""
    examples = json.loads(bigbench_file(key).read_text(encoding="utf-8"))["examples"]
    seen: dict[str, list[dict]] = defaultdict(list)
    for ex in examples:
        seen[json.dumps([ex["input"], sorted(ex.get("target_scores", {}))])].append(ex)
    out = []
    for copies in seen.values():
        answers = {json.dumps(c.get("target_scores"), sort_keys=True) for c in copies}
        if len(answers) == 1:
            out.append(copies[0])
    return out


def _correct(ex: dict) -> str:
    return max(ex["target_scores"], key=ex["target_scores"].get)


def _mr():
    with open(pang_lee_file(), encoding="utf-8-sig", newline="") as f:
        rows = [{"text": _clean(text), "label": int(value == "1")} for value, text in csv.reader(f)]
    return ["negative", "positive"], rows, None


def _intent():
    examples = _bigbench_examples("intent_recognition")
    intents = sorted(examples[0]["target_scores"])
    rows = [{"text": _clean(ex["input"].removeprefix("Utterance:")), "label": intents.index(_correct(ex))}
            for ex in examples]
    return [i.replace("_", " ") for i in intents], rows, None


def _nli():
    labels = ["entailment", "neutral", "contradiction"]
    examples = _bigbench_examples("presuppositions_as_nli")
    rows, groups = [], []
    for ex in examples:
        body = ex["input"].strip().removesuffix("The answer is:").strip()
        first, second = body.split("\nSentence 2:")
        text = f"{_clean(first)}\nSentence 2: {_clean(second)}"
        rows.append({"text": text, "label": labels.index(_correct(ex))})
        groups.append(ex["comment"]["example_id"])  # minimal pairs share a premise: keep them together
    return labels, rows, groups


def _strategyqa_yn():
    rows = [{"text": _clean(ex["input"]), "label": int(_correct(ex) == "Yes")}
            for ex in _bigbench_examples("strategyqa")]
    return ["no", "yes"], rows, None


def _mc_row(question: str, choices: list[str], answer: int, completion: str | None = None) -> dict:
    choices = [" " + _clean(c) for c in choices]
    return {"prompt": f"Question: {_clean(question)}\nAnswer:", "completion": completion or choices[answer],
            "choices": choices, "answer": answer}


def _strategyqa():
    rows = []
    for ex in _bigbench_examples("strategyqa"):
        answer = ["Yes", "No"].index(_correct(ex))
        target = _clean(ex["target"])  # "Yes. <rationale>" as BIG-bench gives it
        if not target.startswith(("Yes", "No")[answer]):
            target = f"{('Yes', 'No')[answer]}. {target}"
        rows.append(_mc_row(ex["input"], ["Yes", "No"], answer, " " + target))
    return None, rows, None


def _multiple_choice(key: str):
    def build():
        rows = []
        for ex in _bigbench_examples(key):
            if len(ex["input"].split()) > MAX_PROMPT_WORDS:
                continue
            choices = list(ex["target_scores"])
            rows.append(_mc_row(ex["input"], choices, choices.index(_correct(ex))))
        return None, rows, None
    return build


BUILTIN_TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("mr", "classification", "Pang & Lee movie-review sentence polarity (negative/positive)",
             f"debian:{PATTERN_DEB} {PANG_LEE_CSV}", 500, 200, build=_mr),
    TaskSpec("intent", "classification", "Utterance intent, 7 classes (BIG-bench intent_recognition)",
             f"pypi:{BIGBENCH} intent_recognition", 200, 100, build=_intent),
    TaskSpec("nli", "classification", "Presupposition NLI: entailment/neutral/contradiction",
             f"pypi:{BIGBENCH} presuppositions_as_nli", 200, 100, build=_nli),
    TaskSpec("strategyqa-yn", "classification", "StrategyQA question classified as no/yes",
             f"pypi:{BIGBENCH} strategyqa", 500, 200, build=_strategyqa_yn),
    TaskSpec("strategyqa", "generation", "StrategyQA: ' Yes.'/' No.' then the rationale; scored Yes vs No",
             f"pypi:{BIGBENCH} strategyqa", 500, 200, build=_strategyqa),
    TaskSpec("math-qa", "generation", "Elementary math word problems, multiple choice by log-likelihood",
             f"pypi:{BIGBENCH} elementary_math_qa/question_only", 500, 200, build=_multiple_choice("elementary_math_qa")),
    TaskSpec("social-iqa", "generation", "Social IQa commonsense, 3-way multiple choice by log-likelihood",
             f"pypi:{BIGBENCH} social_iqa", 500, 200, build=_multiple_choice("social_iqa")),
]}
BUILTIN_CORPORA = {"xsum": "GEM XSum news articles (BIG-bench gem/xsum, 1,001 articles), for calibration only"}


def load_task(name: str) -> Task:
    """A built-in task (fetched on first use) or, for a path ending in .jsonl, load_jsonl_task(path)."""
    if name in BUILTIN_CORPORA:
        raise UserError(f"{name!r} is a calibration corpus, not a task: use load_text_corpus({name!r})")
    if name not in BUILTIN_TASKS:
        if name.endswith(".jsonl") and Path(name).exists():
            return load_jsonl_task(name)
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} (or a .jsonl path)")
    spec = BUILTIN_TASKS[name]
    labels, rows, groups = spec.build()
    return Task(name, spec.kind, labels, fixed_split(rows, spec.n_test, spec.n_dev, groups or _group_keys(rows)))


def _group_keys(rows: list[dict]) -> list[str]:
    """The same text or prompt never lands in two splits (an empty prompt groups by its completion)."""
    return [row["text"] if "text" in row else row["prompt"].strip() or row["completion"] for row in rows]


# One text in FORGETTING_SHARE of every text corpus is held out for the forgetting measure (--forgetting-data):
# calibration on the same corpus never samples it. Chosen by the text's own hash, not its position, so the split
# does not depend on the corpus's order or size, and a text that occurs twice lands on one side only.
FORGETTING_SHARE = 4
CORPUS_PARTS = ("forgetting", "calibration")


def is_forgetting_text(text: str) -> bool:
    """Whether `text` lies in its corpus's fixed forgetting share (see FORGETTING_SHARE)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % FORGETTING_SHARE == 0


def load_text_corpus(name: str, part: str | None = None) -> list[str]:
    """Calibration texts: "xsum" articles, a built-in task's training texts (prompt + completion for generation),
    or the training texts of a .jsonl file / the non-empty lines of a .txt file.

    Args:
        name: The corpus: xsum, a built-in task, or a .jsonl/.txt path.
        part: None: every text (calibration when no forgetting is measured on this corpus). "forgetting": only the
            held-out share the forgetting measure scores. "calibration": every text but that share, for
            calibration on the corpus the forgetting measure scores, so the two never share a text.

    Raises:
        KeyError: An unknown corpus. ValueError: An unknown `part`.
    """
    if part not in (None, *CORPUS_PARTS):
        raise ValueError(f"part must be None or one of {CORPUS_PARTS}, got {part!r}")
    texts = _corpus_texts(name, "--forgetting-data" if part == "forgetting" else "--calibration-data")
    if part is None:
        return texts
    return [t for t in texts if is_forgetting_text(t) == (part == "forgetting")]


def _corpus_texts(name: str, what: str) -> list[str]:
    if name == "xsum":
        examples = json.loads(bigbench_file("xsum").read_text(encoding="utf-8"))["examples"]
        return [ex["input"].strip() for ex in examples]
    if name in BUILTIN_TASKS or name.endswith(".jsonl"):
        task = load_task(name)
        return [r["text"] if task.kind == "classification" else r["prompt"] + r["completion"]
                for r in task.splits["train"]]
    if name.endswith(".txt") and Path(name).exists():
        path = check_regular_file(name, what)
        return [line.strip() for _, line in read_lines(path, what) if line.strip()]
    raise KeyError(f"unknown corpus {name!r}; use xsum, a built-in task ({', '.join(BUILTIN_TASKS)}), "
                   f"or a .jsonl/.txt path")


# ------------------------------------------------------------------------------------------------ user data
def _read_jsonl(path: Path, what: str = "--data") -> list[tuple[int, dict]]:
    """Rows of a JSONL file, refused before any allocation if it is not a bounded regular file (a directory, a
    FIFO, /dev/zero), and line by line with a size limit, naming the line of any fault."""
    path = check_regular_file(path, what)
    rows = []
    for lineno, line in read_lines(path, what):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: bad JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit integer; nesting deeper than Python's stack
            raise UserError(f"{path}:{lineno}: bad JSON ({str(exc).splitlines()[0][:80] or type(exc).__name__})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _row_kind(path: Path, lineno: int, row: dict) -> str:
    gen, cls = {"prompt", "completion"} & row.keys(), {"text", "label"} & row.keys()
    if gen and cls:
        raise UserError(f"{path}:{lineno}: mixes generation keys {sorted(gen)} with classification keys {sorted(cls)}")
    if not gen and not cls:
        raise UserError(f"{path}:{lineno}: needs keys prompt+completion (generation) or text+label (classification)")
    needed = ("prompt", "completion") if gen else ("text", "label")
    for key in needed:
        if key not in row:
            raise UserError(f"{path}:{lineno}: missing key {key!r}")
    return "generation" if gen else "classification"


def _generation_row(path: Path, lineno: int, row: dict) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise UserError(f"{path}:{lineno}: prompt and completion must be strings")
    if not completion.strip():
        raise UserError(f"{path}:{lineno}: empty completion")
    choices, answer = row.get("choices"), row.get("answer")
    if (choices is None) != (answer is None):
        raise UserError(f"{path}:{lineno}: give both choices and answer, or neither")
    if choices is not None and not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
                                    and isinstance(answer, int) and not isinstance(answer, bool)
                                    and 0 <= answer < len(choices)):
        raise UserError(f"{path}:{lineno}: choices must be a non-empty list of strings and answer an index into it")
    if choices is not None:
        # An empty choice scores 0 (the best) and two equal ones share a score: either decides accuracy by itself.
        if any(not c.strip() for c in choices):
            raise UserError(f"{path}:{lineno}: a choice is empty")
        if len(set(choices)) != len(choices):
            raise UserError(f"{path}:{lineno}: choices repeat ({choices!r}); each must be different")
        if len(choices) > MAX_LABELS:
            raise UserError(f"{path}:{lineno}: {len(choices)} choices, above the limit of {MAX_LABELS}")
    return {"prompt": prompt, "completion": completion, "choices": choices, "answer": answer}


def _check_label(path: Path, lineno: int, row: dict) -> None:
    text, label = row["text"], row["label"]
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{path}:{lineno}: empty text" if isinstance(text, str) else f"{path}:{lineno}: text must be a string")
    if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "" or (isinstance(label, int) and label < 0):
        raise UserError(f"{path}:{lineno}: label must be a non-empty string or a non-negative integer, got {label!r}")
    # An integer label k makes a head of k + 1 classes: 10**7 would allocate gigabytes before the first step.
    if isinstance(label, int) and label >= MAX_LABELS:
        raise UserError(f"{path}:{lineno}: label {label} is above the limit of {MAX_LABELS} classes "
                        f"(integer labels are class ids 0..{MAX_LABELS - 1})")


def load_jsonl_task(train_path, eval_path=None, *, name: str | None = None) -> Task:
    """A task from JSON-lines files of {"prompt","completion"} or {"text","label"} rows (label: a string or an
    int; string labels get ids in sorted order). Without eval_path, test and dev (10% each, at most 200 rows) are
    carved from train with SPLIT_SEED; with it, eval_path is the test split and dev is carved from train."""
    files = [(Path(train_path), _read_jsonl(Path(train_path), "--data"))]
    if eval_path is not None:
        files.append((Path(eval_path), _read_jsonl(Path(eval_path), "--eval-data")))
    first_path, (first_line, first_row) = files[0][0], files[0][1][0]
    kind = _row_kind(first_path, first_line, first_row)
    for path, rows in files:
        for lineno, row in rows:
            if (k := _row_kind(path, lineno, row)) != kind:
                raise UserError(f"{path}:{lineno}: mixed kinds: this row is {k} but {first_path}:{first_line} is {kind}")
    labels = None
    if kind == "generation":
        parsed = [[_generation_row(path, n, r) for n, r in rows] for path, rows in files]
    else:
        seen_type = None
        for path, rows in files:
            for lineno, row in rows:
                _check_label(path, lineno, row)
                seen_type = seen_type or type(row["label"])
                if type(row["label"]) is not seen_type:
                    raise UserError(f"{path}:{lineno}: label {row['label']!r} mixes string and integer labels")
        distinct: dict = {}
        for path, rows in files:
            for lineno, row in rows:
                distinct.setdefault(row["label"], f"{path}:{lineno}")
                if len(distinct) > MAX_LABELS:
                    raise UserError(f"{path}:{lineno}: more than {MAX_LABELS} distinct labels; a head of that many "
                                    f"classes is refused")
        values = list(distinct)
        labels = sorted(values) if seen_type is str else [str(i) for i in range(max(values) + 1)]
        if len(labels) < 2:
            # One class makes transformers build a regression head (MSE on one logit): accuracy would be 1.00.
            raise UserError(f"{files[0][0]}: every row has label {values[0]!r}; classification needs at least two "
                            f"classes")
        ids = {label: i for i, label in enumerate(labels)} if seen_type is str else None
        parsed = [[{"text": r["text"], "label": ids[r["label"]] if ids else r["label"]} for _, r in rows]
                  for _, rows in files]
    train = parsed[0]
    n_carve = min(200, max(1, len(train) // 10))
    splits = fixed_split(train, 0 if eval_path is not None else n_carve, n_carve, _group_keys(train))
    if eval_path is not None:
        splits["test"] = parsed[1]
    return Task(name or Path(train_path).stem, kind, labels, splits)
