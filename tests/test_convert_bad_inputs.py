"""Hostile inputs, table-driven, for every converter and for `load_converted`.

Conversion: each case damages a copy of a valid tiny checkpoint (or builds a bad one), runs
`python -m convert` in-process and asserts exit code 2, exactly one stderr line starting
`error: ` that names the file and the field or tensor, no traceback, and nothing left that looks
like a model (no output folder, no hidden `.OUT.*` sibling). One case runs the real subprocess.
Loading: each case damages a copy of a converted folder; `load_converted` must raise a
CheckpointError naming the folder and the broken part (never AttributeError, TokenizerError,
JSONDecodeError ...).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import _hf_reference as ref
from _convert_helpers import (ALLOW_SMALL_VOCAB, assert_nothing_written, assert_one_error_line,
                              convert_meta, expect_error, hidden_siblings, run_convert,
                              write_meta_base)
from conftest import ROOT
from gptk_jax.llama.checkpoint import CheckpointError, load_converted

SMALL_EMBEDDING = 200   # rows of the "hf_small" / "gguf_small" models; their tokenizer has 260
OVERFLOW_DIMS = [2**32, 2**32]   # 2**64 elements: int64 products wrap to 0
OVERFLOW_F32_BYTES = 4 * 2**64


# --- valid inputs the cases damage ----------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """name -> a valid checkpoint (folder or .gguf file), built on first use."""
    root = tmp_path_factory.mktemp("bases")
    builders = {
        "meta": lambda: write_meta_base(root / "meta"),
        "hf": lambda: ref.write_hf_checkpoint(root / "hf", _hf_model(ref.VOCAB)),
        "hf_small": lambda: ref.write_hf_checkpoint(root / "hf_small",
                                                    _hf_model(SMALL_EMBEDDING)),
        "gguf": lambda: ref.write_gguf(root / "model.gguf", _hf_model(ref.VOCAB)),
        "gguf_small": lambda: ref.write_gguf(root / "small.gguf", _hf_model(SMALL_EMBEDDING)),
    }
    return _Lazy(builders)


class _Lazy(dict):
    """A dict whose values are built by `builders[key]()` on first access."""

    def __init__(self, builders: dict):
        super().__init__()
        self.builders = builders

    def __missing__(self, key):
        self[key] = value = self.builders[key]()
        return value


def _hf_model(vocab: int):
    return ref.build_hf_model(ref.hf_config(n_kv_heads=2, vocab=vocab), seed=7)


def _copy(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


# --- damages: each takes the copied input, returns (input to convert, needles) -----------------

def edit_json(name: str, **changes):
    """Fields of `name` (params.json / config.json) replaced; the error must name the file, the
    field and the value."""
    def damage(src: Path):
        path = src / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        (field, value), = changes.items()
        return src, (str(path), repr(field), repr(value))
    return damage


def no_damage(*needles):
    """The input is bad as built (e.g. a tokenizer larger than the embedding)."""
    def damage(src: Path):
        return src, tuple(n(src) if callable(n) else n for n in needles)
    return damage


def not_a_checkpoint(expected: str, why: str):
    """A folder holding only a README; the error names the file a checkpoint would have."""
    def damage(src: Path):
        folder = src.parent / "holiday"
        folder.mkdir()
        (folder / "README.txt").write_text("holiday photos")
        return folder, (str(folder / expected) if expected else str(folder), why)
    return damage


def gguf_overflow_dims(src: Path):
    """token_embd.weight's dims patched to [2**32, 2**32] in an otherwise valid GGUF header
    (name: u64 length + bytes, then u32 rank, u64 dims, u32 type, u64 offset)."""
    data = bytearray(src.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 2
    struct.pack_into("<2Q", data, at + 4, *OVERFLOW_DIMS)
    src.write_bytes(bytes(data))
    return src, (str(src), "tensor token_embd.weight", f"needs {OVERFLOW_F32_BYTES} bytes",
                 "runs past the end of the file")


def safetensors_overflow_shape(src: Path):
    """model.norm.weight declared [2**32, 2**32] F32 holding 0 bytes: an int64 byte count of 0
    matched its empty data_offsets."""
    path = src / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    begin = header["model.norm.weight"]["data_offsets"][0]
    header["model.norm.weight"].update(shape=OVERFLOW_DIMS, data_offsets=[begin, begin])
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return src, (str(path), "tensor model.norm.weight", f"needs {OVERFLOW_F32_BYTES}")


def _tokenizer_too_big(tokenizer_file: str, embedding_file: str, ids: int, rows: int):
    return no_damage(lambda s: str(s / tokenizer_file) if tokenizer_file else str(s),
                     lambda s: str(s / embedding_file) if embedding_file else str(s),
                     f"{ids} token ids", f"only {rows} rows", ALLOW_SMALL_VOCAB)


# id -> (format, base, damage)
CONVERT_CASES = {
    "meta-dim-string": ("meta", "meta", edit_json("params.json", dim="sixty-four")),
    "meta-norm_eps-string": ("meta", "meta", edit_json("params.json", norm_eps="tiny")),
    "meta-vocab_size-string": ("meta", "meta", edit_json("params.json", vocab_size="256")),
    "meta-multiple_of-0": ("meta", "meta", edit_json("params.json", multiple_of=0)),
    "meta-n_heads-true": ("meta", "meta", edit_json("params.json", n_heads=True)),
    "meta-dim-64.9": ("meta", "meta", edit_json("params.json", dim=64.9)),
    "meta-rope_theta-negative": ("meta", "meta", edit_json("params.json", rope_theta=-1)),
    "meta-tokenizer-past-embedding": ("meta", "meta", _tokenizer_too_big(
        "tokenizer.model", "consolidated.00.pth", 128256, 256)),
    "meta-not-a-checkpoint": ("meta", "meta", not_a_checkpoint("params.json", ": not found")),
    "hf-hidden_size-string": ("hf", "hf", edit_json("config.json", hidden_size="sixty-four")),
    "hf-tokenizer-past-embedding": ("hf", "hf_small", _tokenizer_too_big(
        "tokenizer.json", "model.safetensors", ref.VOCAB, SMALL_EMBEDDING)),
    "hf-shape-overflow": ("hf", "hf", safetensors_overflow_shape),
    "hf-not-a-checkpoint": ("hf", "hf", not_a_checkpoint("config.json", ": not found")),
    "gguf-dims-overflow": ("gguf", "gguf", gguf_overflow_dims),
    "gguf-tokenizer-past-embedding": ("gguf", "gguf_small", _tokenizer_too_big(
        "", "", ref.VOCAB, SMALL_EMBEDDING)),
    "gguf-not-a-file": ("gguf", "gguf", not_a_checkpoint("", ": not a file")),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_bad_input_is_one_error_line_and_nothing_written(case, bases, tmp_path, capsys):
    fmt, base, damage = CONVERT_CASES[case]
    src, needles = damage(_copy(bases[base], tmp_path))
    capsys.readouterr()     # building the base (save_pretrained's progress bar) is not the CLI
    expect_error(capsys, fmt, src, tmp_path / "out", *needles)


def test_python_dash_m_convert_exit_code(bases, tmp_path):
    """The real command: exit code 2 and the same one line, for the GGUF overflow."""
    src, needles = gguf_overflow_dims(_copy(bases["gguf"], tmp_path))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "convert", "--format", "gguf", "--input",
                           str(src), "--output", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, *needles)
    assert_nothing_written(out)


# --- --output problems (checked before any tensor is read) ---------------------------------------

@pytest.fixture
def hf_base(bases, capsys) -> Path:
    folder = bases["hf"]
    capsys.readouterr()     # building it is not the CLI's output
    return folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder anyway; "
                    "test_output_parent_that_is_a_file covers an unwritable parent")
def test_output_parent_without_write_permission(hf_base, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        expect_error(capsys, "hf", hf_base, parent / "out", str(parent), "not writable")
    finally:
        parent.chmod(0o755)


def test_output_parent_that_is_a_file(hf_base, tmp_path, capsys):
    parent = tmp_path / "notes.txt"
    parent.write_text("not a folder")
    expect_error(capsys, "hf", hf_base, parent / "deeper" / "out", str(parent),
                 "is not a folder")
    assert parent.read_text() == "not a folder"


def test_overwrite_of_a_folder_that_is_not_a_converted_model(hf_base, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "config.json").write_text("{}")      # looks a little like one, but no conversion.json
    (out / "img.jpg").write_bytes(b"\xff\xd8")
    assert run_convert("hf", hf_base, out, "--overwrite") == 2
    assert_one_error_line(capsys.readouterr().err, str(out), "refusing to delete it")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "img.jpg"]
    assert (out / "img.jpg").read_bytes() == b"\xff\xd8" and not hidden_siblings(out)


# --- load_converted on broken folders ------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(bases, tmp_path_factory) -> dict:
    """name -> a converted folder: "hf" (tokenizer fits), "meta_small" (--allow-small-vocab)."""
    root = tmp_path_factory.mktemp("converted")
    assert run_convert("hf", bases["hf"], root / "hf") == 0
    assert convert_meta(bases["meta"], root / "meta_small") == 0
    return {"hf": root / "hf", "meta_small": root / "meta_small"}


def write(relative: str, content, *needles):
    def damage(folder: Path):
        path = folder / relative
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return (str(path), *needles)
    return damage


def remove(relative: str, *needles, recreate_empty: bool = False):
    def damage(folder: Path):
        shutil.rmtree(folder / relative)
        if recreate_empty:
            (folder / relative).mkdir()
        return (str(folder / relative), *needles)
    return damage


def edit_config(**changes):
    def damage(folder: Path):
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        (field, value), = changes.items()
        return (str(path), field, repr(value))
    return damage


def orbax_metadata_garbage(folder: Path):
    for path in (folder / "params").rglob("*METADATA*"):
        path.write_bytes(b"\x00garbage")
    return (str(folder / "params"), "orbax checkpoint metadata")


def forget_small_vocab(folder: Path):
    path = folder / "conversion.json"
    provenance = json.loads(path.read_text())
    provenance["allow_small_vocab"] = False
    path.write_text(json.dumps(provenance))
    return (str(folder / "tokenizer"), "128256 token ids", "256 rows", ALLOW_SMALL_VOCAB)


# id -> (converted folder, damage returning needles)
LOAD_CASES = {
    "params-empty": ("hf", remove("params", "empty", recreate_empty=True)),
    "params-missing": ("hf", remove("params", "missing")),
    "params-metadata-garbage": ("hf", orbax_metadata_garbage),
    "tokenizer-missing": ("hf", remove("tokenizer", "missing", "load_tokenizer=False")),
    "tokenizer-config-not-json": ("hf", write("tokenizer/tokenizer_config.json", "{")),
    "config-not-json": ("hf", write("config.json", "vocab_size = 260", "not valid JSON")),
    "config-not-utf8": ("hf", write("config.json", b"\xff\xfe{}", "not valid JSON")),
    "config-null": ("hf", write("config.json", "null", "expected a JSON object")),
    "config-tie_embeddings-string": ("hf", edit_config(tie_embeddings="no")),
    "config-head_dim-float": ("hf", edit_config(head_dim=16.0)),
    "config-rope_scaling-string": ("hf", edit_config(rope_scaling="llama3")),
    "conversion-json-not-json": ("hf", write("conversion.json", "{'format': 'hf'}",
                                             "not valid JSON")),
    "tokenizer-past-embedding-not-recorded": ("meta_small", forget_small_vocab),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_broken_converted_folder_is_a_checkpoint_error(case, converted, tmp_path):
    name, damage = LOAD_CASES[case]
    folder = _copy(converted[name], tmp_path)
    needles = damage(folder)
    with pytest.raises(CheckpointError) as err:
        load_converted(folder)
    message = str(err.value)
    assert str(folder) in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_load_without_tokenizer_needs_no_tokenizer_folder(converted, tmp_path):
    """The refusal above is about the tokenizer only: the rest of the folder still loads."""
    folder = _copy(converted["hf"], tmp_path)
    shutil.rmtree(folder / "tokenizer")
    model = load_converted(folder, load_tokenizer=False)
    assert model.tokenizer is None and model.embedding_rows == ref.VOCAB
