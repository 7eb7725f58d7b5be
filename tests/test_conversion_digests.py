"""Converted weights are verified on load (issue 27, finding 4): conversion.json records a digest
per written tensor, `load_converted` recomputes them and names the tensor (and its folder under
params/) that differs; a folder from before digests loads with a warning; a flag skips it."""

import json
import shutil

import jax
import numpy as np
import pytest

from gptk_jax.llama.checkpoint import (DIGESTS_KEY, PROVENANCE_FILE, SKIP_DIGESTS_ENV,
                                       CheckpointError, _save_params, load_converted,
                                       tensor_digest)
from gptk_jax.training.inputs import ensure_tiny_trunk

TENSOR = "layers.attention.wq.kernel"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_tiny_trunk(tmp_path_factory.mktemp("digests") / "tiny")


@pytest.fixture
def model(model_dir, tmp_path):
    """A fresh copy of the tiny converted model, free to damage."""
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    return out


def _chunk_files(model, name=TENSOR):
    files = sorted(p for p in (model / "params" / name).iterdir() if not p.name.startswith("."))
    assert files, f"no chunk files under {model / 'params' / name}"
    return files


def test_conversion_records_a_digest_per_tensor(model):
    record = json.loads((model / PROVENANCE_FILE).read_text())[DIGESTS_KEY]
    assert record["algorithm"] == "crc32"
    loaded = load_converted(model, load_tokenizer=False, scan_layers=True)
    names = {".".join(k.key for k in path) for path, _ in
             jax.tree_util.tree_leaves_with_path(loaded.params)}
    assert set(record["tensors"]) == names
    wq = np.asarray(loaded.params["layers"]["attention"]["wq"]["kernel"])
    assert record["tensors"][TENSOR] == tensor_digest(wq)
    for name in names:   # each named like its folder under params/
        assert (model / "params" / name).is_dir()


def test_a_modified_tensor_is_named(model, tmp_path):
    """A tensor's files replaced by those of other values (a valid checkpoint, every value
    finite): loading names the tensor, its folder and both digests."""
    params = load_converted(model, load_tokenizer=False, scan_layers=True).params
    params = jax.tree.map(np.array, params)
    params["layers"]["attention"]["wq"]["kernel"][0, 0, 0, 0] += 1e-3
    _save_params(tmp_path / "other", params)
    shutil.rmtree(model / "params" / TENSOR)
    shutil.copytree(tmp_path / "other" / TENSOR, model / "params" / TENSOR)
    with pytest.raises(CheckpointError) as e:
        load_converted(model)
    message = str(e.value)
    assert f"tensor {TENSOR} differs" in message and str(model / "params" / TENSOR) in message
    assert "crc32" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["bit", "zeros", "truncated"])
def test_damaged_files_are_refused_naming_the_tensor(model, damage):
    path = _chunk_files(model)[0]
    data = bytearray(path.read_bytes())
    if damage == "bit":
        data[len(data) // 2] ^= 0x10
    elif damage == "zeros":
        start = min(64, len(data) // 4)
        data[start:start + 4096] = bytes(len(data[start:start + 4096]))
    else:
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_converted(model)
    assert f"tensor {TENSOR}" in str(e.value)


def test_skipping_verification(model, tmp_path, monkeypatch):
    params = jax.tree.map(np.array, load_converted(model, load_tokenizer=False,
                                                   scan_layers=True).params)
    params["norm"]["scale"][0] = 2.0
    _save_params(tmp_path / "other", params)
    shutil.rmtree(model / "params" / "norm.scale")
    shutil.copytree(tmp_path / "other" / "norm.scale", model / "params" / "norm.scale")
    with pytest.raises(CheckpointError, match="tensor norm.scale differs"):
        load_converted(model)
    loaded = load_converted(model, verify_digests=False)
    assert float(np.asarray(loaded.params["norm"]["scale"])[0]) == 2.0
    monkeypatch.setenv(SKIP_DIGESTS_ENV, "1")
    load_converted(model)


def test_a_folder_without_digests_loads_with_a_warning(model, capsys):
    provenance = json.loads((model / PROVENANCE_FILE).read_text())
    del provenance[DIGESTS_KEY]
    (model / PROVENANCE_FILE).write_text(json.dumps(provenance))
    load_converted(model)
    err = capsys.readouterr().err
    assert "warning:" in err and "records no tensor digests" in err
    assert str(model / PROVENANCE_FILE) in err


def test_a_digest_record_missing_a_tensor(model):
    provenance = json.loads((model / PROVENANCE_FILE).read_text())
    del provenance[DIGESTS_KEY]["tensors"][TENSOR]
    (model / PROVENANCE_FILE).write_text(json.dumps(provenance))
    with pytest.raises(CheckpointError, match=f"tensor {TENSOR} has no digest"):
        load_converted(model)


def test_bfloat16_tensors_have_digests(tmp_path):
    from gptk_jax.llama.checkpoint import save_converted
    from gptk_jax.llama.model import init_params
    from gptk_jax.training.inputs import tiny_trunk_config
    config = tiny_trunk_config().replace(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.device_get(init_params(config, jax.random.PRNGKey(0)))
    out = save_converted(tmp_path / "bf16", config, params)
    record = json.loads((out / PROVENANCE_FILE).read_text())[DIGESTS_KEY]["tensors"]
    wq = np.asarray(params["layers"]["attention"]["wq"]["kernel"])
    assert str(wq.dtype) == "bfloat16" and record[TENSOR] == tensor_digest(wq)
    load_converted(out, load_tokenizer=False)
