"""Model-level invariants of the explicit KV cache, masks and layer layouts (tiny random trunk).

Parity with references no one here wrote lives in test_convert_*.py; these check that the one
attention code path gives the same numbers whichever way the tokens arrive.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig, RopeScaling
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama, init_params, params_for_model, stack_layers, unstack_layers

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0, rope_scaling=RopeScaling(factor=8.0,
                                                               original_max_position=16))


def _apply(cfg, params, tokens, positions, cache=None, token_mask=None):
    return Llama(cfg).apply({"params": params_for_model(params, cfg)}, jnp.asarray(tokens),
                            jnp.asarray(positions), cache,
                            None if token_mask is None else jnp.asarray(token_mask))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 12)).astype(np.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_prefill_then_steps_equals_full_forward(params, tokens, scan):
    cfg = CFG.replace(scan_layers=scan)
    pos = np.broadcast_to(np.arange(12), (2, 12))
    full = _apply(cfg, params, tokens, pos).logits
    cache = KVCache.init(cfg, 2, 16)
    out = _apply(cfg, params, tokens[:, :5], pos[:, :5], cache)
    logits = [out.logits]
    cache = out.cache
    for t in range(5, 12):
        out = _apply(cfg, params, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
        cache = out.cache
        logits.append(out.logits)
    np.testing.assert_allclose(np.concatenate(logits, 1), full, atol=1e-5)
    assert list(np.asarray(cache.lengths)) == [12, 12]


def test_scan_and_loop_layouts_agree(params, tokens):
    pos = np.broadcast_to(np.arange(12), (2, 12))
    loop = _apply(CFG, params, tokens, pos)
    scan = _apply(CFG.replace(scan_layers=True), params, tokens, pos)
    np.testing.assert_allclose(loop.logits, scan.logits, atol=1e-5)
    round_trip = stack_layers(unstack_layers(params, CFG.n_layers), CFG.n_layers)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(round_trip)):
        np.testing.assert_array_equal(a, b)


def test_left_padding_matches_unpadded_row(params, tokens):
    pad = 4
    row = tokens[0, :8]
    padded = np.concatenate([np.zeros(pad, np.int32), row])[None]
    mask = np.arange(12)[None] >= pad
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = KVCache.init(CFG, 1, 16)
    padded_out = _apply(CFG, params, padded, positions, cache, mask)
    alone = _apply(CFG, params, row[None], np.arange(8)[None])
    np.testing.assert_allclose(padded_out.logits[0, pad:], alone.logits[0], atol=1e-5)
    # the next step sees the pads as invalid slots, not as context
    nxt = np.array([[7]], np.int32)
    step_padded = _apply(CFG, params, nxt, np.array([[8]]), padded_out.cache)
    step_alone = _apply(CFG, params, np.concatenate([row, [7]])[None], np.arange(9)[None])
    np.testing.assert_allclose(step_padded.logits[0, 0], step_alone.logits[0, -1], atol=1e-5)


def test_rollback_overwrites_rejected_slots(params, tokens):
    """Write 4 tokens, keep 1, then write 2 others: same as a cache that never saw the 3."""
    pos = np.broadcast_to(np.arange(12), (2, 12))
    cache = _apply(CFG, params, tokens[:, :6], pos[:, :6], KVCache.init(CFG, 2, 16)).cache
    rejected = np.full((2, 4), 3, np.int32)
    after = _apply(CFG, params, rejected, pos[:, 6:10], cache).cache
    # row 0 keeps one of the four, row 1 keeps none
    after = after.replace(lengths=jnp.array([7, 6], jnp.int32))
    nxt = np.array([[5, 9], [11, 13]], np.int32)
    nxt_pos = np.array([[7, 8], [6, 7]])
    got = _apply(CFG, params, nxt, nxt_pos, after).logits
    want0 = _apply(CFG, params, np.concatenate([tokens[0, :6], [3, 5, 9]])[None],
                   np.arange(9)[None]).logits[0, -2:]
    want1 = _apply(CFG, params, np.concatenate([tokens[1, :6], [11, 13]])[None],
                   np.arange(8)[None]).logits[0, -2:]
    np.testing.assert_allclose(got[0], want0, atol=1e-5)
    np.testing.assert_allclose(got[1], want1, atol=1e-5)


def test_logits_index_and_hidden_outputs(params, tokens):
    pos = np.broadcast_to(np.arange(12), (2, 12))
    full = _apply(CFG, params, tokens, pos)
    idx = jnp.array([3, 11], jnp.int32)
    some = Llama(CFG).apply({"params": params_for_model(params, CFG)}, jnp.asarray(tokens),
                            jnp.asarray(pos), logits_index=idx)
    np.testing.assert_allclose(some.logits[:, 0], full.logits[np.arange(2), idx], atol=1e-6)
    normed = Llama(CFG).apply({"params": params_for_model(params, CFG)}, full.hidden,
                              method=Llama.final_norm)
    np.testing.assert_allclose(normed, full.hidden_normed, atol=1e-6)


def test_tied_embeddings_share_the_table():
    cfg = CFG.replace(tie_embeddings=True)
    p = init_params(cfg, jax.random.PRNGKey(2))
    assert "output" not in p
    h = np.random.RandomState(0).randn(1, 3, cfg.dim).astype(np.float32)
    logits = Llama(cfg).apply({"params": params_for_model(p, cfg)}, jnp.asarray(h),
                              method=Llama.unembed)
    np.testing.assert_allclose(logits, h @ np.asarray(p["tok_embeddings"]["embedding"]).T,
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_runs_close_to_float32(params, tokens):
    pos = np.broadcast_to(np.arange(12), (2, 12))
    f32 = _apply(CFG, params, tokens, pos).logits
    bf16 = _apply(CFG.replace(dtype="bfloat16"), params, tokens, pos).logits
    assert bf16.dtype == jnp.float32
    assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.1


@pytest.mark.parametrize("scan", [False, True])
def test_fused_projections_compute_the_same_trunk(params, tokens, scan):
    """q|k|v and w1|w3 as one product each (what decoders run) give the separate products'
    numbers; fusing is idempotent and never serialized."""
    from gptk_jax.llama.model import fuse_projections
    cfg = CFG.replace(scan_layers=scan)
    fused_cfg = cfg.replace(fuse_projections=True)
    fused = params_for_model(params, fused_cfg)
    layer = fused["layers"] if scan else fused["layers_0"]
    assert sorted(layer["attention"]) == ["wo", "wqkv"]
    assert sorted(layer["feed_forward"]) == ["w13", "w2"]
    assert layer["attention"]["wqkv"]["kernel"].shape[-2:] == (
        CFG.n_heads + 2 * CFG.n_kv_heads, CFG.head_dim)
    assert layer["feed_forward"]["w13"]["kernel"].shape[-1] == 2 * CFG.ffn_dim
    again = fuse_projections(fused)
    assert jax.tree.structure(again) == jax.tree.structure(fused)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(fused)):
        np.testing.assert_array_equal(a, b)
    pos = np.broadcast_to(np.arange(12), (2, 12))
    want = _apply(cfg, params, tokens, pos)
    got = _apply(fused_cfg, params, tokens, pos)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    assert fused_cfg.to_dict() == cfg.to_dict() and "fuse_projections" not in cfg.to_dict()
