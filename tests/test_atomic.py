"""gptk_jax/files.py: a folder appears complete or not at all."""

import pytest

from gptk_jax.files import atomic_folder


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_new_folder_appears_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()                       # not visible while being written
    assert (out / "a.txt").read_text() == "1"
    assert _names(tmp_path) == ["model"]              # no hidden leftovers


def test_failure_leaves_the_old_folder_untouched_and_nothing_behind(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert _names(out) == ["old.txt"]
    assert _names(tmp_path) == ["model"]


def test_replacing_swaps_the_whole_folder(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(out) == ["new.txt"]
    assert _names(tmp_path) == ["model"]
