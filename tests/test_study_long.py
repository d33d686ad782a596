"""study/long_results.py, issue 15 §2's section of docs/results_tables.md: the four methods at the main budget
against 5× the steps, each at its own budget's rate; partial data, numbers checked by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "study"))

import long_results as lr  # noqa: E402

LARGEST = lr.LARGEST
# (tuning phase, methods) → rate: what finished tuning phases would choose
TUNED = {("nlg-lr", ("lora", "astra")): "2e-3", ("nlg-lr-largest", (LARGEST,)): "1e-4",
         ("nlg-lr-baselines", ("pissa",)): "5e-4", ("nlu-lr", ("lora", "astra")): "5e-4",
         ("nlu-lr-largest", (LARGEST,)): "1e-4",
         **{("long-lr-nlg", (m,)): "5e-4" for m in ("lora", "astra", LARGEST, "pissa")}}


def fake_tuned(phase, methods):
    return TUNED.get((phase, tuple(methods)))


def run(method, lr_, seed, loss, accuracy, task="social-iqa"):
    return {"method": f"{method}:lr={lr_}", "task": task, "seed": seed,
            "final": {"test": {"loss": loss, "accuracy": accuracy}}}


def test_order_best_first_with_ties():
    assert lr.order({"a": 0.8, "b": 0.7, "c": 0.8}, "accuracy") == "a = c > b"
    assert lr.order({"a": 2.1, "b": 2.0}, "loss") == "b > a"
    assert lr.order({}, "loss") == ""


def test_rates_follow_the_main_tables_rules(monkeypatch):
    monkeypatch.setattr(lr, "_tuned", fake_tuned)
    nlg = lr.rates("nlg")
    assert nlg["lora"] == {"1x": "2e-3", "5x": "5e-4"} and nlg["astra"]["1x"] == "2e-3"
    assert nlg[LARGEST]["1x"] == "1e-4" and nlg["pissa"]["1x"] == "5e-4"  # own rates on NLG
    nlu = lr.rates("nlu")
    assert nlu["pissa"] == {"1x": "5e-4", "5x": None}  # shares the NLU rate; its 5× tuning has not finished


def four_by_three(rates, budget, losses):
    """Runs of the four methods at seeds 0-2; losses[method] = three losses, accuracy 1 − loss / 10."""
    return [run(m, rates[m][budget], s, v, 1 - v / 10) for m, vs in losses.items() for s, v in enumerate(vs)]


def test_complete_section_orders_both_budgets_and_pairs_with_lora(monkeypatch):
    monkeypatch.setattr(lr, "_tuned", fake_tuned)
    rates = lr.rates("nlg")
    main = four_by_three(rates, "1x", {"lora": [2.0, 2.1, 2.2], "astra": [2.1, 2.2, 2.3],
                                       LARGEST: [2.2, 2.3, 2.4], "pissa": [2.3, 2.4, 2.5]})
    main.append(run("lora", "5e-4", 0, 0.1, 0.9))  # LoRA at another rate in the main folder: not its 1× spec
    long = four_by_three(rates, "5x", {"lora": [1.9, 2.0, 2.1], "astra": [1.7, 1.9, 1.8],
                                       LARGEST: [2.5, 2.5, 2.5], "pissa": [1.95, 2.05, 2.15]})
    text = lr.kind_section("nlg", main, long)
    assert "Order by mean loss at 1×: lora > astra > astra:eigen_selection=largest > pissa" in text
    assert "Order by mean loss at 5×: astra > lora > pissa > astra:eigen_selection=largest" in text
    assert "**Order changed**" in text
    row = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert "2.1000 ± 0.1000 (n=3) | 2.0000 ± 0.1000 (n=3)" in row  # the 0.1 run at another rate left out
    astra_5x = next(line for line in text.splitlines() if line.startswith("| astra | 5× |"))
    cells = [c.strip() for c in astra_5x.strip("|").split("|")]
    assert cells[2:6] == ["3", "3", "0.250", "-0.2000"]  # -0.2, -0.1, -0.3
    assert cells[8] == "level"  # t interval -0.2 ± 4.303 · 0.1 / √3 = [-0.448, +0.048] includes 0
    largest_5x = next(line for line in text.splitlines() if line.startswith(f"| {LARGEST} | 5× |"))
    assert "| +0.5000 | [+0.2516, +0.7484] |" in largest_5x and "| higher |" in largest_5x  # 0.6, 0.5, 0.4
    assert cells[-1] == "+2.00"  # accuracy 1 − loss/10: +0.02 → +2 points


def test_partial_data_is_not_decided(monkeypatch):
    monkeypatch.setattr(lr, "_tuned", fake_tuned)
    rates = lr.rates("nlg")
    same = {"lora": [2.0, 2.1, 2.2], "astra": [2.1, 2.2, 2.3], LARGEST: [2.2, 2.3, 2.4], "pissa": [2.3, 2.4, 2.5]}
    long = four_by_three(rates, "5x", same)[:-1]  # PiSSA's seed 2 at 5× not finished
    text = lr.kind_section("nlg", four_by_three(rates, "1x", same), long)
    assert "Not decidable yet: 11 of 12 runs at 5× have finished." in text and "**Order" not in text


def test_nothing_tuned_yet(monkeypatch):
    monkeypatch.setattr(lr, "_tuned", lambda phase, methods: None)
    text = lr.kind_section("nlu", [], [])
    assert "not tuned" in text and "no run yet" in text
    assert "Not decidable yet: 0 of 12 runs at 5× have finished (not yet tuned at 5×: lora, astra," in text
