"""Issue 16, as a careless or hostile user: one row per bad input, each asserting what a user must see.

For the command line every row asserts: exit code 2; exactly one `astra: error:` line, the last one on stderr,
naming the flag, file or line at fault (the row's needles); no traceback; and nothing written where it should not
be (rows refused before anything runs leave no --output at all; rows that fail mid-run leave no summary.json and
only strictly valid JSON). Rows that could block or exhaust memory on a build without the checks (a FIFO,
/dev/zero, a huge file) run in a subprocess with a timeout and an address-space limit.

Library rows (statistics files, evaluation over nothing) assert a ValueError that names the file or the cause.
Every row fails on the code before issue 16's fixes (db7be23); docs/reliability.md has the counts and commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import pytest

from test_harness import make_classification_jsonl, make_generation_jsonl, make_tiny_bert, make_tiny_llama  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = ["--max-steps", "2", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--lr", "5e-3",
        "--calibration-samples", "16", "--no-progress"]


# ------------------------------------------------------------------------------------------------ the world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny local models and data shared by every row (rows never write here; a row asserts it)."""
    import torch
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("adversarial")
    w = {"root": root, "llama": make_tiny_llama(root / "llama"), "bert": make_tiny_bert(root / "bert"),
         "gen": make_generation_jsonl(root / "gen.jsonl"), "cls": make_classification_jsonl(root / "cls.jsonl")}
    nan = root / "nanllama"
    make_tiny_llama(nan)
    model = LlamaForCausalLM.from_pretrained(nan)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    w["nan"] = nan
    return w


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if not p.is_fifo()}


# ------------------------------------------------------------------------------------------------ the rows

@dataclasses.dataclass
class Case:
    id: str
    kind: str  # the class of issue 16 it belongs to (docs/reliability.md counts rows per class)
    argv: Callable[[dict], list]  # w → argv; w holds the world's paths plus "tmp" (this row's folder) and "out"
    needles: Callable[[dict], list]  # what the one error line must name
    setup: Optional[Callable[[dict], None]] = None
    env: Optional[Callable[[dict], dict]] = None
    isolated: bool = False  # run in a subprocess with a timeout and a memory limit
    writes: str = "none"  # "none": --output must not exist | "run": no summary.json, only valid JSON | "compare"


def finetune(*extra, data="gen", model="llama", method="lora", fast=FAST):
    """argv for `astra finetune` with the world's tiny model and data; `extra` may override any of FAST."""
    def build(w):
        args = ["finetune", "--model", str(w[model]) if model in w else model]
        if data is not None:
            args += ["--data", str(w[data]) if data in w else data]
        return [*args, "--method", method, "--output", str(w["out"]), *fast, *[a(w) if callable(a) else a
                                                                              for a in extra]]
    return build


def _write(name, text=None, data: bytes | None = None):
    def setup(w):
        path = w["tmp"] / name
        path.write_bytes(data) if data is not None else path.write_text(text)
        w[name] = path
    return setup


