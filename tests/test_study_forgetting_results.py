"""study/forgetting_results.py, the forgetting section of docs/results_tables.md: synthetic runs with partial data
(methods behind on seeds, missing, a run without the measure), numbers checked by hand."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "study"))

import forgetting_results as fr  # noqa: E402

from astra_peft.harness import plots  # noqa: E402

ORDER = ["lora:lr=2e-3", "astra:lr=2e-3", "pissa:lr=5e-4", "milora:lr=2e-3", "full:lr=1e-4"]


def run(method, task, seed, loss, forgetting, before=3.0, accuracy=0.4):
    return {"method": method, "task": task, "seed": seed, "model": "tiny", "final": {"test": {
        "loss": loss, "accuracy": accuracy, "n": 100}}, "forget_loss_before": before,
        "forget_loss_after": before + forgetting, "forgetting": forgetting, "forgetting_data": "xsum",
        "forgetting_texts": 32, "forgetting_tokens": 8040}


def runs_by_task():
    social = [run("lora:lr=2e-3", "social-iqa", s, 3.0 + s / 10, f) for s, f in zip((0, 1, 2), (0.1, 0.2, 0.3))]
    social += [run("astra:lr=2e-3", "social-iqa", 0, 2.9, 0.15), run("astra:lr=2e-3", "social-iqa", 1, 3.0, 0.35)]
    social += [run("full:lr=1e-4", "social-iqa", 0, 2.5, 0.9),
               run("milora:lr=2e-3", "social-iqa", 7, 3.5, 0.5)]  # a seed LoRA does not have: no pair
    math = [run("lora:lr=2e-3", "math-qa", 0, 2.0, 0.05), run("astra:lr=2e-3", "math-qa", 0, 2.1, 0.10),
            run("astra:lr=2e-3", "math-qa", 1, 2.2, 0.50),  # LoRA has no seed 1 on math-qa: not paired
            run("pissa:lr=5e-4", "math-qa", 0, 1.9, 0.25)]
    without = run("pissa:lr=5e-4", "social-iqa", 0, 3.0, 0.0)
    del without["forgetting"]  # finished without the measure: left out and counted
    return {"social-iqa": social + [without], "math-qa": math}


def _row(text: str, method: str, after: str) -> list[str]:
    """The cells of `method`'s row in the table that follows the line starting with `after`."""
    tail = text[text.index(after):]
    line = next(line for line in tail.splitlines() if line.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_section_tables_pairs_and_front(tmp_path):
    text = fr.section(runs_by_task(), tmp_path / "figures", order=ORDER)
    assert "Left out: 1 finished runs without a forgetting measure" in text
    assert "32 held-out xsum texts, 8,040 tokens" in text and "social-iqa 7, math-qa 4" in text
    # per task: seeds, mean ± sd (a single seed alone), the front of the means
    lora = _row(text, "lora:lr=2e-3", "`social-iqa`")
    assert lora[1:4] == ["3 (0,1,2)", "3.1000 ± 0.1000", "40.00 ± 0.00"]
    assert lora[6] == "+0.2000 ± 0.1000" and lora[4] == "3.0000 ± 0.0000"
    astra = _row(text, "astra:lr=2e-3", "`social-iqa`")
    assert astra[1] == "2 (0,1)" and astra[6] == f"+0.2500 ± {statistics.stdev([0.15, 0.35]):.4f}"
    full = _row(text, "full:lr=1e-4", "`social-iqa`")
    assert full[1:3] == ["1 (0)", "2.5000"] and full[6] == "+0.9000"
    # social-iqa means: lora (3.1, .2), astra (2.95, .25), full (2.5, .9), milora (3.5, .5): milora is dominated
    assert [_row(text, m, "`social-iqa`")[7] for m in ORDER if m != "pissa:lr=5e-4"] == ["yes", "yes", "", "yes"]
    # math-qa: pissa (1.9, .25) beats astra (2.15, .30) on both; lora (2.0, .05) is on the front
    assert [_row(text, m, "`math-qa`")[7] for m in ORDER[:3]] == ["yes", "", "yes"]
    # versus LoRA: astra pairs social 0,1 and math 0 only (math seed 1 has no LoRA twin)
    versus = "Each method against `lora:lr=2e-3`"
    a = _row(text, "astra:lr=2e-3", versus)
    diffs = [0.15 - 0.1, 0.35 - 0.2, 0.10 - 0.05]
    assert a[1] == "3 (math-qa 0; social-iqa 0,1)" and a[2] == "3"
    assert a[4] == f"{statistics.fmean(diffs):+.4f}" == fr.paired_effect(diffs)["mean"]
    assert a[5:8] == [fr.paired_effect(diffs)[k] for k in ("t", "boot", "dz")]
    assert a[8] == f"{(0.15 + 0.35 + 0.10) / (0.1 + 0.2 + 0.05):.2f}"
    assert a[9] == f"{statistics.fmean([2.9 - 3.0, 3.0 - 3.1, 2.1 - 2.0]):+.4f}"
    p = _row(text, "pissa:lr=5e-4", versus)  # one pair: a mean, no interval
    assert p[1:3] == ["1 (math-qa 0)", "1"] and p[4] == "+0.2000" and p[5:8] == ["–", "–", "–"]
    assert _row(text, "milora:lr=2e-3", versus)[1:] == ["0"] + ["–"] * 9  # no shared cell: nothing invented
    assert "![forgetting](figures/forgetting_pareto.png)" in text


def test_pareto_front_ties_and_domination():
    assert plots.pareto_front({"a": (1, 1), "b": (1, 2), "c": (2, 0), "d": (2, 0), "e": (3, 3)}) == {"a", "c", "d"}
    assert plots.pareto_front({}) == set()


def test_partial_data_never_crashes_nor_invents(tmp_path):
    figures = tmp_path / "figures"
    assert "No finished runs with a forgetting measure yet" in fr.section({"social-iqa": [], "math-qa": []}, figures)
    assert not figures.exists()
    no_lora = {"social-iqa": [run("astra:lr=2e-3", "social-iqa", 0, 2.9, 0.1)], "math-qa": []}
    text = fr.section(no_lora, figures, order=ORDER)
    assert "No LoRA run has finished yet" in text and "`math-qa`" not in text
    alone = {"social-iqa": [run("lora:lr=2e-3", "social-iqa", 0, 2.9, 0.1)], "math-qa": []}
    assert "No method but `lora:lr=2e-3` has finished yet" in fr.section(alone, figures, order=ORDER)


def test_figure_is_written_the_same_every_time(tmp_path):
    fr.section(runs_by_task(), tmp_path / "one", order=ORDER)
    fr.section(runs_by_task(), tmp_path / "two", order=ORDER)
    first = (tmp_path / "one" / fr.FIGURE).read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first == (tmp_path / "two" / fr.FIGURE).read_bytes()


@pytest.mark.parametrize("values", [[0.1], [0.1, 0.3]])
def test_single_seed_shows_no_spread(values, tmp_path):
    runs = [run("lora:lr=2e-3", "social-iqa", s, 3.0, v) for s, v in enumerate(values)]
    cell = _row(fr.section({"social-iqa": runs}, tmp_path), "lora:lr=2e-3", "`social-iqa`")[6]
    assert ("±" in cell) == (len(values) > 1)
