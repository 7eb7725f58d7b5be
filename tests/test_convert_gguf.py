"""`python -m convert --format gguf` against transformers reading the same GGUF file.

Tiny random HF Llamas are written as llama.cpp writes them (q/k permuted into the interleaved
layout, llama.cpp tensor names, F32 / F16 / Q8_0 / Q4_1 through `gguf.quants.quantize`), converted
by our CLI, and compared with `LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`, which
dequantizes and un-permutes with its own code. Unquantized files are also compared with the HF
model they came from, and llama.cpp's `rope_freqs.weight` (Llama 3 scaling) with the HF model's
own llama3 RoPE. Bad inputs: another architecture, truncated files, missing / misshapen tensors.
"""

import json
import shutil

import gguf
import ml_dtypes
import numpy as np
import pytest

import _convert_helpers as helpers
import _hf_reference as ref
from _convert_helpers import params_leaves, run_convert
from gptk_jax.llama.checkpoint import load_converted

Q = gguf.GGMLQuantizationType
LOGITS_ATOL = 1e-4
SPREAD = np.arange(17)[None] * 6000  # RoPE positions far apart: the scaling factor matters

# name -> (hf_config changes, {tensor-name substring: type}, scan_layers)
CASES = {
    "f32_untied_kv2": (dict(n_kv_heads=2), {}, False),
    "q8embd_q41_tied_kv1_scan": (dict(n_kv_heads=1, tied=True),
                                 {"token_embd": Q.Q8_0, "blk.": Q.Q4_1}, True),
    "f16_untied_kv4": (dict(n_kv_heads=4), {"": Q.F16}, False),
    "q8_untied_kv2_scan": (dict(n_kv_heads=2), {"": Q.Q8_0}, True),
}


# --- helpers ------------------------------------------------------------------------------------

def convert_gguf(src, out, *extra) -> int:
    return run_convert("gguf", src, out, *extra)


def expect_error(capsys, src, out, *needles) -> str:
    return helpers.expect_error(capsys, "gguf", src, out, *needles)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case name -> (source HF model, transformers' model from the GGUF, our conversion, dir)."""
    cache = {}

    def get(name):
        if name not in cache:
            changes, types, scan = CASES[name]
            model = ref.build_hf_model(ref.hf_config(**changes), seed=10 + len(cache))
            root = tmp_path_factory.mktemp(name)
            ref.write_gguf(root / "model.gguf", model, types=types)
            assert convert_gguf(root / "model.gguf", root / "out") == 0
            cache[name] = (model, ref.hf_from_gguf(root / "model.gguf"),
                           load_converted(root / "out", scan_layers=scan), root)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def base_model():
    return ref.build_hf_model(ref.hf_config(n_kv_heads=2), seed=7)


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory, base_model):
    return ref.write_gguf(tmp_path_factory.mktemp("base") / "model.gguf", base_model,
                          types={"blk.": Q.Q8_0})


# --- parity with transformers -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_reading_the_same_gguf(converted, name):
    source, from_gguf, ours, root = converted(name)
    changes, types, scan = CASES[name]
    assert ours.config.n_kv_heads == changes["n_kv_heads"] and ours.config.scan_layers == scan
    assert ours.config.tie_embeddings == changes.get("tied", False) == \
        from_gguf.config.tie_word_embeddings
    tokens = np.random.RandomState(0).randint(0, ref.VOCAB, (2, 17))
    want = ref.hf_logits(from_gguf, tokens)
    np.testing.assert_allclose(ref.our_logits(ours, tokens), want, rtol=0, atol=LOGITS_ATOL)
    assert want.std() > 0.5
    np.testing.assert_allclose(ref.our_logits(ours, tokens, SPREAD.repeat(2, 0)),
                               ref.hf_logits(from_gguf, tokens, SPREAD.repeat(2, 0)),
                               rtol=0, atol=LOGITS_ATOL)
    quantized = any(t not in (Q.F32, Q.F16) for t in types.values())
    off_source = np.abs(ref.our_logits(ours, tokens) - ref.hf_logits(source, tokens)).max()
    if quantized:  # the weights really went through the quantizer
        assert off_source > 1e-3
    provenance = json.loads((root / "out" / "conversion.json").read_text())
    assert provenance["format"] == "gguf"
    assert set(provenance["tensor_types"]) == {"F32"} | {t.name for t in types.values()}


