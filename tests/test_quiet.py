"""Noise a user cannot act on is filtered narrowly; everything else still shows."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import pytest

from astra_peft.harness import quiet, sources


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TQDM_POSITION", "TQDM_MININTERVAL", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings():  # prepare_output's filters stay inside this test
        yield


def test_bars_written_to_a_log_never_move_the_cursor(clean_env):
    quiet.prepare_output(True, stream=io.StringIO())  # a StringIO is not a terminal
    assert os.environ["TQDM_POSITION"] == "0" and os.environ["TQDM_MININTERVAL"] == "30"
    assert "TQDM_DISABLE" not in os.environ


def test_a_users_own_tqdm_settings_win(clean_env, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "1")
    quiet.prepare_output(True, stream=io.StringIO())
    assert os.environ["TQDM_MININTERVAL"] == "1"


def test_no_progress_disables_every_bar(clean_env):
    quiet.prepare_output(False, stream=io.StringIO())
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_only_the_named_warning_is_filtered(clean_env):
    quiet.prepare_output(True, stream=io.StringIO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", category=UserWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning)  # other category: kept
    assert [str(w.message) for w in caught] == ["something else is deprecated",
                                                "`is_gradient_checkpointing` is deprecated"]


@pytest.mark.parametrize("uid, expected", [(0, ["-o", "APT::Sandbox::User=root"]), (1000, [])])
def test_apt_download_asks_for_root_only_as_root(tmp_path, monkeypatch, uid, expected):
    """As root, apt is told to download as root (what it falls back to anyway, minus the warning)."""
    monkeypatch.setenv("ASTRA_PEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    seen = []

    def fake_apt(cmd, cwd=None):
        seen.append(cmd)
        (Path(cwd) / "python3-pattern_1.0_all.deb").write_bytes(b"deb")
        return 0, ""

    monkeypatch.setattr(sources, "run_streaming", fake_apt)
    got = sources._apt_download("python3-pattern")
    assert seen == [["apt-get", "download", *expected, "python3-pattern"]]
    assert got.read_bytes() == b"deb" and got.parent == tmp_path / "downloads"


def test_no_progress_silences_the_provisioning_copy_bar(tmp_path, monkeypatch, capsys):
    # A large copy draws a bar, unless --no-progress set TQDM_DISABLE (an explicit disable= used to override it).
    import io

    from astra_peft.harness.fetch import copy_with_progress

    data = b"x" * (9 << 20)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    copy_with_progress(io.BytesIO(data), tmp_path / "a", len(data), "extract a")
    assert "extract a" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    copy_with_progress(io.BytesIO(data), tmp_path / "b", len(data), "extract b")
    assert "extract b" not in capsys.readouterr().err
    assert (tmp_path / "b").read_bytes() == data
