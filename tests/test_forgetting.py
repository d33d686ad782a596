"""The forgetting measure (--forgetting-data, harness/forgetting.py): tiny local models, a stand-in xsum corpus in a
temporary cache, seconds per test."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_harness import (WORDS, finetune, make_classification_jsonl, make_generation_jsonl,  # noqa: F401
                          make_tiny_bert, make_tiny_llama)

pytestmark = pytest.mark.usefixtures("one_thread")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_ARTICLES = 240


def _article(i: int) -> str:
    rng = random.Random(1000 + i)
    return " ".join(rng.choices([w for w in WORDS if w.isalpha()], k=rng.randrange(45, 70))) + " ."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting")
    cache = root / "cache"
    xsum = cache / "data" / "bigbench" / "gem" / "xsum" / "task.json"
    xsum.parent.mkdir(parents=True)
    articles = [_article(i) for i in range(N_ARTICLES)]
    xsum.write_text(json.dumps({"examples": [{"input": " " + a + "\n", "target": "x"} for a in articles]}))
    return {"llama": str(make_tiny_llama(root / "llama")), "bert": str(make_tiny_bert(root / "bert")),
            "gen": str(make_generation_jsonl(root / "gen.jsonl")),
            "cls": str(make_classification_jsonl(root / "cls.jsonl")),
            "cache": str(cache), "articles": articles, "root": root}


@pytest.fixture(autouse=True)
def fake_cache(tiny, monkeypatch):
    """The built-in corpus `xsum`, read from a temporary cache holding the stand-in articles (never fetched)."""
    monkeypatch.setenv("ASTRA_PEFT_CACHE", tiny["cache"])


def _held_out(text: str) -> bool:
    """The forgetting share, written out here independently of tasks.is_forgetting_text: 1 in 4 by SHA-256."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 4 == 0