@pytest.mark.parametrize("name", ["f32_untied_kv2", "f16_untied_kv4"])
def test_unquantized_gguf_matches_the_hf_model_it_came_from(converted, name):
    """Independent of transformers' GGUF code: the un-permuted weights are the HF model's."""
    source, _, ours, _ = converted(name)
    tokens = np.random.RandomState(1).randint(0, ref.VOCAB, (2, 17))
    atol = LOGITS_ATOL if name.startswith("f32") else 2e-2  # F16 rounding of the weights
    np.testing.assert_allclose(ref.our_logits(ours, tokens), ref.hf_logits(source, tokens),
                               rtol=0, atol=atol)


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_continuation_matches_transformers_generate(converted, name):
    _, from_gguf, ours, _ = converted(name)
    prompt = np.random.RandomState(2).randint(0, ref.VOCAB, (2, 7))
    want = ref.hf_greedy(from_gguf, prompt, 10)
    assert ref.our_greedy(ours, prompt, 10) == want
    assert len(set(want[0] + want[1])) > 4


def test_skipping_the_qk_permutation_breaks_parity(base_gguf, base_model, tmp_path, monkeypatch):
    """Without interleaved -> half-split on attn_q / attn_k the logits are far off: the parity
    tests do see the RoPE layout."""
    import convert.common
    monkeypatch.setattr(convert.common, "interleaved_to_half_split", lambda w, n, h: w)
    assert convert_gguf(base_gguf, tmp_path / "out") == 0
    ours = load_converted(tmp_path / "out")
    tokens = np.random.RandomState(0).randint(0, ref.VOCAB, (2, 17))
    assert np.abs(ref.our_logits(ours, tokens) - ref.hf_logits(base_model, tokens)).max() > 1e-2


def test_tokenizer_from_gguf_metadata(converted):
    _, _, ours, _ = converted("f32_untied_kv2")
    tok = ours.tokenizer
    assert (tok.bos_id, tok.eos_id) == (ref.BOS_ID, ref.EOS_ID) and not tok.add_bos
    assert ref.EOS_ID in tok.stop_ids and tok.vocab_size == ref.VOCAB
    ids = tok.encode("the theme")
    assert 256 in ids and 257 in ids and tok.decode(ids) == "the theme"


def test_gguf_without_tokenizer_converts_with_a_warning(base_model, tmp_path, capsys):
    path = ref.write_gguf(tmp_path / "m.gguf", base_model, tokenizer=False)
    assert convert_gguf(path, tmp_path / "out") == 0
    assert "warning: no tokenizer written" in capsys.readouterr().out
    assert not (tmp_path / "out" / "tokenizer").exists()
    ours = load_converted(tmp_path / "out", load_tokenizer=False)
    tokens = np.random.RandomState(3).randint(0, ref.VOCAB, (1, 9))
    np.testing.assert_allclose(ref.our_logits(ours, tokens), ref.hf_logits(base_model, tokens),
                               rtol=0, atol=LOGITS_ATOL)


