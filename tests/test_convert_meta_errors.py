"""`python -m convert --format meta` on bad inputs: exit code 2, one `error: ` line naming the
file and tensor or field, nothing written (no output folder, no hidden partial sibling); damaged
bytes and non-finite weights are never converted silently; an interrupted conversion leaves
nothing a rerun does not clean. (Table-driven cases for every format: test_convert_bad_inputs.py.)

The checkpoint is META_BASE (vocab 256) beside the real Llama 3 tokenizer, so every conversion
here passes --allow-small-vocab: the errors tested are the ones each test sets up.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _convert_helpers as helpers
from _convert_helpers import (ALLOW_SMALL_VOCAB, assert_nothing_written, convert_meta,
                              write_meta_base)
from conftest import ROOT


def expect_error(capsys, src: Path, out: Path, *needles, extra=()) -> str:
    return helpers.expect_error(capsys, "meta", src, out, *needles,
                                extra=(ALLOW_SMALL_VOCAB, *extra))


def edit_state(src: Path, edit) -> None:
    path = src / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A valid tiny Meta checkpoint folder; the tests copy and damage it."""
    return write_meta_base(tmp_path_factory.mktemp("base") / "meta")


@pytest.fixture
def damaged(base_checkpoint, tmp_path) -> Path:
    src = tmp_path / "meta"
    shutil.copytree(base_checkpoint, src)
    return src


# --- bad inputs: exit code 2, one line naming file and tensor, nothing written -----------------

def test_missing_params_json(damaged, tmp_path, capsys):
    (damaged / "params.json").unlink()
    expect_error(capsys, damaged, tmp_path / "out", str(damaged / "params.json"), "not found")


def test_missing_and_extra_tensors_are_listed(damaged, tmp_path, capsys):
    def edit(state):
        del state["layers.1.attention.wk.weight"]
        del state["norm.weight"]
        state["layers.0.attention.wq.bias"] = torch.zeros(64)
    edit_state(damaged, edit)
    expect_error(capsys, damaged, tmp_path / "out", "consolidated.00.pth",
                 "'layers.1.attention.wk.weight'", "'norm.weight'",
                 "unexpected tensors ['layers.0.attention.wq.bias']")


def test_layer_beyond_n_layers_is_an_extra_tensor(damaged, tmp_path, capsys):
    edit_state(damaged, lambda s: s.update({"layers.2.ffn_norm.weight": torch.ones(64)}))
    expect_error(capsys, damaged, tmp_path / "out", "layers.2.ffn_norm.weight", "n_layers=2")


def test_wrong_shape_names_tensor_and_both_shapes(damaged, tmp_path, capsys):
    edit_state(damaged, lambda s: s.update({"layers.1.feed_forward.w2.weight": torch.zeros(64, 200)}))
    expect_error(capsys, damaged, tmp_path / "out", "consolidated.00.pth",
                 "layers.1.feed_forward.w2.weight", "(64, 200)", "(64, 224)")


def test_kv_heads_that_do_not_divide_heads(damaged, tmp_path, capsys):
    params = json.loads((damaged / "params.json").read_text())
    (damaged / "params.json").write_text(json.dumps(dict(params, n_kv_heads=3)))
    expect_error(capsys, damaged, tmp_path / "out", "params.json",
                 "n_kv_heads 3 does not divide n_heads 4")


