"""study/seeds5_results.py, the five-seed section of docs/results_tables.md: seeds 3-4 of their own folder pooled
with seeds 0-2 of the main folder, partial data, numbers checked by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "study"))

import paired_stats  # noqa: E402
import seeds5_results as s5  # noqa: E402

A, L, G = "astra:lr=2e-3", "lora:lr=2e-3", "astra:eigen_selection=largest:lr=1e-4"


def run(method, task, seed, loss, accuracy=0.5):
    return {"method": method, "task": task, "seed": seed, "final": {"test": {"loss": loss, "accuracy": accuracy}}}


def test_pooled_takes_seeds_0_to_2_from_main_and_the_rest_from_its_own_folder(monkeypatch):
    folders = {
        "nlg-main": [run(A, "t", 0, 2.0), run(A, "t", 3, 9.0),  # seed 3 of the main folder: not pooled
                     run("pissa:lr=5e-4", "t", 0, 2.0),  # a spec the phase does not run: left out
                     run(A, "other", 0, 2.0)],  # a task the phase does not run: left out
        "seeds5-nlg": [run(A, "t", 3, 2.5), run(A, "t", 1, 7.0),  # seed 1 here: never mixed in
                       {"method": A, "task": "t", "seed": 4, "final": {}}],  # unfinished
    }
    monkeypatch.setattr(s5.pack_runs, "collect_runs", lambda folder: folders[folder])
    runs = s5.pooled("nlg", [A, L], ["t"])
    assert sorted((r["seed"], r["final"]["test"]["loss"]) for r in runs) == [(0, 2.0), (3, 2.5)]


def test_paired_rows_on_first_seeds_then_all():
    runs = []
    for seed, other in enumerate([2.1, 2.2, 1.9, 2.3, 2.5]):
        runs += [run(A, "t", seed, 2.0), run(L, "t", seed, other, 0.4 if seed < 4 else 0.6)]

    def row(text):
        line = next(line for line in text.splitlines() if line.startswith(f"| {L} |"))
        return [c.strip() for c in line.strip("|").split("|")]

    first = row(paired_stats.paired_with_default([r for r in runs if r["seed"] < 3], "test", [A, L, G]))
    every = row(paired_stats.paired_with_default(runs, "test", [A, L, G]))
    assert first[1:5] == ["3", "2", "1.000", "+0.0667"]  # 0.1, 0.2, -0.1
    assert every[1:5] == ["5", "4", "0.375", "+0.2000"]  # + 0.3, 0.5
    assert every[-1] == "4"  # the default's accuracy is higher at seeds 0-3
