"""Issue 27's smaller cases: an empty existing --output folder is usable (with or without
--overwrite); --overwrite never deletes a user's extra files inside a model folder; distill warns
about empty translations of non-empty sources; raw errno texts ("File exists", "Is a
directory") are replaced by one line naming the path and what to do."""

import json

import pytest

import _hf_reference as ref
from _convert_helpers import assert_one_error_line, hidden_siblings, run_convert
from gptk_jax.distill import main as distill_main
from gptk_jax.llama.checkpoint import load_converted


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_cases")
    return ref.write_gguf(root / "model.gguf", ref.build_hf_model(
        ref.hf_config(n_kv_heads=2, vocab=ref.VOCAB), seed=7))


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_into_an_empty_existing_folder(gguf, tmp_path, capsys, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    assert run_convert("gguf", gguf, out, *(["--overwrite"] if overwrite else [])) == 0, \
        capsys.readouterr().err
    assert load_converted(out).config.vocab_size == ref.VOCAB
    assert not hidden_siblings(out)


def test_overwrite_keeps_a_users_extra_files(gguf, tmp_path, capsys):
    out = tmp_path / "model"
    assert run_convert("gguf", gguf, out) == 0
    (out / "notes.txt").write_text("my notes")
    (out / "eval-results").mkdir()
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert run_convert("gguf", gguf, out, "--overwrite") == 2
    line = assert_one_error_line(capsys.readouterr().err, "--overwrite would delete",
                                 "eval-results", "notes.txt", str(out), "nothing was changed")
    assert "[Errno" not in line
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "notes.txt").read_text() == "my notes"
    load_converted(out)
    (out / "notes.txt").unlink()
    (out / "eval-results").rmdir()
    assert run_convert("gguf", gguf, out, "--overwrite") == 0   # a model alone: replaced


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_output_that_is_a_file(gguf, tmp_path, capsys, overwrite):
    out = tmp_path / "model.txt"
    out.write_text("mine")
    assert run_convert("gguf", gguf, out, *(["--overwrite"] if overwrite else [])) == 2
    assert_one_error_line(capsys.readouterr().err, str(out), "is a file, not a folder")
    assert out.read_text() == "mine"


# --- distill -------------------------------------------------------------------------------------

SOURCES = ["Guten Morgen.", "", "Das Haus ist klein.", "Ja.", "Wir danken Ihnen."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gptk_jax.training.inputs import ensure_tiny_trunk
    root = tmp_path_factory.mktemp("distill_small")
    trunk = ensure_tiny_trunk(root / "trunk")
    (root / "src.de").write_text("".join(s + "\n" for s in SOURCES))
    return root, trunk


def _args(root, trunk, output, input_prefix=None):
    return ["--checkpoint", str(trunk), "--input", str(input_prefix or root / "src"),
            "--output", str(output), "--max-new-tokens", "3", "--no-progress"]


def test_distill_warns_about_empty_translations(data, tmp_path, capsys, monkeypatch):
    from gptk_jax.distillation import generate as distill_module
    real = distill_module._translate

    def some_empty(decoder, tok, fmt, chunk, *rest):      # the trunk stops at once for two
        texts, tokens = real(decoder, tok, fmt, chunk, *rest)
        return ["" if s in ("Ja.", "Guten Morgen.") else t for s, t in zip(chunk, texts)], \
            tokens

    monkeypatch.setattr(distill_module, "_translate", some_empty)
    root, trunk = data
    out = tmp_path / "d.en"
    assert distill_main(_args(root, trunk, out)) == 0
    printed = capsys.readouterr().out
    assert f"warning: 2 of the 5 lines written to {out} in this session are empty" in printed
    record = json.loads((tmp_path / "d.en.json").read_text())
    assert record["sessions"][-1]["empty_lines"] == 2      # the empty source is not counted


def test_distill_without_empty_translations_does_not_warn(data, tmp_path, capsys, monkeypatch):
    from gptk_jax.distillation import generate as distill_module
    monkeypatch.setattr(distill_module, "_translate",
                        lambda decoder, tok, fmt, chunk, *rest: (
                            ["x" if s.strip() else "" for s in chunk], len(chunk)))
    root, trunk = data
    assert distill_main(_args(root, trunk, tmp_path / "d.en")) == 0
    assert "warning" not in capsys.readouterr().out


def _setup_output_under_a_file(root, tmp_path):
    (tmp_path / "afile").write_text("mine")
    return tmp_path / "afile" / "d.en", None


def _setup_input_is_a_folder(root, tmp_path):
    (tmp_path / "corpus.de").mkdir()
    return tmp_path / "d.en", tmp_path / "corpus"


def _setup_record_is_a_folder(root, tmp_path):
    (tmp_path / "d.en.json").mkdir()
    return tmp_path / "d.en", None


def _setup_lock_is_a_folder(root, tmp_path):
    (tmp_path / "d.en.lock").mkdir()
    return tmp_path / "d.en", None


@pytest.mark.parametrize("case, needles", [
    ("output_under_a_file", ["afile", "is a file, not a folder"]),
    ("input_is_a_folder", ["corpus.de", "is a folder", "--input"]),
    ("record_is_a_folder", ["d.en.json", "is a folder", "remove it"]),
    ("lock_is_a_folder", ["d.en.lock", "is a folder", "cannot lock --output"]),
])
def test_distill_path_errors_say_what_to_do(data, tmp_path, capsys, case, needles):
    root, trunk = data
    out, prefix = globals()[f"_setup_{case}"](root, tmp_path)
    assert distill_main(_args(root, trunk, out, prefix)) == 2
    line = assert_one_error_line(capsys.readouterr().err, *needles)
    assert "[Errno" not in line and "Is a directory" not in line and "File exists" not in line
    assert not (out.exists() and out.is_file())
    if case == "output_under_a_file":
        assert (tmp_path / "afile").read_text() == "mine"
