"""Readable reports: smoothed loss curves titled with model/rank/rate, CPU time beside wall time, load noted."""

from __future__ import annotations

import math

import pytest

from astra_peft.harness import plots, report


def _run(method, *, seed=0, lr=5e-4, rank=8, steps=40, cpu=None, load=None, model="/x/models/smollm2-135m"):
    run = {"method": method, "seed": seed, "task": "gen", "model": model, "lr": lr, "rank": rank,
           "final": {"test": {"accuracy": 0.5, "loss": 1.0}}, "trainable_parameters": 1000,
           "mean_train_loss_last10": 1.0,
           "seconds": {"calibration": 1.0, "initialization": 2.0, "training": 10.0, "evaluation": 3.0},
           "history": [{"step": s, "loss": 2.0 + math.sin(s), "grad_norm": 1.0} for s in range(1, steps + 1)]}
    if cpu is not None:
        run["cpu_seconds"] = cpu
    if load is not None:
        run["load_average"] = {"start": load[0], "end": load[1]}
    return run


def test_smooth_is_a_centred_moving_average():
    assert plots.smooth([1, 2, 3, 4, 5], 1) == [1, 2, 3, 4, 5]
    assert plots.smooth([0, 3, 6, 9], 3) == [1.5, 3.0, 6.0, 7.5]  # ends average what exists


def test_title_names_model_rank_and_rate_and_legend_takes_what_differs():
    same = [_run("astra"), _run("lora")]
    assert plots.curve_title(same) == "smollm2-135m · rank 8 · lr 0.0005"
    mixed = [_run("astra", lr=5e-4), _run("lora", lr=1e-3)]
    assert plots.curve_title(mixed) == "smollm2-135m · rank 8"
    assert plots._curve_label("lora", mixed) == "lora (lr 0.001)"
    assert plots._curve_label("astra", same) == "astra"
    assert plots._curve_label("lora:lr=1e-3", mixed) == "lora:lr=1e-3"  # the spec names its rate already


def test_plot_has_faint_raw_and_smoothed_curves_and_a_title(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    titles, lines = [], []
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    original = Figure.savefig

    def capture(self, *args, **kwargs):
        lines.extend(line for ax in self.axes for line in ax.get_lines())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    path = plots.plot_curves([_run("astra"), _run("lora")], "loss", tmp_path / "loss.png")
    assert path.stat().st_size > 0
    assert titles == ["smollm2-135m · rank 8 · lr 0.0005  (faint: per step; solid: moving average)"]
    faint = [line for line in lines if (line.get_alpha() or 1.0) < 1.0]
    solid = [line for line in lines if line.get_label() in ("astra", "lora")]
    assert len(faint) == 2 and len(solid) == 2
    raw = list(faint[0].get_ydata())
    assert list(solid[0].get_ydata()) == pytest.approx(plots.smooth(raw, 5))


def test_table_shows_cpu_beside_wall_only_when_recorded():
    old = report.markdown_table([_run("astra"), _run("lora")], "test")
    assert "CPU" not in old  # runs from before CPU time was recorded: the table is as it was
    new = report.markdown_table([_run("astra", cpu=40.0), _run("lora", cpu=12.5)], "test")
    header, _, astra, lora = new.splitlines()[:4]
    assert header.endswith("| Run wall (s) | Run CPU (s) |")
    assert astra.endswith("| 16.0 | 40.0 |") and lora.endswith("| 16.0 | 12.5 |")


def test_load_note_warns_when_the_load_changed():
    steady = report._load_note([_run("astra", load=(1.0, 1.2)), _run("lora", load=(1.1, 1.3))])
    assert steady and "compare CPU times" not in steady[0] and "1.0 to 1.3" in steady[0]
    changed = report._load_note([_run("astra", load=(7.0, 8.0)), _run("lora", load=(1.0, 1.5))])
    assert "compare CPU times, not wall times" in changed[0]
    assert report._load_note([_run("astra")]) == []
