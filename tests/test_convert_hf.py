"""`python -m convert --format hf` against HF transformers' own LlamaForCausalLM.

Tiny random models are saved with `save_pretrained` (safetensors, one file or sharded), converted
by our CLI and loaded with `load_converted`; logits (contiguous, and at positions far apart,
where the Llama 3 RoPE scaling factor matters) and greedy continuations (ours: explicit KV
cache, one token per call; HF: `generate`) must match. Also: bfloat16 files, the tokenizer, and every bad input the reader
promises to name (corrupt safetensors headers, missing / extra / misshapen tensors).
"""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import _convert_helpers as helpers
import _hf_reference as ref
from _convert_helpers import params_leaves, run_convert
from conftest import ROOT
from gptk_jax.llama.checkpoint import load_converted

LOGITS_ATOL = 1e-4
# RoPE positions 6000 apart: relative distances up to 96000, where the low frequencies Llama 3
# scaling divides rotate far enough for the factor to matter (RoPE only sees distances).
SPREAD = np.arange(17)[None] * 6000

# name -> (hf_config changes, scan_layers, max_shard_size, legacy config.json spelling):
# kv heads 1, 2 and = heads; tied / untied; RoPE scaling 32, 8 and off; scan on / off; sharded.
CASES = {
    "kv1_untied_factor32": (dict(n_kv_heads=1, rope_factor=32), False, None, False),
    "kv2_tied_factor8_scan": (dict(n_kv_heads=2, tied=True, rope_factor=8), True, None, False),
    "kv4_untied_unscaled_sharded_scan": (dict(n_kv_heads=4), True, "20KB", False),
    "kv2_tied_factor32_sharded_legacy": (dict(n_kv_heads=2, tied=True, rope_factor=32), False,
                                         "40KB", True),
}


# --- helpers ------------------------------------------------------------------------------------

def convert_hf(src: Path, out: Path, *extra) -> int:
    return run_convert("hf", src, out, *extra)


def expect_error(capsys, src: Path, out: Path, *needles) -> str:
    return helpers.expect_error(capsys, "hf", src, out, *needles)


def read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case name -> (HF model, our loaded conversion, folder); built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            changes, scan, shard, legacy = CASES[name]
            model = ref.build_hf_model(ref.hf_config(**changes), seed=len(cache))
            root = tmp_path_factory.mktemp(name)
            ref.write_hf_checkpoint(root / "hf", model, max_shard_size=shard,
                                    legacy_rope_config=legacy)
            assert convert_hf(root / "hf", root / "out") == 0
            cache[name] = (model, load_converted(root / "out", scan_layers=scan), root)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def base_model():
    return ref.build_hf_model(ref.hf_config(n_kv_heads=2), seed=7)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, base_model) -> Path:
    """A valid single-file HF folder; error tests copy and damage it."""
    return ref.write_hf_checkpoint(tmp_path_factory.mktemp("base") / "hf", base_model)


@pytest.fixture
def damaged(base_checkpoint, tmp_path) -> Path:
    src = tmp_path / "hf"
    shutil.copytree(base_checkpoint, src)
    return src