def test_bfloat16_is_float32_rounded_to_nearest_even(base_gguf, tmp_path):
    assert convert_gguf(base_gguf, tmp_path / "f32") == 0
    assert convert_gguf(base_gguf, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    f32 = dict(params_leaves(load_converted(tmp_path / "f32", load_tokenizer=False).params))
    bf16 = dict(params_leaves(load_converted(tmp_path / "bf16", load_tokenizer=False).params))
    for name, value in f32.items():
        assert bf16[name].dtype == ml_dtypes.bfloat16, name
        assert np.array_equal(bf16[name].view(np.uint16),
                              value.astype(ml_dtypes.bfloat16).view(np.uint16)), name


# --- Llama 3 RoPE scaling as llama.cpp stores it ------------------------------------------------

@pytest.fixture(scope="module")
def scaled_model():
    return ref.build_hf_model(ref.hf_config(n_kv_heads=2, rope_factor=32), seed=3)


def test_rope_freqs_tensor_gives_llama3_scaling(scaled_model, tmp_path, capsys):
    path = ref.write_gguf(tmp_path / "m.gguf", scaled_model,
                          rope_freqs=ref.llama3_rope_factors(scaled_model.config))
    assert convert_gguf(path, tmp_path / "out") == 0
    assert "RoPE scaling: factor 32" in capsys.readouterr().out
    ours = load_converted(tmp_path / "out")
    assert ours.config.rope_scaling.factor == 32.0
    assert "rope_freqs.weight" in ours.config.rope_scaling_source
    tokens = np.random.RandomState(4).randint(0, ref.VOCAB, (1, 17))
    np.testing.assert_allclose(ref.our_logits(ours, tokens, SPREAD),
                               ref.hf_logits(scaled_model, tokens, SPREAD),
                               rtol=0, atol=LOGITS_ATOL)
    # ... and without the tensor, the same weights are off at spread positions
    plain = ref.write_gguf(tmp_path / "plain.gguf", scaled_model)
    assert convert_gguf(plain, tmp_path / "plain") == 0
    unscaled = load_converted(tmp_path / "plain")
    assert unscaled.config.rope_scaling is None
    assert np.abs(ref.our_logits(unscaled, tokens, SPREAD)
                  - ref.hf_logits(scaled_model, tokens, SPREAD)).max() > 1e-2


def test_rope_scaling_factor_flag_overrides_rope_freqs(scaled_model, tmp_path, capsys):
    path = ref.write_gguf(tmp_path / "m.gguf", scaled_model,
                          rope_freqs=ref.llama3_rope_factors(scaled_model.config))
    assert convert_gguf(path, tmp_path / "out", "--rope-scaling-factor", 0) == 0
    printed = capsys.readouterr().out
    assert "RoPE scaling: off" in printed and "warning: rope_freqs.weight ignored" in printed
    assert load_converted(tmp_path / "out").config.rope_scaling is None


def test_rope_freqs_that_are_not_llama3_scaling(scaled_model, tmp_path, capsys):
    path = ref.write_gguf(tmp_path / "m.gguf", scaled_model,
                          rope_freqs=np.linspace(1, 4, 8))
    expect_error(capsys, path, tmp_path / "out", str(path), "rope_freqs.weight",
                 "not Llama 3 RoPE scaling")


# --- bad inputs: exit code 2, one line naming the file, nothing written ------------------------

def test_other_architecture_is_refused(base_model, tmp_path, capsys):
    path = ref.write_gguf(tmp_path / "gpt2.gguf", base_model, architecture="gpt2")
    expect_error(capsys, path, tmp_path / "out", str(path), "general.architecture is 'gpt2'",
                 "only 'llama'")


def test_truncated_tensor_data(base_gguf, tmp_path, capsys):
    path = tmp_path / "cut.gguf"
    path.write_bytes(base_gguf.read_bytes()[:-300])
    expect_error(capsys, path, tmp_path / "out", str(path), "tensor ", "runs past the end",
                 "truncated")


def test_truncated_header(base_gguf, tmp_path, capsys):
    path = tmp_path / "cut.gguf"
    data = base_gguf.read_bytes()
    path.write_bytes(data[:1000])  # inside the metadata: the token list
    expect_error(capsys, path, tmp_path / "out", str(path), "tokenizer.ggml.tokens", "truncated")


def test_not_a_gguf_file(base_gguf, tmp_path, capsys):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + base_gguf.read_bytes()[4:])
    expect_error(capsys, path, tmp_path / "out", str(path), "not a GGUF file")


def test_missing_tensor_is_listed(base_model, tmp_path, capsys):
    path = ref.write_gguf(tmp_path / "m.gguf", base_model, drop=("blk.1.ffn_up.weight",))
    expect_error(capsys, path, tmp_path / "out", str(path),
                 "missing tensors ['blk.1.ffn_up.weight']")


def test_shape_that_disagrees_with_metadata(base_model, tmp_path, capsys):
    path = ref.write_gguf(tmp_path / "m.gguf", base_model, feed_forward_length=96)
    expect_error(capsys, path, tmp_path / "out", str(path), "blk.0.ffn_gate.weight",
                 "(128, 64)", "(96, 64)")


def test_directory_instead_of_file(base_gguf, tmp_path, capsys):
    folder = tmp_path / "folder"
    shutil.copytree(base_gguf.parent, folder)
    expect_error(capsys, folder, tmp_path / "out", "not a file")
