"""study/variants_results.py applies issue 15 §6's pre-registered rule: decided only on all 21 pairs, 'below' only
when the paired t interval excludes 0; references found by their options and rate."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "study"))

import variants_results as vr  # noqa: E402

S = "astra:eigen_selection=largest:factor_init=lora_scale"
D = "astra:eigen_selection=largest:factor_init=zero_a"
KINDS = {"nlu": ("5e-4", ["mr", "intent", "strategyqa-yn", "nli"]),
         "nlg": ("2e-3", ["strategyqa", "math-qa", "social-iqa"])}


def runs(kind, seeds=(0, 1, 2), s_offset=-0.05, d_offset=(0.01, -0.01)):
    rate, tasks = KINDS[kind]
    out = []
    for t, task in enumerate(tasks):
        for seed in seeds:
            base = 1.0 + t + seed / 100
            losses = {f"lora:lr={rate}": base, f"astra:lr={rate}": base + 0.02,
                      f"astra:eigen_selection=largest:lr={rate}": base + 1.0,  # the shared-rate twin: not a reference
                      "astra:eigen_selection=largest:lr=1e-4": base + 0.01,
                      f"{S}:lr={rate}": base + s_offset + seed / 1000,
                      f"{D}:lr={rate}": base + d_offset[seed % 2]}
            out += [{"method": m, "task": task, "seed": seed, "final": {"test": {"loss": x}}}
                    for m, x in losses.items()]
    return out


def section(monkeypatch, by_kind):
    monkeypatch.setattr(vr.run_study, "phase_runs", lambda phase: by_kind[phase])
    return vr.section({f"variants-{k}": k for k in by_kind})


def test_rule_decides_on_all_21_pairs(monkeypatch):
    text = section(monkeypatch, {"nlu": runs("nlu"), "nlg": runs("nlg")})
    assert "- S (factor_init=lora_scale) against LoRA: below, interval excluding 0" in text
    assert "- S (factor_init=lora_scale) against smallest (default): below, interval excluding 0" in text
    # D alternates +0.01 / -0.01 around LoRA: its interval includes 0
    assert "- D (factor_init=zero_a) against LoRA: not below with the interval excluding 0" in text
    row = next(line for line in text.splitlines() if line.startswith("| S (factor_init=lora_scale) | LoRA | all |"))
    assert row.split("|")[4].strip() == "21" and row.split("|")[5].strip() == "21"
    # `largest` is paired at its own rate (1e-4), never with its diverging shared-rate twin
    own = next(line for line in text.splitlines()
               if line.startswith("| S (factor_init=lora_scale) | largest, own rate | all |"))
    assert own.split("|")[7].strip().startswith("-0.0")


def test_rule_waits_for_missing_pairs(monkeypatch):
    text = section(monkeypatch, {"nlu": runs("nlu"), "nlg": runs("nlg", seeds=(0, 1))})
    assert "- S (factor_init=lora_scale) against LoRA: not decidable yet (18 of 21 pairs)" in text
    assert "below, interval excluding 0" not in text


def test_a_retired_phase_is_refused_before_its_folder_is_touched_and_lists_why(monkeypatch):
    import pytest

    monkeypatch.chdir(Path.cwd())  # main() moves to the repository root; the working directory is put back after
    touched = []
    monkeypatch.setattr(vr.run_study.pack_runs, "unpack", lambda folder: touched.append(folder) or 0)
    for phase in ("variants-nlu", "variants-nlg", "forgetting-variants-social-iqa"):
        with pytest.raises(SystemExit, match="retired: AstraConfig.factor_init was removed"):
            vr.run_study.main([phase])
        lines = list(vr.run_study.command_lines(vr.run_study.phases()[phase]))
        assert lines[0].startswith("# retired: ") and vr.run_study.VARIANTS_COMMIT in lines[0]
        assert all("factor_init=" in line for line in lines[1:]) and len(lines) > 1
    assert touched == []
    # 'all' passes over them rather than stopping at the first: every phase before and after still runs
    ran = []
    monkeypatch.setattr(vr.run_study, "phases", lambda: {
        "a": vr.run_study.Phase(lambda: iter(()), "fa"),
        "old": vr.run_study.Phase(lambda: iter(()), "fo", retired="gone"),
        "b": vr.run_study.Phase(lambda: iter(()), "fb")})
    monkeypatch.setattr(vr.run_study.pack_runs, "unpack", lambda folder: ran.append(folder) or 0)
    vr.run_study.main(["all"])
    assert ran == ["fa", "fb"]