# --- parity with transformers -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(converted, name):
    model, ours, root = converted(name)
    changes, scan, shard, _ = CASES[name]
    cfg = ours.config
    assert cfg.n_kv_heads == changes["n_kv_heads"] and cfg.scan_layers == scan
    assert cfg.tie_embeddings == changes.get("tied", False)
    factor = changes.get("rope_factor")
    assert (cfg.rope_scaling.factor if cfg.rope_scaling else None) == factor
    if shard:
        assert len(list((root / "hf").glob("*.safetensors"))) > 2
    tokens = np.random.RandomState(0).randint(0, ref.VOCAB, (2, 17))
    want = ref.hf_logits(model, tokens)
    np.testing.assert_allclose(ref.our_logits(ours, tokens), want, rtol=0, atol=LOGITS_ATOL)
    assert want.std() > 0.5  # far from uniform: the comparison has something to see
    positions = SPREAD.repeat(2, 0)
    np.testing.assert_allclose(ref.our_logits(ours, tokens, positions),
                               ref.hf_logits(model, tokens, positions), rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_continuation_matches_transformers_generate(converted, name):
    model, ours, _ = converted(name)
    prompt = np.random.RandomState(2).randint(0, ref.VOCAB, (2, 7))
    want = ref.hf_greedy(model, prompt, 10)
    assert ref.our_greedy(ours, prompt, 10) == want
    assert len(set(want[0] + want[1])) > 4  # not a degenerate repeat


def test_rope_scaling_is_read_from_config_json_and_reported(converted, capsys, tmp_path):
    _, ours, root = converted("kv1_untied_factor32")
    assert ours.config.rope_scaling.factor == 32.0
    assert "config.json" in ours.config.rope_scaling_source
    provenance = json.loads((root / "out" / "conversion.json").read_text())
    assert provenance["format"] == "hf" and "factor 32" in provenance["rope_scaling"]
    assert convert_hf(root / "hf", tmp_path / "again") == 0
    assert "RoPE scaling: factor 32" in capsys.readouterr().out


def test_spread_positions_see_the_rope_factor(converted, tmp_path):
    """Converting the factor-32 model with --rope-scaling-factor 8 breaks the spread-position
    comparison: it does test the scaling factor read from config.json."""
    model, _, root = converted("kv1_untied_factor32")
    assert convert_hf(root / "hf", tmp_path / "out", "--rope-scaling-factor", 8) == 0
    wrong = load_converted(tmp_path / "out")
    assert wrong.config.rope_scaling.factor == 8.0
    tokens = np.random.RandomState(0).randint(0, ref.VOCAB, (1, 17))
    positions = SPREAD
    diff = np.abs(ref.our_logits(wrong, tokens, positions)
                  - ref.hf_logits(model, tokens, positions)).max()
    assert diff > 1e-2


def test_sharded_and_single_file_convert_bit_for_bit(converted, tmp_path):
    model, sharded, root = converted("kv4_untied_unscaled_sharded_scan")
    assert (root / "hf" / "model.safetensors.index.json").is_file()
    ref.write_hf_checkpoint(tmp_path / "hf", model)
    assert convert_hf(tmp_path / "hf", tmp_path / "out") == 0
    single = load_converted(tmp_path / "out", scan_layers=True)
    a, b = dict(params_leaves(sharded.params)), dict(params_leaves(single.params))
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_tokenizer_json_is_converted_with_ids_from_the_hf_files(converted):
    from tokenizers import Tokenizer

    _, ours, root = converted("kv1_untied_factor32")
    tok = ours.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.BOS_ID, ref.EOS_ID, ref.EOS_ID)
    assert tok.stop_ids == {ref.EOS_ID} and tok.add_bos and tok.vocab_size == ref.VOCAB
    text = "the theme: Grüße"
    hf = Tokenizer.from_file(str(root / "hf" / "tokenizer.json"))
    ids = tok.encode(text, bos=True)
    assert ids == [ref.BOS_ID] + hf.encode(text, add_special_tokens=False).ids
    assert 256 in ids and 257 in ids and tok.decode(ids[1:]) == text


def test_folder_without_tokenizer_converts_with_a_warning(base_model, tmp_path, capsys):
    ref.write_hf_checkpoint(tmp_path / "hf", base_model, tokenizer=False)
    assert convert_hf(tmp_path / "hf", tmp_path / "out") == 0
    assert "warning:" in capsys.readouterr().out
    assert not (tmp_path / "out" / "tokenizer").exists()
    ours = load_converted(tmp_path / "out", load_tokenizer=False)
    tokens = np.random.RandomState(3).randint(0, ref.VOCAB, (1, 9))
    np.testing.assert_allclose(ref.our_logits(ours, tokens), ref.hf_logits(base_model, tokens),
                               rtol=0, atol=LOGITS_ATOL)


# --- dtypes -------------------------------------------------------------------------------------