def _rows(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


GEN_ROW = {"prompt": "Question: is one more than two ?\nAnswer:", "completion": " no", "choices": [" yes", " no"],
           "answer": 1}


def _gen_rows(n):
    """n generation rows with distinct prompts (rows with one prompt form one group and one split)."""
    return [{**GEN_ROW, "prompt": f"Question: is {i} more than {i + 1} ?\nAnswer:"} for i in range(n)]


def _cls_rows(n):
    return [{"text": f"row {i} great" if i % 2 else f"row {i} awful", "label": i % 2} for i in range(n)]


def _mkfifo(name):
    def setup(w):
        os.mkfifo(w["tmp"] / name)
        w[name] = w["tmp"] / name
    return setup


def _sparse(name, size):
    def setup(w):
        with open(w["tmp"] / name, "wb") as fh:
            fh.truncate(size)  # a hole: no disk used, but every byte reads as zero
        w[name] = w["tmp"] / name
    return setup


def _readonly_parent(w):
    return "/sys/astra-adversarial/out"  # a folder no one, root included, may create anything in (EPERM)


SETTINGS = "settings (non-finite or nonsensical)"
TRAINING = "non-finite during training"
BOUNDED = "bounded inputs"
MISTAKES = "user mistakes (tracebacks before)"
CONFINED = "confined option files"
MODEL = "wrong model class"

CASES = [
    # --- settings: refused before anything runs, naming the flag
    Case("alpha-nan", SETTINGS, finetune("--alpha", "nan"), lambda w: ["--alpha", "nan"]),
    Case("alpha-inf", SETTINGS, finetune("--alpha", "inf"), lambda w: ["--alpha", "inf"]),
    Case("alpha-zero", SETTINGS, finetune("--alpha", "0"), lambda w: ["--alpha"]),
    Case("lr-inf", SETTINGS, finetune("--lr", "inf"), lambda w: ["--lr", "inf"]),
    Case("lr-zero", SETTINGS, finetune("--lr", "0"), lambda w: ["--lr"]),
    Case("lr-negative", SETTINGS, finetune("--lr=-1e-3"), lambda w: ["--lr"]),
    Case("weight-decay-nan", SETTINGS, finetune("--weight-decay", "nan"), lambda w: ["--weight-decay"]),
    Case("warmup-nan", SETTINGS, finetune("--warmup", "nan"), lambda w: ["--warmup"]),
    Case("max-grad-norm-negative", SETTINGS, finetune("--max-grad-norm", "-1"), lambda w: ["--max-grad-norm"]),
    Case("epochs-inf", SETTINGS, finetune("--max-steps", "-1", "--epochs", "inf"), lambda w: ["--epochs"]),
    Case("max-length-zero", SETTINGS, finetune("--max-length", "0"), lambda w: ["--max-length"]),
    Case("max-length-one", SETTINGS, finetune("--max-length", "1"), lambda w: ["--max-length"]),
    Case("max-steps-zero", SETTINGS, finetune("--max-steps", "0"), lambda w: ["--max-steps"]),
    Case("eval-samples-negative", SETTINGS, finetune("--eval-samples", "-3"), lambda w: ["--eval-samples"]),
    Case("eval-samples-zero", SETTINGS, finetune("--eval-samples", "0"), lambda w: ["--eval-samples"]),
    Case("grad-accum-zero", SETTINGS, finetune("--grad-accum", "0"), lambda w: ["--grad-accum"]),
    Case("batch-size-zero", SETTINGS, finetune("--batch-size", "0"), lambda w: ["--batch-size"]),
    Case("eval-batch-size-zero", SETTINGS, finetune("--eval-batch-size", "0"), lambda w: ["--eval-batch-size"]),
    Case("rank-zero", SETTINGS, finetune("--rank", "0"), lambda w: ["--rank"]),
    Case("train-samples-zero", SETTINGS, finetune("--train-samples", "0"), lambda w: ["--train-samples"]),
    Case("calibration-samples-zero", SETTINGS, finetune("--calibration-samples", "0", method="astra"),
         lambda w: ["--calibration-samples"]),
    Case("seed-negative", SETTINGS, finetune("--seed", "-1"), lambda w: ["--seed"]),
    Case("eval-split-train", SETTINGS, finetune("--eval-split", "train"), lambda w: ["--eval-split"]),
    Case("spec-alpha-nan", SETTINGS, finetune(method="astra:alpha=nan"), lambda w: ["astra:alpha=nan", "alpha"]),
    Case("spec-lr-inf", SETTINGS, finetune(method="lora:lr=inf"), lambda w: ["lora:lr=inf", "lr"]),
    Case("spec-rank-zero", SETTINGS, finetune(method="lora:rank=0"), lambda w: ["lora:rank=0", "rank"]),
    # --- training that produces non-finite numbers stops, naming the step
    Case("lr-huge-lora", TRAINING, finetune("--lr", "1e30", "--max-steps", "4"), lambda w: ["step"], writes="run"),
    Case("lr-huge-full", TRAINING, finetune("--lr", "1e30", "--max-steps", "4", method="full"), lambda w: ["step"], writes="run"),
    # --- bounded inputs: file types and sizes checked before anything is read or allocated
    Case("data-dev-zero", BOUNDED, finetune(data="/dev/zero"), lambda w: ["--data", "/dev/zero"], isolated=True),
    Case("data-fifo", BOUNDED, finetune(data="fifo.jsonl"), lambda w: ["--data", "FIFO"],
         setup=_mkfifo("fifo.jsonl"), isolated=True),
    Case("data-huge-file", BOUNDED, finetune(data="huge.jsonl"), lambda w: ["--data", "huge.jsonl", "bytes"],
         setup=_sparse("huge.jsonl", (1 << 30) + 1), isolated=True),
    Case("calibration-fifo", BOUNDED, finetune("--calibration-data", lambda w: str(w["calib.txt"]), method="astra"),
         lambda w: ["--calibration-data", "FIFO"], setup=_mkfifo("calib.txt"), isolated=True),
    Case("data-long-line", BOUNDED, finetune(data="long.jsonl"), lambda w: ["long.jsonl:1", "longer than"],
         setup=_write("long.jsonl", _rows([{**GEN_ROW, "prompt": "x " * (3 << 20)}, *_gen_rows(30)]))),
    Case("label-ten-million", BOUNDED, finetune(data="big.jsonl"), lambda w: ["big.jsonl:31", "10000000"],
         setup=_write("big.jsonl", _rows([*_cls_rows(30), {"text": "c d", "label": 10**7}])), isolated=True),
    Case("labels-1001-distinct", BOUNDED, finetune(data="many.jsonl"), lambda w: ["many.jsonl:1001", "1000"],
         setup=_write("many.jsonl", _rows([{"text": f"row {i}", "label": f"L{i}"} for i in range(1200)]))),
    Case("label-5000-digits", BOUNDED, finetune(data="digits.jsonl"), lambda w: ["digits.jsonl:1"],
         setup=_write("digits.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n")),
    Case("data-not-utf8", BOUNDED, finetune(data="latin.jsonl"), lambda w: ["latin.jsonl:2", "UTF-8"],
         setup=_write("latin.jsonl", data=(json.dumps(GEN_ROW) + "\n").encode() + b'{"prompt": "caf\xe9"}\n')),
    Case("choices-empty", BOUNDED, finetune(data="empty.jsonl"), lambda w: ["empty.jsonl:1", "choice"],
         setup=_write("empty.jsonl", _rows([{**r, "choices": ["", " no"]} for r in _gen_rows(30)]))),
    Case("choices-repeat", BOUNDED, finetune(data="twice.jsonl"), lambda w: ["twice.jsonl:1", "choices"],
         setup=_write("twice.jsonl", _rows([{**r, "choices": [" no", " no"]} for r in _gen_rows(30)]))),
    Case("labels-one-class", BOUNDED, finetune(data="one.jsonl"), lambda w: ["one.jsonl", "two classes"],
         setup=_write("one.jsonl", _rows([{"text": f"row {i}", "label": "only"} for i in range(30)]))),
    # --- user mistakes: one line naming the flag or file, never a traceback
    Case("data-directory", MISTAKES, finetune(data="root"), lambda w: ["--data", "directory"]),
    Case("data-missing", MISTAKES, finetune(data="nope.jsonl"), lambda w: ["--data", "nope.jsonl"]),
    Case("eval-data-directory", MISTAKES, finetune("--eval-data", lambda w: str(w["root"])),
         lambda w: ["--eval-data", "directory"]),
    Case("eval-data-with-task", MISTAKES, finetune("--task", "mr", "--eval-data", lambda w: str(w["gen"]), data=None),
         lambda w: ["--eval-data"]),
    Case("output-is-file", MISTAKES, finetune(), lambda w: ["--output", "file"],
         setup=lambda w: (w["tmp"] / "out").write_text("mine\n"), writes="keep"),
    Case("output-under-file", MISTAKES,
         lambda w: finetune()({**w, "out": w["tmp"] / "afile" / "out"}), lambda w: ["--output", "afile"],
         setup=lambda w: (w["tmp"] / "afile").write_text("mine\n"), writes="keep"),
    Case("output-read-only", MISTAKES, lambda w: finetune()({**w, "out": _readonly_parent(w)}),
         lambda w: ["/sys/astra-adversarial"], writes="keep"),
    Case("model-typo", MISTAKES, finetune(model="smolm2-135m"), lambda w: ["--model", "smolm2-135m"]),
    Case("model-is-file", MISTAKES, finetune(model="gen"), lambda w: ["--model", "gen.jsonl"]),
    Case("model-dir-without-config", MISTAKES, finetune(model="tmp"), lambda w: ["--model", "config.json"]),
    Case("model-nan-weights", MISTAKES, finetune(model="nan"), lambda w: ["--model", "nanllama", "NaN"],
         writes="run"),
    Case("cache-is-file", MISTAKES, finetune(model="smollm2-135m"), lambda w: ["ASTRA_PEFT_CACHE"],
         setup=lambda w: (w["tmp"] / "cachefile").write_text("x"),
         env=lambda w: {"ASTRA_PEFT_CACHE": str(w["tmp"] / "cachefile")}),
    Case("task-unknown", MISTAKES, finetune("--task", "mrr", data=None), lambda w: ["mrr"]),
    Case("compare-nan-model-goes-on", MISTAKES,
         lambda w: ["compare", "--model", str(w["nan"]), "--data", str(w["gen"]), "--methods", "lora,lora:lr=1e-3",
                    "--output", str(w["out"]), *FAST],
         lambda w: ["2 of 2 runs failed", "NaN"], writes="compare"),
    Case("compare-seeds-not-integer", MISTAKES,
         lambda w: ["compare", "--model", str(w["llama"]), "--data", str(w["gen"]), "--methods", "lora",
                    "--seeds", "0,one", "--output", str(w["out"]), *FAST], lambda w: ["--seeds", "one"]),
    Case("compare-seeds-repeat", MISTAKES,
         lambda w: ["compare", "--model", str(w["llama"]), "--data", str(w["gen"]), "--methods", "lora",
                    "--seeds", "0,0", "--output", str(w["out"]), *FAST], lambda w: ["--seeds", "twice"]),
    Case("analyze-samples-negative", MISTAKES, lambda w: ["analyze", str(w["tmp"]), "--samples", "-3"],
         lambda w: ["--samples"]),
    # --- method options naming files: confined to the run's --output
    Case("corda-cache-absolute", CONFINED, finetune(method="corda:cache_file=/tmp/astra-adversarial-cache.pt"),
         lambda w: ["cache_file", "--output"]),
    Case("corda-covariance-climbs", CONFINED, finetune(method="corda:covariance_file=../cov.pt"),
         lambda w: ["covariance_file", "--output"]),
    # --- wrong model class
    Case("encoder-given-generation-data", MODEL, finetune(model="bert"), lambda w: ["--model", "bert", "generation"],
         writes="run"),
]


def _run_isolated(argv, env, cwd, timeout=60):
    """The CLI in a subprocess, 6 GiB of address space at most: a build that reads /dev/zero dies, not the box."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
            "from astra_peft.harness.cli import main; sys.exit(main())")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    try:
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        return "timeout", exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    return done.returncode, done.stderr


def _run_inprocess(argv, capsys):
    from astra_peft.harness.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except Exception:  # the old code let some escape main(): that is a traceback for the user
        code = "raised"
        print(traceback.format_exc(), file=sys.stderr)
    return code, capsys.readouterr().err


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path}: bare {name} is not JSON")
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_refuses(case, world, tmp_path, monkeypatch, capsys):
    w = {**world, "tmp": tmp_path, "out": tmp_path / "out"}
    if case.setup:
        case.setup(w)
    argv = [str(a) for a in case.argv(w)]
    env = case.env(w) if case.env else {}
    monkeypatch.chdir(tmp_path)
    world_before, tmp_before = _tree(world["root"]), _tree(tmp_path)
    if case.isolated:
        code, err = _run_isolated(argv, env, tmp_path)
    else:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code, err = _run_inprocess(argv, capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("astra: error:")]
    assert code == 2, f"exit {code}; stderr tail: {lines[-5:]}"
    assert "Traceback" not in err, err[-2000:]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    for needle in case.needles(w):
        assert needle in errors[0], f"{needle!r} not named in: {errors[0]}"

    assert _tree(world["root"]) == world_before, "a file of the model or data folder changed"
    out = Path(w["out"]) if not str(w["out"]).startswith("/sys") else None
    outside = {k: v for k, v in _tree(tmp_path).items() if out is None or not (tmp_path / k).is_relative_to(out)}
    assert outside == {k: v for k, v in tmp_before.items() if out is None or not (tmp_path / k).is_relative_to(out)}, \
        "files written outside --output"
    if case.writes == "none":
        assert not out.exists(), f"refused, yet {out} was made: {sorted(p.name for p in out.rglob('*'))}"
    elif case.writes == "keep":
        pass  # --output is the user's own file, or cannot exist: the tree comparison above covers it
    else:
        assert not list(out.rglob("summary.json")), "a failed run left a summary.json"
        for path in [*out.rglob("*.json"), *out.rglob("*.jsonl")]:
            _strict_json(path)
        if case.writes == "compare":
            errors_txt = list(out.rglob("error.txt"))
            assert len(errors_txt) == 2, "each failed run records its error and the comparison goes on"


# ------------------------------------------------------------------------------------------ statistics files

def _stats_file(tmp_path) -> Path:
    from conftest import lora_config, make_batches, tiny_llama

    from astra_peft import AstraConfig, collect_activation_stats

    stats = collect_activation_stats(tiny_llama(), make_batches(2), lora_config("llama"),
                                     AstraConfig(show_progress=False))
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    return path


def _rewrite(path: Path, edit_tensors=None, edit_meta=None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def _edit_tokens(meta):
    accs = json.loads(meta["accumulators"])
    accs[0][1] = accs[0][1] * 2
    meta["accumulators"] = json.dumps(accs)


def _edit_gram(tensors):
    tensors["acc0.gram"] = tensors["acc0.gram"].clone()
    tensors["acc0.gram"][0, 0] += 1.0


def _edit_sum(tensors):
    tensors["acc0.sum"] = tensors["acc0.sum"] * 1.5


def _extra_tensor(tensors):
    import torch

    tensors["acc99.sum"] = torch.zeros(3)


STATS_CASES = {
    "edited-token-count": lambda p: _rewrite(p, edit_meta=_edit_tokens),
    "edited-gram": lambda p: _rewrite(p, edit_tensors=_edit_gram),
    "edited-sum": lambda p: _rewrite(p, edit_tensors=_edit_sum),
    "extra-tensor": lambda p: _rewrite(p, edit_tensors=_extra_tensor),
    "edited-family": lambda p: _rewrite(p, edit_meta=lambda m: m.update(family="max_normalized")),
}


@pytest.mark.parametrize("edit", list(STATS_CASES))
def test_edited_statistics_file_is_refused(edit, tmp_path):
    from astra_peft.stats import ActivationStats

    path = _stats_file(tmp_path)
    ActivationStats.load(path)  # the untouched file loads
    STATS_CASES[edit](path)
    with pytest.raises(ValueError) as info:
        ActivationStats.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_statistics_from_a_non_regular_file_is_refused(kind, tmp_path):
    """A FIFO is refused before it is opened: an open would block until a writer came (and safetensors holds the
    GIL while it waits, so no thread of this process could play that writer). Hence a subprocess with a timeout:
    a build without the check fails this test instead of hanging it."""
    path = tmp_path / "stats.safetensors"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    code = ("import sys\nfrom astra_peft.stats import ActivationStats\ntry:\n    ActivationStats.load(sys.argv[1])\n"
            "except ValueError as err:\n    print(err); sys.exit(3)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("loading statistics from a FIFO blocked")
    assert done.returncode == 3 and str(path) in done.stdout, (done.returncode, done.stdout, done.stderr[-1000:])


# ------------------------------------------------------------------------------------- metrics over nothing

@pytest.fixture(scope="module")
def llama_and_tokenizer(world):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(world["llama"]), AutoTokenizer.from_pretrained(world["llama"])


def _gen_task(world):
    from astra_peft.harness.tasks import load_jsonl_task

    return load_jsonl_task(world["gen"])


def test_evaluation_over_zero_scored_tokens_is_an_error(world, llama_and_tokenizer):
    """At max_length 1 no completion token can be scored (position t predicts t + 1): loss 0.0 and accuracy
    from ties would be numbers that are not true."""
    from astra_peft.harness.evaluation import evaluate

    model, tokenizer = llama_and_tokenizer
    with pytest.raises(ValueError, match="max-length|max_length"):
        evaluate(model, tokenizer, _gen_task(world), "dev", max_length=1, progress=False)


def test_evaluation_with_negative_sample_count_is_an_error(world, llama_and_tokenizer):
    from astra_peft.harness.evaluation import evaluate

    model, tokenizer = llama_and_tokenizer
    with pytest.raises(ValueError, match="eval-samples"):
        evaluate(model, tokenizer, _gen_task(world), "dev", max_samples=-3, progress=False)


def test_evaluation_of_non_finite_outputs_is_an_error(world, llama_and_tokenizer):
    import copy

    import torch

    from astra_peft.harness.evaluation import evaluate

    model, tokenizer = llama_and_tokenizer
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="not finite"):
        evaluate(broken, tokenizer, _gen_task(world), "dev", progress=False)