def _independent_loss(model_dir: str, texts: list[str], max_length: int) -> float:
    """Mean token loss by transformers' own loss, one text at a time, token-weighted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, truncation=True, max_length=max_length)["input_ids"]])
            n = ids.shape[1] - 1
            total += model(input_ids=ids, labels=ids).loss.item() * n
            tokens += n
    return total / tokens


FORGET = dict(forgetting_data="xsum", forgetting_samples=24, forgetting_max_length=40)


# ------------------------------------------------------------------------------------------- the corpus split


def test_corpus_split_is_fixed_by_hash_and_disjoint(tiny):
    from astra_peft.harness.tasks import load_text_corpus

    every = load_text_corpus("xsum")
    forgetting, calibration = load_text_corpus("xsum", "forgetting"), load_text_corpus("xsum", "calibration")
    assert every == tiny["articles"]  # unchanged without a part: runs without the measure calibrate as before
    assert forgetting == [a for a in every if _held_out(a)]
    assert calibration == [a for a in every if not _held_out(a)]
    assert not set(forgetting) & set(calibration) and len(forgetting) + len(calibration) == len(every)
    assert 0.15 * len(every) < len(forgetting) < 0.35 * len(every)
    # by the text, not its place: the same texts whatever the order of the file
    lines = tiny["root"] / "reversed.txt"
    lines.write_text("\n".join(reversed(every)))
    assert sorted(load_text_corpus(str(lines), "forgetting")) == sorted(forgetting)
    with pytest.raises(ValueError, match="part"):
        load_text_corpus("xsum", "train")


# ------------------------------------------------------------------------------------------- the measure


@pytest.mark.parametrize("method", ["lora", "astra"])
def test_before_is_the_base_models_loss_and_a_vanishing_step_forgets_nothing(tiny, tmp_path, method):
    summary = finetune(tiny, tmp_path / "run", method=method, max_steps=1, lr=1e-12, **FORGET)
    texts = [a for a in tiny["articles"] if _held_out(a)][:24]
    expected = _independent_loss(tiny["llama"], texts, 40)
    assert summary["forget_loss_before"] == pytest.approx(expected, rel=1e-5)
    assert summary["forgetting_texts"] == 24 and summary["forgetting_tokens"] == 24 * 39  # every text cut at 40
    assert summary["forgetting_data"] == "xsum"
    # LoRA starts at B = 0; Astra rewrites the base so that W_res + BA = W: both the base function at init
    assert abs(summary["forgetting"]) < 1e-5, summary["forgetting"]
    assert summary["forgetting"] == pytest.approx(summary["forget_loss_after"] - summary["forget_loss_before"])
    assert summary["seconds"]["forgetting"] >= 0


def test_real_training_forgets(tiny, tmp_path):
    summary = finetune(tiny, tmp_path / "run", method="lora", max_steps=6, lr=5e-2, **FORGET)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["forgetting"] == summary["forgetting"]
    assert torch.isfinite(torch.tensor(saved["forgetting"])) and abs(saved["forgetting"]) > 1e-3, saved["forgetting"]
    # the same base, the same texts: "before" does not depend on the method or the rate
    other = finetune(tiny, tmp_path / "other", method="pissa", max_steps=1, lr=1e-12, **FORGET)
    assert other["forget_loss_before"] == pytest.approx(saved["forget_loss_before"], rel=1e-6)


def test_off_by_default_leaves_the_summary_as_it_was(tiny, tmp_path):
    summary = finetune(tiny, tmp_path / "run", max_steps=1)
    assert not {k for k in summary if k.startswith("forget")} and "forgetting" not in summary["seconds"]


# ------------------------------------------------------------------------------------------- calibration


def test_calibration_on_the_same_corpus_never_samples_the_forgetting_texts(tiny, tmp_path, monkeypatch):
    from astra_peft.harness import forgetting

    seen = []
    real = forgetting.check_disjoint

    def spy(calibration_texts, fset, source):
        seen.append((list(calibration_texts), fset))
        return real(calibration_texts, fset, source)

    monkeypatch.setattr(forgetting, "check_disjoint", spy)
    n = 150  # most of the corpus: drawn from all of it, some forgetting texts would be certain to come in
    finetune(tiny, tmp_path / "with", method="astra", max_steps=1, calibration_data="xsum", calibration_samples=n,
             **FORGET)
    (calibration, fset), = seen
    assert len(calibration) == n and not any(_held_out(t) for t in calibration)
    assert not set(calibration) & set(fset.texts)
    # without the measure, the same calibration draws from the whole corpus, as it always did
    seen.clear()
    finetune(tiny, tmp_path / "without", method="astra", max_steps=1, calibration_data="xsum", calibration_samples=n)
    (calibration, fset), = seen
    assert fset is None and any(_held_out(t) for t in calibration)


def test_calibration_file_sharing_a_text_with_the_forgetting_file_is_refused(tiny, tmp_path):
    from astra_peft.harness.validation import UserError

    shared = [a for a in tiny["articles"] if _held_out(a)][0]
    forget, calib = tmp_path / "forget.txt", tmp_path / "calib.txt"
    forget.write_text("\n".join(tiny["articles"]))
    calib.write_text("\n".join([shared] * 40))  # another file, but every line is a forgetting text
    with pytest.raises(UserError, match="--forgetting-data.*also calibration data.*--calibration-data"):
        finetune(tiny, tmp_path / "run", method="astra", max_steps=1, calibration_data=str(calib),
                 forgetting_data=str(forget), forgetting_samples=64)


# ------------------------------------------------------------------------------------------- refusals


def test_forgetting_data_that_overlaps_the_training_rows_is_refused(tiny, tmp_path):
    from astra_peft.harness.validation import UserError

    with pytest.raises(UserError, match="--forgetting-data .* overlaps a training row"):
        finetune(tiny, tmp_path / "run", forgetting_data=tiny["gen"])
    assert not (tmp_path / "run").exists()  # refused before the folder is made


def test_forgetting_on_a_classification_model_is_refused(tiny, tmp_path):
    from astra_peft.harness.validation import UserError

    with pytest.raises(UserError, match="--forgetting-data .*classification"):
        finetune(tiny, tmp_path / "run", model="bert", data="cls", forgetting_data="xsum")


def test_cli_flags_and_one_line_refusals(tiny, tmp_path):
    from astra_peft.harness.cli import build_parser

    text = build_parser().parse_args(["finetune", "--model", "m", "--task", "mr", "--output", "o",
                                      "--forgetting-data", "xsum", "--forgetting-samples", "8",
                                      "--forgetting-max-length", "32"])
    assert (text.forgetting_data, text.forgetting_samples, text.forgetting_max_length) == ("xsum", 8, 32)
    base = [sys.executable, "-c", "import sys; from astra_peft.harness.cli import main; sys.exit(main())",
            "finetune", "--model", tiny["llama"], "--data", tiny["gen"], "--max-steps", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASTRA_PEFT_CACHE": tiny["cache"]}
    for extra, needle in [(["--forgetting-data", tiny["gen"]], "--forgetting-data"),
                          (["--forgetting-data", "xsum", "--forgetting-samples", "0"], "--forgetting-samples"),
                          (["--forgetting-data", "nowhere.csv"], "--forgetting-data")]:
        out = tmp_path / f"run{len(extra)}{needle}"
        done = subprocess.run(base + ["--output", str(out), *extra], capture_output=True, text=True, timeout=300,
                              env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines[-1].startswith("astra: error: ") and needle in lines[-1], done.stderr
        assert "Traceback" not in done.stderr


def test_a_changed_forgetting_setting_is_not_silently_reused(tiny, tmp_path):
    from astra_peft.harness.validation import UserError

    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(tiny["articles"]))
    finetune(tiny, tmp_path / "run", max_steps=1, forgetting_data=str(forget), forgetting_samples=8)
    with pytest.raises(UserError, match="forgetting_samples"):
        finetune(tiny, tmp_path / "run", max_steps=1, forgetting_data=str(forget), forgetting_samples=9)
    forget.write_text("\n".join(tiny["articles"][::-1][:200]))  # the same name, other content
    with pytest.raises(UserError, match="forgetting_sha256"):
        finetune(tiny, tmp_path / "run", max_steps=1, forgetting_data=str(forget), forgetting_samples=8)
    # a run made without the measure is reused as it is by a rerun without it
    first = finetune(tiny, tmp_path / "plain", max_steps=1)
    assert finetune(tiny, tmp_path / "plain", max_steps=1) == first


def test_finetune_prints_the_forgetting_it_measured(tiny, tmp_path, capsys):
    """`astra finetune` ends with the forgetting numbers of summary.json (compare's table has them too); a run
    without --forgetting-data prints no forgetting line."""
    from astra_peft.harness.cli import main

    common = ["finetune", "--model", tiny["llama"], "--data", tiny["gen"], "--method", "lora", "--max-steps", "3",
              "--batch-size", "4", "--rank", "4", "--lr", "5e-2", "--no-progress"]
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "run"), "--forgetting-data", "xsum", "--forgetting-samples",
                          "24", "--forgetting-max-length", "40"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert abs(saved["forgetting"]) > 1e-3  # a sign that could be printed wrong
    lines = [line for line in out.splitlines() if line.startswith("  forgetting")]
    assert lines == [f"  forgetting (24 held-out xsum texts, {24 * 39:,} tokens): loss before "
                     f"{saved['forget_loss_before']:.4f}, after {saved['forget_loss_after']:.4f}, forgetting "
                     f"(after − before) {saved['forgetting']:+.4f}"], out
    assert main(common + ["--output", str(tmp_path / "plain")]) == 0
    assert "forgetting" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- compare


def test_compare_table_csv_and_plot_show_forgetting(tiny, tmp_path):
    from astra_peft.harness.compare import run_compare
    from astra_peft.harness.training import FinetuneConfig

    base = FinetuneConfig(model=tiny["llama"], data=tiny["gen"], output=str(tmp_path / "x"), max_steps=2,
                          batch_size=4, lr=5e-2, rank=4, alpha=8, calibration_samples=16, progress=False, **FORGET)
    paths = run_compare(base, "lora,pissa", [0, 1], output=tmp_path / "cmp", log=lambda *_: None)
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "cmp" / "runs").rglob("summary.json"))]
    assert len(runs) == 4 and all("forgetting" in r for r in runs)
    md = Path(paths["summary_md"]).read_text()
    assert "Forgetting (Δ loss)" in md and "24 texts, 936 tokens" in md
    from astra_peft.harness.report import mean_std_cell

    lora = [r["forgetting"] for r in runs if r["method"] == "lora"]
    row = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert row.rstrip(" |").endswith(mean_std_cell(lora, 1.0, 4, signed=True))
    with open(paths["summary_csv"]) as fh:
        table = list(csv.DictReader(fh))
    got = next(r for r in table if r["method"] == "pissa")
    pissa = [r["forgetting"] for r in runs if r["method"] == "pissa"]
    assert float(got["forgetting_mean"]) == pytest.approx(sum(pissa) / 2)
    png = Path(paths["forgetting_png"])
    assert png.name == "forgetting.png" and png.read_bytes()[:4] == b"\x89PNG"
    # the same folder without the measure: the runs are made again, and no stale plot or column stays
    plain = dataclasses.replace(base, forgetting_data=None)
    paths = run_compare(plain, "lora", [0], output=tmp_path / "cmp", log=lambda *_: None)
    assert "forgetting_png" not in paths and not png.exists()
    assert "Forget" not in Path(paths["summary_md"]).read_text()


def test_plot_places_each_method_at_its_seed_mean_and_rings_the_front(tmp_path, monkeypatch):
    from astra_peft.harness import plots

    runs = [{"task": "t", "method": m, "seed": s, "forgetting": f, "final": {"dev": {"loss": y}}}
            for m, s, f, y in [("lora", 0, 0.1, 2.0), ("lora", 1, 0.3, 2.2), ("pissa", 0, 0.5, 1.0),
                               ("milora", 0, 0.6, 2.5)]]  # worse than lora on both counts: off the front
    runs.append({"task": "t", "method": "dora", "seed": 0, "final": {"dev": {"loss": 1.0}}})  # no measure: not drawn
    drawn, notes, rings = [], [], []
    plt = plots._pyplot()
    real_bar, real_note, real_scatter = plt.Axes.errorbar, plt.Axes.annotate, plt.Axes.scatter

    def bar(self, x, y, **kw):
        drawn.append((kw["label"], x[0], y[0], kw["xerr"][0], kw["yerr"][0]))
        return real_bar(self, x, y, **kw)

    def note(self, text, xy, **kw):
        notes.append(text)
        return real_note(self, text, xy, **kw)

    def scatter(self, x, y, **kw):
        rings.append(sorted(zip(x, y)))
        return real_scatter(self, x, y, **kw)

    monkeypatch.setattr(plt.Axes, "errorbar", bar)
    monkeypatch.setattr(plt.Axes, "annotate", note)
    monkeypatch.setattr(plt.Axes, "scatter", scatter)
    plots.plot_forgetting(runs, "dev", tmp_path / "f.png", methods=["lora", "pissa"])
    (l_label, lx, ly, ldx, ldy), (p_label, px, py, pdx, pdy), (m_label, *_) = drawn
    assert (l_label, p_label, m_label) == ("lora", "pissa", "milora") and notes == ["n=2", "n=1", "n=1"]
    # x: the task loss, y: the forgetting, each the mean over seeds with the seeds' sd
    assert (lx, ly) == pytest.approx((2.1, 0.2)) and (ldx, ldy) == pytest.approx((0.1414214, 0.1414214))
    assert (px, py, pdx, pdy) == pytest.approx((1.0, 0.5, 0.0, 0.0))
    assert rings == [[pytest.approx((1.0, 0.5)), pytest.approx((2.1, 0.2))]]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_table_without_the_measure_is_unchanged():
    from astra_peft.harness.report import markdown_table

    run = {"task": "t", "method": "lora", "seed": 0, "final": {"dev": {"accuracy": 0.5}}, "mean_train_loss_last10": 1.0,
           "seconds": {"calibration": 0.0, "initialization": 0.0, "training": 1.0, "evaluation": 1.0}}
    assert "Forget" not in markdown_table([run], "dev")
    assert "Forget" in markdown_table([{**run, "forgetting": 0.1, "forget_loss_before": 1.0,
                                        "forget_loss_after": 1.1}], "dev")