def test_bfloat16_safetensors(base_model, tmp_path):
    """A bf16 checkpoint: float32 output matches transformers loading the same files in float32;
    --dtype bfloat16 keeps the stored bits exactly."""
    from transformers import LlamaForCausalLM

    ref.write_hf_checkpoint(tmp_path / "hf", base_model, dtype=torch.bfloat16)
    header, _ = read_header(tmp_path / "hf" / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert convert_hf(tmp_path / "hf", tmp_path / "f32") == 0
    assert convert_hf(tmp_path / "hf", tmp_path / "bf16", "--dtype", "bfloat16") == 0
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_converted(tmp_path / "f32")
    tokens = np.random.RandomState(5).randint(0, ref.VOCAB, (2, 11))
    np.testing.assert_allclose(ref.our_logits(ours, tokens), ref.hf_logits(hf, tokens),
                               rtol=0, atol=LOGITS_ATOL)
    bf16 = load_converted(tmp_path / "bf16", load_tokenizer=False)
    assert bf16.config.param_dtype == "bfloat16"
    stored = hf.model.embed_tokens.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    got = np.asarray(bf16.params["tok_embeddings"]["embedding"])
    assert got.dtype == ml_dtypes.bfloat16
    assert np.array_equal(got.view(np.int16), stored)
    for name, value in params_leaves(load_converted(tmp_path / "f32").params):
        assert value.dtype == np.float32, name


# --- the command users run ----------------------------------------------------------------------

def test_python_dash_m_convert(base_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "convert", "--format", "hf", "--input",
                           str(base_checkpoint), "--output", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "kv heads 2" in proc.stdout
    assert (tmp_path / "out" / "params").is_dir() and (tmp_path / "out" / "tokenizer").is_dir()


# --- bad inputs: exit code 2, one line naming file and tensor, nothing written -----------------

def test_offsets_beyond_the_file(damaged, tmp_path, capsys):
    path = damaged / "model.safetensors"
    header, body = read_header(path)
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin + 10**6, end + 10**6]
    write_header(path, header, body)
    expect_error(capsys, damaged, tmp_path / "out", str(path), "tensor model.norm.weight",
                 "run past the end")


def test_truncated_safetensors(damaged, tmp_path, capsys):
    path = damaged / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    expect_error(capsys, damaged, tmp_path / "out", str(path), "truncated")


def test_header_length_beyond_the_file(damaged, tmp_path, capsys):
    path = damaged / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    expect_error(capsys, damaged, tmp_path / "out", str(path), "header length")


def test_header_that_is_not_json(damaged, tmp_path, capsys):
    path = damaged / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("#")
    path.write_bytes(bytes(data))
    expect_error(capsys, damaged, tmp_path / "out", str(path), "not valid JSON")


def test_offsets_inconsistent_with_dtype_and_shape(damaged, tmp_path, capsys):
    path = damaged / "model.safetensors"
    header, body = read_header(path)
    header["model.layers.1.mlp.up_proj.weight"]["dtype"] = "F16"
    write_header(path, header, body)
    expect_error(capsys, damaged, tmp_path / "out", "tensor model.layers.1.mlp.up_proj.weight",
                 "F16 (128, 64) needs 16384")


def test_overlapping_tensors(damaged, tmp_path, capsys):
    path = damaged / "model.safetensors"
    header, body = read_header(path)
    header["model.layers.0.input_layernorm.weight"]["data_offsets"] = \
        header["model.layers.0.post_attention_layernorm.weight"]["data_offsets"]
    write_header(path, header, body)
    expect_error(capsys, damaged, tmp_path / "out", str(path), "overlap",
                 "model.layers.0.input_layernorm.weight")


def _rewrite_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_and_extra_tensors_are_listed(damaged, tmp_path, capsys):
    def edit(state):
        del state["model.layers.1.self_attn.k_proj.weight"]
        del state["lm_head.weight"]
        state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    _rewrite_tensors(damaged, edit)
    expect_error(capsys, damaged, tmp_path / "out", str(damaged),
                 "'model.layers.1.self_attn.k_proj.weight'", "'lm_head.weight'",
                 "unexpected tensors ['model.layers.0.self_attn.q_proj.bias']",
                 "num_hidden_layers=2")


def test_wrong_shape_names_tensor_and_both_shapes(damaged, tmp_path, capsys):
    _rewrite_tensors(damaged, lambda s: s.update(
        {"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 96)}))
    expect_error(capsys, damaged, tmp_path / "out", "model.safetensors",
                 "model.layers.1.mlp.down_proj.weight", "(64, 96)", "(64, 128)")


def test_index_naming_a_missing_shard(converted, tmp_path, capsys):
    _, _, root = converted("kv4_untied_unscaled_sharded_scan")
    src = tmp_path / "hf"
    shutil.copytree(root / "hf", src)
    victim = sorted(src.glob("model-*.safetensors"))[3]
    victim.unlink()
    expect_error(capsys, src, tmp_path / "out", "model.safetensors.index.json", victim.name)


def test_missing_config_json(damaged, tmp_path, capsys):
    (damaged / "config.json").unlink()
    expect_error(capsys, damaged, tmp_path / "out", str(damaged / "config.json"), "not found")


def test_unsupported_rope_type(damaged, tmp_path, capsys):
    cfg = json.loads((damaged / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}
    (damaged / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, damaged, tmp_path / "out", "config.json", "'yarn'")
