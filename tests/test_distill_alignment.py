"""Issue 27, findings 2-3 as training meets them: a distillation whose sources or lines changed
after distilling is refused by training's data loading naming the first line that differs (it
was accepted when only the line counts were compared); a target file that cannot be read is
one line naming it and saying what to do (not a raw "[Errno 21] Is a directory"); and a
distillation whose LAST line was shortened (its newline kept) is refused on resume and redone
with --redo-damaged into the lines of an uninterrupted run."""

import json
import shutil

import pytest

from gptk_jax.distill import main as distill_main
from gptk_jax.errors import GptkError
from gptk_jax.training.inputs import read_train_pairs
from gptk_jax.training.settings import DataSettings, TrainingError

# the tiny trunk, PREFIX.de and an uninterrupted distillation root/whole.en (with its record)
from test_distill_safety import SOURCES, _args, _one_error, data  # noqa: F401 (a fixture)


def _copy(data, tmp_path):
    """A copy of the sources and of the uninterrupted distillation (FILE, FILE.json) to edit;
    -> (prefix, target file)."""
    root, _, _ = data
    shutil.copy(root / "src.de", tmp_path / "src.de")
    for name in ("whole.en", "whole.en.json"):
        shutil.copy(root / name, tmp_path / name)
    return tmp_path / "src", tmp_path / "whole.en"


def _load(prefix, target):
    """Training's data loading of one train prefix paired with a target file."""
    return read_train_pairs(DataSettings(train_prefixes=(str(prefix),),
                                         train_target_files=(str(target),),
                                         shots_prefix="", eval_prefix=""))


def _refused(prefix, target) -> str:
    with pytest.raises(TrainingError) as caught:
        _load(prefix, target)
    message = str(caught.value)
    assert isinstance(caught.value, GptkError) and "\n" not in message
    return message


def _lines(path) -> list[str]:
    return path.read_text().split("\n")[:-1]


def _write(path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines))


# -- training checks a distillation's content against its record ----------------------------

def test_untouched_distillation_loads(data, tmp_path):
    prefix, target = _copy(data, tmp_path)
    pairs = _load(prefix, target)
    expected = [(s, t.strip()) for s, t in zip(SOURCES, _lines(target)) if s and t.strip()]
    assert [(p.src, p.tgt) for p in pairs] == expected and pairs


def test_a_source_line_inserted_at_the_top_is_refused_naming_line_1(data, tmp_path):
    prefix, target = _copy(data, tmp_path)
    _write(tmp_path / "src.de", ["Neu eingefügt."] + SOURCES)
    message = _refused(prefix, target)
    assert f"line 1 of {prefix}.de differs" in message and str(target) in message
    assert "distill" in message


def test_an_edited_source_line_is_refused_naming_it(data, tmp_path):
    prefix, target = _copy(data, tmp_path)
    edited = list(SOURCES)
    edited[2] = "Das Haus ist groß."
    _write(tmp_path / "src.de", edited)
    message = _refused(prefix, target)
    assert f"line 3 of {prefix}.de differs" in message and "line 3 of " + str(target) in message


def test_an_edited_target_line_is_refused_naming_it(data, tmp_path):
    prefix, target = _copy(data, tmp_path)
    lines = _lines(target)
    lines[1] = lines[1] + " edited"
    _write(target, lines)
    message = _refused(prefix, target)
    assert f"line 2 of {target} differs" in message and "--redo-damaged" in message


def test_the_refusal_reaches_the_distilled_evaluation_too(data, tmp_path):
    from types import SimpleNamespace

    from gptk_jax.training.inputs import build_distilled_eval
    prefix, target = _copy(data, tmp_path)
    _write(tmp_path / "src.de", ["Neu eingefügt."] + SOURCES)
    settings = SimpleNamespace(data=DataSettings(   # what build_distilled_eval reads first
        train_prefixes=("unused",), shots_prefix="", eval_prefix=str(prefix),
        eval_target_file=str(target)))
    with pytest.raises(TrainingError) as caught:
        build_distilled_eval(settings, tokenizer=None, fmt=None)
    assert f"line 1 of {prefix}.de differs" in str(caught.value)


# -- an unreadable file: one line naming it and what to do ------------------------------------

def test_a_target_file_that_is_a_folder_is_named_with_what_to_do(data, tmp_path):
    prefix, _ = _copy(data, tmp_path)
    folder = tmp_path / "targets"
    folder.mkdir()
    message = _refused(prefix, folder)
    assert f"{folder} is a folder, where a file is needed: remove it or choose another path" \
        in message
    assert "Errno" not in message


# -- a damaged LAST line (shortened, its newline kept) ---------------------------------------

def test_a_shortened_last_line_is_refused_and_redone(data, tmp_path, capsys):
    root, trunk, whole = data
    out = tmp_path / "d.en"
    assert distill_main(_args(root / "src", trunk, out, "--chunk", "2", "--stop-after",
                              "6")) == 0
    lines = _lines(out)
    assert len(lines) == 6 and lines[-1]
    lines[-1] = lines[-1][:-1]                 # the last line shortened, its newline kept
    _write(out, lines)
    damaged, record = out.read_bytes(), (tmp_path / "d.en.json").read_bytes()
    capsys.readouterr()
    assert distill_main(_args(root / "src", trunk, out, "--chunk", "2")) == 2
    err = _one_error(capsys)
    assert f"line 6 of {out}" in err and "--redo-damaged" in err
    assert out.read_bytes() == damaged and (tmp_path / "d.en.json").read_bytes() == record
    # training refuses it too (a count check alone passes: 6 lines, 6 recorded)
    message = _refused(root / "src", out)
    assert f"line 6 of {out} differs" in message
    assert distill_main(_args(root / "src", trunk, out, "--chunk", "2", "--redo-damaged")) == 0
    assert out.read_text() == whole
    rec = json.loads((tmp_path / "d.en.json").read_text())
    assert rec["sessions"][-1]["first_line"] == 4          # from the damaged chunk (lines 5-6)
    assert rec["lines_written"] == len(SOURCES) == sum(c["lines"] for c in rec["chunks"])
    # the same damage to the last line of a complete distillation
    lines = _lines(out)
    assert lines[-1]
    _write(out, lines[:-1] + [lines[-1][:-1]])
    assert distill_main(_args(root / "src", trunk, out)) == 2
    assert f"line {len(SOURCES)} of {out}" in _one_error(capsys)
    assert distill_main(_args(root / "src", trunk, out, "--redo-damaged")) == 0
    assert out.read_text() == whole
