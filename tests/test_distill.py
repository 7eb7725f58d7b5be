"""Self-distillation (gptk_jax.distill, gptk_jax/distillation/) on the random tiny trunk:
resume equals an uninterrupted run, the record refuses another distillation, few-shot sources
are left out, training refuses a target file that is not line-aligned, one error style."""

import json
import subprocess
import sys

import pytest

from gptk_jax.distill import main as distill_main

SOURCES = ["Guten Morgen.", "", "Das Haus ist klein.", "Ja.", "Wir danken Ihnen.",
           "Die Katze schläft.", "Es regnet heute.", "Guten Morgen."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gptk_jax.training.inputs import ensure_tiny_trunk
    root = tmp_path_factory.mktemp("distill")
    trunk = ensure_tiny_trunk(root / "trunk")
    (root / "src.de").write_text("".join(s + "\n" for s in SOURCES))
    (root / "src.en").write_text("".join(f"ref {i}\n" for i in range(len(SOURCES))))
    return root, trunk


def _args(root, trunk, output, *extra):
    return ["--checkpoint", str(trunk), "--input", str(root / "src"), "--output", str(output),
            "--max-new-tokens", "5", "--no-progress", *extra]


@pytest.mark.slow   # distill subprocesses, one killed
def test_resumed_run_writes_the_lines_of_an_uninterrupted_one(data, tmp_path):
    root, trunk = data
    whole = tmp_path / "whole.en"
    assert distill_main(_args(root, trunk, whole, "--batch-size", "2", "--chunk", "3")) == 0
    parts = tmp_path / "parts.en"
    # three sessions with other batch sizes, chunks and K (decoding settings may change)
    assert distill_main(_args(root, trunk, parts, "--batch-size", "3", "--stop-after", "2",
                              "--k", "1")) == 0
    with open(parts, "a") as f:
        f.write("half a line from a crash")
    assert distill_main(_args(root, trunk, parts, "--batch-size", "1", "--chunk", "2",
                              "--stop-after", "3")) == 0
    assert distill_main(_args(root, trunk, parts, "--batch-size", "4")) == 0
    assert parts.read_text() == whole.read_text()
    lines = whole.read_text().split("\n")
    assert len(lines) == len(SOURCES) + 1 and lines[-1] == "" and lines[1] == ""
    record = json.loads((tmp_path / "parts.en.json").read_text())
    assert record["lines_written"] == len(SOURCES) == record["sources"]
    assert [s["lines"] for s in record["sessions"]] == [2, 3, 3]
    assert [s["first_line"] for s in record["sessions"]] == [0, 2, 5]
    from gptk_jax.llama.checkpoint import load_converted
    assert record["prompt_format"]["bos"] is load_converted(trunk).tokenizer.add_bos
    assert record["generated_tokens"] == sum(s["generated_tokens"] for s in record["sessions"])


def test_rerun_with_another_prompt_format_is_refused(data, tmp_path, capsys):
    root, trunk = data
    out = tmp_path / "d.en"
    assert distill_main(_args(root, trunk, out, "--stop-after", "2")) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert distill_main(_args(root, trunk, out, "--space-with-target")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt_format" in err[0] and str(out) in err[0]
    assert distill_main(_args(root, trunk, out, "--max-new-tokens", "7")) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_lines_without_a_record_are_not_appended_to(data, tmp_path, capsys):
    root, trunk = data
    out = tmp_path / "someone-elses.en"
    out.write_text("a\nb\n")
    assert distill_main(_args(root, trunk, out)) == 2
    assert "no record" in capsys.readouterr().err
    assert out.read_text() == "a\nb\n"


def test_few_shot_sources_are_left_out(data, tmp_path):
    root, trunk = data
    out = tmp_path / "shots.en"
    # the pool is the file itself: its first pair ("Guten Morgen." / "ref 0") is the shot
    assert distill_main(_args(root, trunk, out, "--shots", "1", "--shots-prefix",
                              str(root / "src"))) == 0
    lines = out.read_text().split("\n")[:-1]
    assert [i for i, s in enumerate(SOURCES) if s == "Guten Morgen."] == [0, 7]
    assert lines[0] == "" and lines[7] == ""
    record = json.loads((tmp_path / "shots.en.json").read_text())
    assert record["prompt_format"]["shots"] == 1


def test_training_refuses_a_target_file_that_is_not_line_aligned(data, tmp_path):
    from gptk_jax.data.wmt import DataError
    from gptk_jax.training.inputs import _pairs_with_target_file
    root, trunk = data
    short = tmp_path / "short.en"
    short.write_text("one\ntwo\n")
    with pytest.raises(DataError) as e:
        _pairs_with_target_file(str(root / "src"), "de", short, None)
    msg = str(e.value)
    assert str(short) in msg and str(root / "src.de") in msg and "2" in msg and "8" in msg
    # a distillation of the first 3 sources is line-aligned with them ...
    first3 = tmp_path / "first3.en"
    assert distill_main(_args(root, trunk, first3, "--max-pairs", "3")) == 0
    pairs = _pairs_with_target_file(str(root / "src"), "de", first3, None)
    assert [p.src for p in pairs] == [SOURCES[0], SOURCES[2]]
    # ... but a line lost after the record was written is not
    first3.write_text("".join(first3.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(DataError, match=r"has 2 lines, its record .* says 3 of 3"):
        _pairs_with_target_file(str(root / "src"), "de", first3, None)


def test_prompt_format_mismatch_warning_names_both_formats():
    from gptk_jax.data.prompts import (PromptFormat, compare_prompt_records, prompt_record)
    from gptk_jax.data.wmt import Pair
    plain = prompt_record(PromptFormat.for_languages("de", "en"), bos=False)
    shots = prompt_record(PromptFormat.for_languages(
        "de", "en", shots=[Pair("Ja.", "Yes.")], space_with_target=True), bos=True)
    assert compare_prompt_records(plain, dict(plain), used_by="a", recorded_by="b") is None
    assert compare_prompt_records(plain, None, used_by="a", recorded_by="b") is None
    warning = compare_prompt_records(plain, shots, used_by="evaluation",
                                     recorded_by="heads.json")
    assert warning.startswith("warning: prompt format differs in ")
    for key in ("query_template", "target_prefix", "shots", "shots_sha256", "bos"):
        assert key in warning
    assert "evaluation uses [0 shots" in warning and "no BOS" in warning
    assert "heads.json recorded [1 shots" in warning and ", BOS," in warning


def test_training_warns_when_distilled_with_another_format(data, tmp_path):
    from gptk_jax.data.prompts import PromptFormat, prompt_record
    from gptk_jax.training.inputs import warn_distilled_format
    from types import SimpleNamespace
    root, trunk = data
    out = tmp_path / "t.en"
    assert distill_main(_args(root, trunk, out, "--space-with-target")) == 0
    used = prompt_record(PromptFormat.for_languages("de", "en"), bos=False)
    logged = []
    settings = SimpleNamespace(train_target_files=(str(out),), eval_target_file=None)
    warn_distilled_format(settings, used, logged.append)
    assert len(logged) == 1 and "target_prefix" in logged[0] and str(out) in logged[0]


@pytest.mark.parametrize("extra, names", [
    (["--batch-size", "0"], "--batch-size"),
    (["--k", "0"], "--tokens-per-step"),
    (["--max-pairs", "0"], "--max-pairs"),
])
def test_bad_arguments_one_line_exit_2(data, tmp_path, extra, names):
    root, trunk = data
    out = tmp_path / "bad.en"
    proc = subprocess.run([sys.executable, "-m", "gptk_jax.distill",
                           *_args(root, trunk, out, *extra)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "bad.en.json").exists()


def test_missing_input_one_line_exit_2(data, tmp_path, capsys):
    root, trunk = data
    out = tmp_path / "x.en"
    args = _args(root, trunk, out)
    args[args.index("--input") + 1] = str(tmp_path / "nothing")
    assert distill_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing.de" in err[0]
    assert not out.exists()
