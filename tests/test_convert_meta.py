"""`python -m convert --format meta` against Meta's own reference model (llama-models 0.3.0).

Meta's `Transformer` (fairscale layers, interleaved-pair RoPE, its own KV cache) is built with
tiny random float32 weights, saved as Meta saves it (params.json + consolidated.NN.pth +
tokenizer.model), converted by our CLI and loaded with `load_converted`; logits and greedy
continuations must match Meta's. Also: model-parallel shards, tied embeddings, RoPE scaling on,
off and overridden, bfloat16. Bad inputs: test_convert_meta_errors.py, test_convert_bad_inputs.py.
The tiny models' 256-row embedding sits beside the real Llama 3 tokenizer (128,256 ids), so
`convert_meta` passes --allow-small-vocab unless told `small_vocab=False`.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import _meta_reference as ref
from _convert_helpers import (ALLOW_SMALL_VOCAB, META_BASE, META_BASE_SEED, convert_meta,
                              expect_error, params_leaves, write_meta_base)
from conftest import read_lines
from gptk_jax.llama.checkpoint import CheckpointError, load_converted
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama
from gptk_jax.llama.rope import inverse_frequencies

LOGITS_ATOL = 1e-4

BASE = META_BASE  # vocab 256 beside the real Llama 3 tokenizer: --allow-small-vocab

# (params.json changes, tied, scan_layers): every kv-head count, tied / untied, RoPE scaling on /
# off and scan on / off each appear at least once.
CASES = {
    "kv1_scaled": (dict(n_kv_heads=1), False, False),
    "kv2_tied_unscaled_scan": (dict(n_kv_heads=2, use_scaled_rope=False), True, True),
    "kv4_tied_scaled": (dict(n_kv_heads=4), True, False),
    "kv2_unscaled": (dict(n_kv_heads=2, use_scaled_rope=False), False, False),
    "kv4_scaled_scan": (dict(n_kv_heads=4), False, True),
}


# --- helpers ------------------------------------------------------------------------------------

def our_logits(model, tokens) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    out = Llama(model.config).apply({"params": model.params}, jnp.asarray(tokens),
                                    jnp.asarray(positions))
    return np.asarray(out.logits)


def our_greedy(model, prompt, steps: int) -> list[list[int]]:
    """Prefill the prompt into the explicit KV cache, then one token per call."""
    cfg = model.config
    prompt = np.asarray(prompt, np.int32)
    b, t = prompt.shape
    jitted = jax.jit(lambda params, tokens, positions, cache: Llama(cfg).apply(
        {"params": params}, tokens, positions, cache))
    apply = lambda tokens, positions, cache: jitted(model.params, jnp.asarray(tokens),
                                                    jnp.asarray(positions), cache)
    out = apply(prompt, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                KVCache.init(cfg, b, t + steps))
    tokens = []
    for step in range(steps):
        nxt = np.asarray(out.logits[:, -1]).argmax(-1).astype(np.int32)
        tokens.append(nxt)
        out = apply(nxt[:, None], np.full((b, 1), t + step, np.int32), out.cache)
    return np.stack(tokens, 1).tolist()


def case_params(changes: dict) -> dict:
    return {**BASE, **changes}


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case name -> (Meta reference model, our loaded conversion); built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            changes, tied, scan = CASES[name]
            params = case_params(changes)
            model = ref.build_reference(params, seed=len(cache), tied=tied)
            root = tmp_path_factory.mktemp(name)
            ref.write_meta_checkpoint(root / "meta", model, params, tied=tied)
            assert convert_meta(root / "meta", root / "out") == 0
            cache[name] = (model, load_converted(root / "out", scan_layers=scan))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A valid tiny Meta checkpoint folder (META_BASE, seed META_BASE_SEED)."""
    return write_meta_base(tmp_path_factory.mktemp("base") / "meta")


