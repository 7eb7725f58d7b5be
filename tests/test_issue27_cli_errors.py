"""Issue 27, smaller cases: a bad path is one line that names it and says what to do, never a
raw errno text ("File exists", "Is a directory", "[Errno 20] Not a directory"), and the CLIs
that load a converted model take `--no-verify-weights`, which skips the per-tensor digest check
(a damaged tensor is otherwise refused, named, exit 2).

Each path case failed before: the workdir ones said "[Errno 20] Not a directory" / "[Errno 17]
File exists", --output-json under a file "(File exists)", an --output-json folder ran the whole
decoding and then failed with "[Errno 21] Is a directory", a folder in the way of OUT.partial
"(Is a directory)", save_converted's mkdir "[Errno 20] Not a directory", and the report folder
probe "(Permission denied)".
"""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gptk_jax.errors import GptkError
from gptk_jax.llama.checkpoint import SKIP_DIGESTS_ENV, _save_params, load_converted
from gptk_jax.training.inputs import ensure_tiny_trunk

ROOT = Path(__file__).resolve().parent.parent
RAW = ("[Errno", "Errno", "File exists", "Is a directory", "Not a directory",
       "Permission denied")
TENSOR = "norm.scale"


def call(main, argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def run_module(module: str, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop(SKIP_DIGESTS_ENV, None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def error_line(stderr: str) -> str:
    """The one `error:` line of a CLI's stderr (no traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def assert_clear(message: str, *needles) -> None:
    """One line naming each needle (paths), with no raw errno text."""
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    for raw in RAW:
        assert raw not in message, (raw, message)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_trunk(tmp_path_factory.mktemp("issue27") / "tiny")


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


# --- workdir (training) ----------------------------------------------------------------------

def test_workdir_under_a_file(a_file):
    from gptk_jax.training.trainer import TrainingError, prepare_workdir
    with pytest.raises(TrainingError) as e:
        prepare_workdir(a_file / "run")
    assert_clear(str(e.value), a_file / "run", f"{a_file} is a file, not a folder")
    assert "is not writable" in str(e.value)          # the old message's prefix is kept


def test_workdir_that_is_a_file(a_file):
    from gptk_jax.training.trainer import TrainingError, prepare_workdir
    with pytest.raises(TrainingError) as e:
        prepare_workdir(a_file)
    assert_clear(str(e.value), a_file, "is a file", "give a folder path")
    assert a_file.read_text() == "not a folder\n"


def test_train_cli_workdir_that_is_a_file(a_file):
    proc = run_module("gptk_jax.train", "--config", ROOT / "configs" / "tiny.py",
                      "--workdir", a_file)
    assert proc.returncode == 2, proc.stderr
    assert_clear(error_line(proc.stderr), a_file, "is a file", "give a folder path")


# --- generate --output-json --------------------------------------------------------------------

def _generate(tiny, out, capsys, *extra):
    from gptk_jax.generate import main
    code = call(main, ["--checkpoint", tiny, "--prompt", "hi", "--max-new-tokens", 2,
                       "--quiet", "--output-json", out, *extra])
    return code, capsys.readouterr().err


def test_output_json_that_is_a_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out-folder"
    out.mkdir()
    code, err = _generate(tiny, out, capsys)
    assert code == 2
    assert_clear(error_line(err), "--output-json", out, "is a folder")
    assert "loaded" not in err                        # refused before the model loads
    assert not out.with_name(out.name + ".partial").exists() and not any(out.iterdir())


def test_output_json_under_a_file(tiny, a_file, capsys):
    out = a_file / "out.jsonl"
    code, err = _generate(tiny, out, capsys)
    assert code == 2
    assert_clear(error_line(err), "--output-json", out, f"{a_file} is a file, not a folder")


def test_output_json_partial_that_is_a_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    partial = out.with_name(out.name + ".partial")
    partial.mkdir()
    code, err = _generate(tiny, out, capsys)
    assert code == 2
    assert_clear(error_line(err), "--output-json", partial, "is a folder")


def test_json_lines_library_error_is_a_gptk_error(tmp_path):
    from gptk_jax.files import JsonLines, OutputFileError
    with pytest.raises(OutputFileError) as e:
        JsonLines(tmp_path)
    assert isinstance(e.value, GptkError)
    assert_clear(str(e.value), tmp_path, "is a folder")


# --- evaluate's report folder, save_converted ------------------------------------------------

def test_report_folder_not_writable(tmp_path, monkeypatch):
    import gptk_jax.evaluation.store as store

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr(store.tempfile, "TemporaryFile", refuse)
    with pytest.raises(store.OutputError) as e:
        store.check_output_folder(tmp_path / "report")
    assert_clear(str(e.value), tmp_path / "report", "permission denied", "choose a path")


def test_save_converted_parent_under_a_file(a_file, tiny, monkeypatch):
    """The folder above OUT turned into a file after the early check (a race, or another
    writer): the mkdir's error names the blocking file, not "[Errno 20] Not a directory"."""
    import gptk_jax.llama.checkpoint as checkpoint
    model = load_converted(tiny, load_tokenizer=False, scan_layers=True)
    monkeypatch.setattr(checkpoint, "check_output_folder", lambda out, overwrite: None)
    out = a_file / "sub" / "model"
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_converted(out, model.config, jax.device_get(model.params))
    assert_clear(str(e.value), a_file / "sub", f"{a_file} is a file, not a folder")


# --- --no-verify-weights ---------------------------------------------------------------------

@pytest.fixture
def damaged(tiny, tmp_path):
    """A copy of the tiny model whose norm.scale holds other, finite values than conversion.json's
    digest says (a valid checkpoint: only the digest check can tell)."""
    model = tmp_path / "damaged"
    shutil.copytree(tiny, model)
    params = jax.tree.map(np.array, load_converted(model, load_tokenizer=False,
                                                   scan_layers=True).params)
    params["norm"]["scale"][0] = 2.0
    _save_params(tmp_path / "other", params)
    shutil.rmtree(model / "params" / TENSOR)
    shutil.copytree(tmp_path / "other" / TENSOR, model / "params" / TENSOR)
    return model


@pytest.mark.slow   # generate CLI subprocesses
def test_generate_cli_refuses_damaged_weights_unless_told(damaged, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["--checkpoint", damaged, "--prompt", "hi", "--max-new-tokens", 2, "--quiet",
            "--output-json", out]
    proc = run_module("gptk_jax.generate", *args)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert f"tensor {TENSOR} differs" in line and str(damaged / "params" / TENSOR) in line
    assert not out.exists()
    proc = run_module("gptk_jax.generate", *args, "--no-verify-weights")
    assert proc.returncode == 0, proc.stderr
    assert "differs" not in proc.stderr
    assert len(out.read_text().splitlines()) == 1


def test_help_says_what_the_flag_skips():
    from gptk_jax.llama.weight_checks import VERIFY_WEIGHTS_HELP
    assert "digest" in VERIFY_WEIGHTS_HELP and "GPTK_SKIP_WEIGHT_DIGESTS" in VERIFY_WEIGHTS_HELP


class _Stop(GptkError):
    pass


def _spy_load(monkeypatch, seen: list):
    """load_converted records its verify_digests (and the skip variable) and stops the run."""
    import gptk_jax.llama.checkpoint as checkpoint

    def spy(path, **kwargs):
        seen.append((kwargs.get("verify_digests"), os.environ.get(SKIP_DIGESTS_ENV)))
        raise _Stop("stopped after the load's arguments were seen")

    monkeypatch.setattr(checkpoint, "load_converted", spy)


def _pair(tmp_path):
    (tmp_path / "src.de").write_text("Hallo Welt\nGuten Tag\n")
    (tmp_path / "src.en").write_text("Hello world\nGood day\n")
    return tmp_path / "src"


def _distill_argv(damaged, prefix, tmp_path):
    return ["--checkpoint", damaged, "--input", prefix, "--output", tmp_path / "d.txt",
            "--max-new-tokens", 2, "--no-progress"]


def _evaluate_argv(damaged, prefix, tmp_path):
    return ["--checkpoint", damaged, "--source", f"{prefix}.de", "--reference",
            f"{prefix}.en", "--output", tmp_path / "report", "--max-new-tokens", 2,
            "--batch-sizes", 1, "--lookup", "--tokens-per-step", 2, "--no-progress"]


@pytest.mark.parametrize("cli, make_argv", [("gptk_jax.distill", _distill_argv),
                                            ("gptk_jax.evaluate", _evaluate_argv)])
def test_the_flag_reaches_the_load(cli, make_argv, damaged, tmp_path, monkeypatch, capsys):
    """distill and evaluate refuse the damaged tensor, and pass --no-verify-weights on to
    load_converted(verify_digests=False)."""
    import importlib
    main = importlib.import_module(cli).main
    monkeypatch.delenv(SKIP_DIGESTS_ENV, raising=False)
    argv = make_argv(damaged, _pair(tmp_path), tmp_path)
    assert call(main, argv) == 2
    assert f"tensor {TENSOR} differs" in error_line(capsys.readouterr().err)
    seen = []
    _spy_load(monkeypatch, seen)
    assert call(main, [*argv, "--no-verify-weights"]) == 2
    assert seen == [(False, None)]
