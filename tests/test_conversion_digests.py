"""Converted weights are verified on load (issue 27, finding 4): conversion.json records a digest
per written tensor, `load_converted` recomputes them and names the tensor (and its folder under
params/) that differs; a folder from before digests loads with a warning; a flag skips it. The
digest is "xxh3_128" (xxHash's XXH3, llama/weight_checks.py); folders that record the earlier
"sums64" or "crc32" digests are verified as before."""

import json
import shutil

import jax
import numpy as np
import pytest

from gptk_jax.llama.checkpoint import (DIGESTS_KEY, PROVENANCE_FILE, SKIP_DIGESTS_ENV,
                                       CheckpointError, _save_params, load_converted,
                                       tensor_digest, tensor_digests)
from gptk_jax.llama.weight_checks import SUM_COLUMNS
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
    assert record["algorithm"] == "xxh3_128"
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
    assert "xxh3_128" in message and "\n" not in message


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


def _record_older(model, algorithm):
    """Rewrites conversion.json as an earlier version wrote it: "sums64" or CRC-32 digests."""
    params = load_converted(model, load_tokenizer=False, scan_layers=True,
                            verify_digests=False).params
    provenance = json.loads((model / PROVENANCE_FILE).read_text())
    provenance[DIGESTS_KEY] = tensor_digests(params, algorithm)
    (model / PROVENANCE_FILE).write_text(json.dumps(provenance))


@pytest.mark.parametrize("algorithm", ["sums64", "crc32"])
def test_a_folder_with_earlier_digests_is_still_verified(model, algorithm):
    _record_older(model, algorithm)
    load_converted(model)
    path = _chunk_files(model)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"tensor {TENSOR}"):
        load_converted(model)


def test_an_unknown_digest_algorithm_says_to_convert_again(model):
    provenance = json.loads((model / PROVENANCE_FILE).read_text())
    provenance[DIGESTS_KEY]["algorithm"] = "sums128"
    (model / PROVENANCE_FILE).write_text(json.dumps(provenance))
    with pytest.raises(CheckpointError, match="'sums128'.*convert the model again"):
        load_converted(model)


def _flip(data, byte, bit):
    data = data.copy()
    data.view(np.uint8)[byte] ^= np.uint8(1 << bit)
    return data


@pytest.mark.parametrize("size", [8 * SUM_COLUMNS * 5 + 8 * 7 + 3,    # full rows + words + bytes
                                  8 * SUM_COLUMNS * 3])
def test_sums64_detects_what_it_promises(size):
    """The damage the "sums64" digest is sure to detect, each built on purpose: bits in any
    position (bit 63 of a word, the tail past the last full row); two flips of one bit position
    in opposite directions in words of one column or of one row (a single sum of either kind
    misses them); a zeroed 4 KiB block; two rows swapped."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    words = data[:size // 8 * 8].view("<u8")
    words[::3] &= ~np.uint64(1 << 63)                     # words 0, 3, ...: bit 63 clear
    words[1::3] |= np.uint64(1 << 63)                     # words 1, 4, ...: bit 63 set
    clean = tensor_digest(data, "sums64")
    damaged = [_flip(data, 0, 0), _flip(data, 7, 7), _flip(data, size - 1, 5),
               _flip(data, size // 2, 3)]
    row = 8 * SUM_COLUMNS
    # same column, rows 0 and 1: word 0 (bit 63 clear -> set) and word 4096 (4096 % 3 == 1:
    # set -> clear) -- the column's sum is unchanged, their rows' sums are not
    assert SUM_COLUMNS % 3 == 1
    damaged.append(_flip(_flip(data, 7, 7), row + 7, 7))
    # same row, words 0 and 1 (clear -> set, set -> clear): the row's sum is unchanged
    damaged.append(_flip(_flip(data, 7, 7), 15, 7))
    zeroed = data.copy()
    zeroed[4096:8192] = 0
    damaged.append(zeroed)
    swapped = data.copy()
    swapped[:row], swapped[row:2 * row] = data[row:2 * row], data[:row]
    damaged.append(swapped)
    digests = [tensor_digest(d, "sums64") for d in damaged]
    assert clean not in digests and len(set(digests)) == len(digests)
    assert tensor_digest(data.copy(), "sums64") == clean           # a function of the bytes
    assert tensor_digest(data[:-1], "sums64") != clean             # the length counts


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sums64"])
def test_digests_of_arrays_of_other_dtypes(algorithm):
    values = np.arange(SUM_COLUMNS * 3, dtype=np.float32).reshape(3, -1)
    digest = tensor_digest(values, algorithm)
    assert digest == tensor_digest(values.view(np.uint8).reshape(-1), algorithm)
    assert tensor_digest(values.T, algorithm) == tensor_digest(np.ascontiguousarray(values.T),
                                                               algorithm)
    assert len(digest) == {"xxh3_128": 32, "sums64": 64}[algorithm]


def test_xxh3_128_is_xxhash_s_own():
    """The default digest is the xxhash package's XXH3-128 of the bytes (checked against its
    streaming interface, fed in two parts), not a digest of our own."""
    import xxhash
    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8)
    stream = xxhash.xxh3_128()
    stream.update(data[:50_000].tobytes())
    stream.update(data[50_000:].tobytes())
    assert tensor_digest(data) == stream.hexdigest()
    assert tensor_digest(_flip(data, 12_345, 6)) != stream.hexdigest()