# --- parity with Meta's reference --------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_meta_reference(converted, name):
    model, ours = converted(name)
    changes, tied, scan = CASES[name]
    assert ours.config.n_kv_heads == case_params(changes)["n_kv_heads"]
    assert ours.config.tie_embeddings == tied and ours.config.scan_layers == scan
    assert (ours.config.rope_scaling is not None) == case_params(changes)["use_scaled_rope"]
    tokens = np.random.RandomState(0).randint(0, BASE["vocab_size"], (2, 17))
    want = ref.reference_logits(model, tokens).numpy()
    got = our_logits(ours, tokens)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_ATOL)
    assert want.std() > 0.5  # logits far from uniform: the comparison has something to see


@pytest.mark.parametrize("name", ["kv1_scaled", "kv2_unscaled"])
def test_long_sequence_logits_match_meta_reference(converted, name):
    """Positions up to 299: the low frequencies Llama 3 scaling changes rotate far enough to
    matter (at positions < 20 scaling on/off moves the logits by less than the tolerance)."""
    model, ours = converted(name)
    tokens = np.random.RandomState(1).randint(0, BASE["vocab_size"], (1, 300))
    np.testing.assert_allclose(our_logits(ours, tokens), ref.reference_logits(model, tokens),
                               rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", ["kv1_scaled", "kv2_tied_unscaled_scan", "kv4_scaled_scan"])
def test_greedy_continuation_matches_meta_reference(converted, name):
    model, ours = converted(name)
    prompt = np.random.RandomState(2).randint(0, BASE["vocab_size"], (2, 7))
    want = ref.reference_greedy(model, prompt, 10)
    assert our_greedy(ours, prompt, 10) == want
    assert len(set(want[0] + want[1])) > 4  # not a degenerate repeat of the last prompt token


def test_real_sentence_with_full_vocabulary(tmp_path, wmt_dir):
    """The first newstest2014 German sentence through the converted Llama 3 tokenizer, on a
    model with the real 128256-entry vocabulary (tied)."""
    params = dict(BASE, dim=32, n_heads=2, n_kv_heads=1, vocab_size=128256)
    model = ref.build_reference(params, seed=3, tied=True, max_batch_size=1)
    ref.write_meta_checkpoint(tmp_path / "meta", model, params, tied=True)
    assert convert_meta(tmp_path / "meta", tmp_path / "out", small_vocab=False) == 0
    ours = load_converted(tmp_path / "out")
    provenance = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert provenance["allow_small_vocab"] is False and not provenance["warnings"]
    assert not ours.allow_small_vocab and ours.embedding_rows == ours.tokenizer.vocab_size
    sentence = read_lines(wmt_dir / "newstest2014.de")[0]
    ids = ours.tokenizer.encode(sentence, bos=True)
    assert ids[0] == 128000 and len(ids) > 10 and ours.tokenizer.decode(ids[1:]) == sentence
    tokens = np.asarray([ids])
    np.testing.assert_allclose(our_logits(ours, tokens), ref.reference_logits(model, tokens),
                               rtol=0, atol=LOGITS_ATOL)
    assert our_greedy(ours, tokens, 6) == ref.reference_greedy(model, tokens, 6)


# --- the comparisons above can fail ----------------------------------------------------------------

def test_skipping_the_rope_permutation_breaks_parity(base_checkpoint, tmp_path, monkeypatch):
    """Without the interleaved -> half-split permutation the logits are far off: the parity
    tests do see the RoPE layout."""
    import convert.common
    monkeypatch.setattr(convert.common, "interleaved_to_half_split", lambda w, n, h: w)
    assert convert_meta(base_checkpoint, tmp_path / "out") == 0
    ours = load_converted(tmp_path / "out", load_tokenizer=False)
    model = ref.build_reference(BASE, seed=META_BASE_SEED)  # base_checkpoint's weights
    tokens = np.random.RandomState(0).randint(0, BASE["vocab_size"], (2, 17))
    assert np.abs(our_logits(ours, tokens) - ref.reference_logits(model, tokens).numpy()).max() > 1e-2


def test_rope_scaling_off_on_a_scaled_checkpoint_breaks_long_parity(converted, tmp_path):
    """`--rope-scaling-factor 0` on a use_scaled_rope checkpoint: the long-sequence comparison
    sees the difference, so it does test the scaling."""
    model, _ = converted("kv1_scaled")
    params = case_params(CASES["kv1_scaled"][0])
    ref.write_meta_checkpoint(tmp_path / "meta", model, params)
    assert convert_meta(tmp_path / "meta", tmp_path / "out", "--rope-scaling-factor", 0) == 0
    ours = load_converted(tmp_path / "out", load_tokenizer=False)
    assert ours.config.rope_scaling is None
    tokens = np.random.RandomState(1).randint(0, BASE["vocab_size"], (1, 300))
    diff = np.abs(our_logits(ours, tokens) - ref.reference_logits(model, tokens).numpy()).max()
    assert diff > 1e-3


# --- RoPE scaling decisions ---------------------------------------------------------------------

def test_rope_scaling_factor_32_gives_hf_llama3_frequencies(base_checkpoint, tmp_path, capsys):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert convert_meta(base_checkpoint, tmp_path / "out", "--rope-scaling-factor", 32) == 0
    printed = capsys.readouterr().out
    assert "RoPE scaling: factor 32" in printed and "--rope-scaling-factor" in printed
    cfg = load_converted(tmp_path / "out", load_tokenizer=False).config
    assert cfg.rope_scaling.factor == 32.0
    assert "--rope-scaling-factor" in cfg.rope_scaling_source
    hf = HFLlamaConfig(hidden_size=BASE["dim"], num_attention_heads=BASE["n_heads"],
                       rope_theta=BASE["rope_theta"], max_position_embeddings=131072,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    hf_freqs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, None)
    ours = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, hf_freqs.numpy(), rtol=1e-6, atol=0)
    # ... and they are not Meta's factor-8 frequencies
    meta_8 = ref.meta_model_module().apply_scaling(
        1.0 / (BASE["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))).numpy()
    assert np.abs(ours / meta_8 - 1).max() > 0.5


def test_default_rope_scaling_is_metas_factor_8_and_says_why(capsys, base_checkpoint, tmp_path):
    assert convert_meta(base_checkpoint, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "RoPE scaling: factor 8" in printed and "use_scaled_rope" in printed
    assert "warning: " in printed and "128256 token ids" in printed and "256 rows" in printed
    cfg = load_converted(tmp_path / "out", load_tokenizer=False).config
    meta_freqs = ref.meta_model_module().apply_scaling(
        1.0 / (BASE["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))).numpy()
    np.testing.assert_allclose(inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                   cfg.rope_scaling), meta_freqs, rtol=1e-6)
    provenance = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert provenance["format"] == "meta" and "use_scaled_rope" in provenance["rope_scaling"]
    assert set(provenance["files"]) == {"params.json", "tokenizer.model", "consolidated.00.pth"}
    # converted with --allow-small-vocab: recorded, and the loaded model knows its bound
    assert provenance["allow_small_vocab"] is True and provenance["command"]["allow_small_vocab"]
    assert provenance["tokenizer_vocab_size"] == 128256
    assert any(ALLOW_SMALL_VOCAB in w for w in provenance["warnings"])
    small = load_converted(tmp_path / "out")
    assert small.allow_small_vocab and small.embedding_rows == 256
    small.check_token_ids([0, 17, 255])
    with pytest.raises(CheckpointError, match="token id 128000 has no embedding row"):
        small.check_token_ids(small.tokenizer.encode("Hallo", bos=True))


# --- model-parallel shards ----------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 4])
def test_shard_cutting_matches_fairscale_layers(world_size, monkeypatch):
    """The test's shard cutter gives rank r exactly what fairscale's own layers hold at rank r
    (their `_initialize_affine_weight` / `VocabUtility`, run with a patched world size)."""
    import fairscale.nn.model_parallel.layers as fs_layers
    master = {"column": torch.randn(16, 12), "row": torch.randn(12, 16),
              "vocab": torch.randn(32, 12)}
    dims = {"column": 0, "row": 1, "vocab": 0}
    cut = ref.shard_state_dict(master, dims, world_size)
    for rank in range(world_size):
        monkeypatch.setattr(fs_layers, "get_model_parallel_world_size", lambda: world_size)
        monkeypatch.setattr(fs_layers, "get_model_parallel_rank", lambda: rank)
        layers = {
            "column": fs_layers.ColumnParallelLinear(
                12, 16, bias=False, init_method=lambda w: w.copy_(master["column"])),
            "row": fs_layers.RowParallelLinear(
                16, 12, bias=False, init_method=lambda w: w.copy_(master["row"])),
            "vocab": fs_layers.VocabParallelEmbedding(
                32, 12, init_method=lambda w: w.copy_(master["vocab"])),
        }
        for key, layer in layers.items():
            assert torch.equal(layer.weight.detach(), cut[rank][key]), (key, rank)


SHARD_PARAMS = dict(BASE, n_heads=8, n_kv_heads=4)


@pytest.mark.parametrize("shards,tied", [(2, False), (4, True)])
def test_sharded_checkpoint_converts_bit_for_bit(tmp_path, shards, tied):
    shard_model = ref.build_reference(SHARD_PARAMS, seed=11, tied=tied)
    single = tmp_path / "single"
    ref.write_meta_checkpoint(single, shard_model, SHARD_PARAMS, tied=tied)
    # 4 shards: vocab_size -1 in params.json, read from the (sharded) embedding rows instead
    params = dict(SHARD_PARAMS, vocab_size=-1) if shards == 4 else SHARD_PARAMS
    split = ref.write_meta_checkpoint(tmp_path / "split", shard_model, params, tied=tied,
                                      shards=shards)
    assert sorted(p.name for p in split.glob("*.pth")) == \
        [f"consolidated.{i:02d}.pth" for i in range(shards)]
    wq = torch.load(split / "consolidated.01.pth", weights_only=True)["layers.0.attention.wq.weight"]
    assert wq.shape[0] == SHARD_PARAMS["dim"] // shards
    assert convert_meta(single, tmp_path / "out1") == 0
    assert convert_meta(split, tmp_path / "outN") == 0
    a = load_converted(tmp_path / "out1", load_tokenizer=False)
    b = load_converted(tmp_path / "outN", load_tokenizer=False)
    assert b.config.vocab_size == SHARD_PARAMS["vocab_size"]
    assert b.config.tie_embeddings == tied
    leaves_a, leaves_b = dict(params_leaves(a.params)), dict(params_leaves(b.params))
    assert leaves_a.keys() == leaves_b.keys()
    for name in leaves_a:
        assert np.array_equal(leaves_a[name], leaves_b[name]), name
    tokens = np.random.RandomState(4).randint(0, 256, (1, 9))
    np.testing.assert_allclose(our_logits(b, tokens), ref.reference_logits(shard_model, tokens),
                               rtol=0, atol=LOGITS_ATOL)


def test_replicated_norm_that_differs_between_shards_is_refused(tmp_path, capsys):
    shard_model = ref.build_reference(SHARD_PARAMS, seed=11)
    split = ref.write_meta_checkpoint(tmp_path / "split", shard_model, SHARD_PARAMS, shards=2)
    state = torch.load(split / "consolidated.01.pth", weights_only=True)
    state["layers.1.ffn_norm.weight"] = state["layers.1.ffn_norm.weight"] + 1
    torch.save(state, split / "consolidated.01.pth")
    expect_error(capsys, "meta", split, tmp_path / "out", str(split / "consolidated.01.pth"),
                 "replicated tensor layers.1.ffn_norm.weight differs", extra=(ALLOW_SMALL_VOCAB,))


# --- dtype --------------------------------------------------------------------------------------

def test_bfloat16_is_float32_rounded_to_nearest_even(base_checkpoint, tmp_path):
    assert convert_meta(base_checkpoint, tmp_path / "f32") == 0
    assert convert_meta(base_checkpoint, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    f32 = dict(params_leaves(load_converted(tmp_path / "f32", load_tokenizer=False).params))
    bf16_model = load_converted(tmp_path / "bf16", load_tokenizer=False)
    assert bf16_model.config.param_dtype == "bfloat16"
    bf16 = dict(params_leaves(bf16_model.params))
    for name, value in f32.items():
        assert bf16[name].dtype == ml_dtypes.bfloat16, name
        assert np.array_equal(bf16[name].view(np.uint16),
                              value.astype(ml_dtypes.bfloat16).view(np.uint16)), name
