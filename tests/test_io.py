"""The one atomic-write helper (astra_peft/_io.py) and the run folder's small pieces (harness/rundir.py): fast,
no model."""

from __future__ import annotations

import json
import math

import pytest

from astra_peft._io import TMP_PREFIX, atomic_dir, atomic_path, write_json_atomic


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(TMP_PREFIX) and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_dir_replaces_or_keeps(tmp_path):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    with atomic_dir(dest, keep_existing=True) as tmp:  # a shared cache: the copy finished first wins
        (tmp / "other.txt").write_text("other")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_json_is_always_json(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1.5, "nested": {"b": [1, 2]}})
    assert json.loads(path.read_text()) == {"a": 1.5, "nested": {"b": [1, 2]}}
    for bad, key in (({"final": {"dev": {"loss": math.nan}}}, "final.dev.loss"), ({"x": [1, math.inf]}, "x.1")):
        with pytest.raises(ValueError, match=rf"summary.json: refusing to write a non-finite number \({key} = "):
            write_json_atomic(path, bad)
    assert json.loads(path.read_text())["a"] == 1.5  # the earlier file is untouched


def test_jsonl_reader_drops_a_cut_last_line_and_names_a_damaged_one(tmp_path):
    from astra_peft.harness.rundir import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: damaged line"):
        read_jsonl(path)


def test_names_from_user_input_stay_inside(tmp_path):
    from astra_peft.harness.rundir import inside, safe_name

    assert [safe_name(n) for n in ("mr", "../../x", "/abs/dir", ".hidden", "a b:c", "")] == \
        ["mr", "x", "abs_dir", "hidden", "a_b_c", "_"]
    assert inside(tmp_path, "runs", safe_name("../../x")) == tmp_path / "runs" / "x"
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(tmp_path, "runs", "../../x")
    (tmp_path / "link").symlink_to(tmp_path.parent, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(tmp_path, "link", "y")


def test_settings_diff_names_what_changed():
    from astra_peft.harness.rundir import settings_diff

    old = {"lr": 1e-4, "method": "astra", "data": {"task": "gen", "train": "aa"}}
    assert settings_diff(old, old) == ""
    new = {"lr": 1e-3, "method": "astra", "data": {"task": "gen", "train": "bb"}, "seed": 1}
    assert settings_diff(old, new) == "data.train: aa → bb; lr: 0.0001 → 0.001; seed: <unset> → 1"


def test_restart_and_force_are_one_flag():
    from astra_peft.harness.cli import build_parser

    base = ["finetune", "--model", "m", "--data", "d.jsonl", "--output", "o"]
    assert build_parser().parse_args([*base, "--restart"]).force
    assert build_parser().parse_args([*base, "--force"]).force
    assert not build_parser().parse_args(base).force


def test_a_run_folder_without_results_takes_new_settings(tmp_path):
    """A run that failed before producing anything (a mistyped --model) leaves only its marker and config: the
    corrected command starts afresh. Once a result exists, other settings are refused."""
    from astra_peft.harness.rundir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.claim({"model": "typo", "lr": 1}) == "new"
    run.write_config({"model": "typo"})
    assert run.claim({"model": "right", "lr": 1}) == "restarted" and not run.file(RunDir.CONFIG).exists()
    run.file(RunDir.METRICS).write_text('{"loss": 1.0, "step": 1}\n')
    with pytest.raises(ValueError, match="other settings \\(lr: 1 → 2\\)"):
        run.claim({"model": "right", "lr": 2})
    assert run.claim({"model": "right", "lr": 2}, restart=True) == "restarted"


def test_a_setting_added_later_compares_at_its_default(tmp_path):
    """A FinetuneConfig field added after a run folder was made is missing from its record: at the field's
    default nothing differs; at another value the folder is refused, naming it."""
    from astra_peft.harness.rundir import MARKER, RunDir

    run = RunDir(tmp_path / "run")
    run.claim({"lr": 1})
    run.file(RunDir.METRICS).write_text('{"loss": 1.0, "step": 1}\n')
    marker = json.loads((run.path / MARKER).read_text())
    assert "eval_steps" not in marker["settings"]
    assert run.claim({"lr": 1, "eval_steps": 0}) == "same"  # the default of FinetuneConfig.eval_steps
    with pytest.raises(ValueError, match="eval_steps: 0 → 5"):  # the default it ran with, named
        run.claim({"lr": 1, "eval_steps": 5})