def test_truncated_pth_names_the_file(damaged, tmp_path, capsys):
    path = damaged / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(capsys, damaged, tmp_path / "out", str(path), "truncated")


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): a pickle that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(damaged, tmp_path, capsys):
    # the payload is real: torch's full unpickler does create the file
    probe = tmp_path / "probe_created"
    torch.save({"x": _CreatesFile(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "pwned"
    state = torch.load(damaged / "consolidated.00.pth", weights_only=True)
    state["tok_embeddings.weight"] = _CreatesFile(marker)
    torch.save(state, damaged / "consolidated.00.pth")
    expect_error(capsys, damaged, tmp_path / "out", str(damaged / "consolidated.00.pth"),
                 "refused by torch's weights-only loader")
    assert not marker.exists()


def test_existing_output_is_refused_unless_overwrite(base_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_meta(base_checkpoint, out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a converted model: a folder holding anything else is kept
    assert convert_meta(base_checkpoint, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"{out} is not one: refusing to delete it" in err and err.count("\n") == 1, err
    assert (out / "keep.txt").read_text() == "mine"
    converted_out = tmp_path / "converted"
    assert convert_meta(base_checkpoint, converted_out) == 0
    (converted_out / "params" / "stale.txt").write_text("from the earlier conversion")
    assert convert_meta(base_checkpoint, converted_out, "--overwrite") == 0
    assert not (converted_out / "params" / "stale.txt").exists()
    assert (converted_out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_while_writing_leaves_nothing(base_checkpoint, tmp_path, capsys, monkeypatch):
    """A failure after the weights are read (here: the tokenizer copy) removes the partial
    folder and the parent folders this run created."""
    import convert.meta

    def failing_writer(path):
        def write(folder):
            raise OSError(f"{folder}: No space left on device")
        return write, "llama3_tiktoken", 128256
    monkeypatch.setattr(convert.meta, "tokenizer_writer", failing_writer)
    out = tmp_path / "new" / "deeper" / "out"
    expect_error(capsys, base_checkpoint, out, "No space left on device")
    assert not (tmp_path / "new").exists()


def test_output_inside_input_is_refused(damaged, capsys):
    expect_error(capsys, damaged, damaged / "converted", "overlaps --input")


def test_python_dash_m_convert_exit_code_and_one_line_error(damaged, tmp_path):
    (damaged / "consolidated.00.pth").unlink()
    proc = subprocess.run([sys.executable, "-m", "convert", "--format", "meta", "--input",
                           str(damaged), "--output", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {damaged}: no consolidated.NN.pth files"
    assert_nothing_written(tmp_path / "out")


# --- damaged bytes and non-finite weights (nothing silent) --------------------------------------

def test_overwritten_tensor_bytes_fail_the_zip_crc(damaged, tmp_path, capsys):
    """4 KiB of tensor data overwritten by 0xFF (1,024 NaN float32s) used to convert with rc 0."""
    import zipfile
    path = damaged / "consolidated.00.pth"
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)            # local file header: name and extra lengths at 26..30
        name_len, extra_len = int.from_bytes(header[26:28], "little"), \
            int.from_bytes(header[28:30], "little")
        assert info.file_size > 256 + 4096
        f.seek(info.header_offset + 30 + name_len + extra_len + 256)   # inside the tensor
        f.write(b"\xff" * 4096)
    expect_error(capsys, damaged, tmp_path / "out", str(path), "CRC-32", info.filename)


def test_non_finite_weight_is_refused_naming_the_tensor(damaged, tmp_path, capsys):
    def poison(state):
        state["layers.1.feed_forward.w2.weight"][3, 5] = float("nan")
        state["norm.weight"][0] = float("inf")
    edit_state(damaged, poison)   # a valid zip whose CRCs match its NaN bytes
    err = expect_error(capsys, damaged, tmp_path / "out", "non-finite", "'norm'",
                       "'feed_forward'", "'w2'")
    assert "1 non-finite value(s)" in err


def test_stale_partial_folder_of_a_dead_process_is_removed(base_checkpoint, tmp_path, capsys):
    """A SIGKILLed convert leaves .OUT.partial-PID behind; the next run removes it and says so."""
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}"
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "chunk").write_bytes(b"\0" * 1024)
    alive = tmp_path / f".out.partial-{os.getppid()}"   # a live writer's folder is kept
    alive.mkdir()
    assert convert_meta(base_checkpoint, out) == 0
    assert not stale.exists() and alive.exists()
    assert f"removed {stale}" in capsys.readouterr().out


@pytest.mark.slow   # convert subprocesses, one killed
def test_sigkill_during_convert_leaves_nothing_a_rerun_does_not_clean(base_checkpoint, tmp_path):
    import signal
    out = tmp_path / "out"
    code = ("import sys, time, gptk_jax.llama.checkpoint as c\n"
            "orig = c._save_params\n"
            "def slow(d, p):\n"
            "    orig(d, p); print('saved', flush=True); time.sleep(60)\n"
            "c._save_params = slow\n"
            "from convert.cli import main\n"
            f"sys.exit(main(['--format', 'meta', '--input', {str(base_checkpoint)!r}, "
            f"'--output', {str(out)!r}, {ALLOW_SMALL_VOCAB!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        for line in proc.stdout:
            if line.startswith("saved"):
                break
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert partial, list(tmp_path.iterdir())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() and all(p.exists() for p in partial)   # what SIGKILL leaves
    assert convert_meta(base_checkpoint, out) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "config.json").is_file()
