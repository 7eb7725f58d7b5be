"""Shared-prefix prefill (gptk_jax/llama/prefix.py) equals prefilling each whole prompt.

The reference is the trunk run without a cache over each whole prompt on its own (batch 1, no
padding): logits and hidden states at every suffix position agree to float32 rounding, and a
greedy continuation from the shared-prefix cache (ragged rows, batch 1 and 8) emits the tokens
that a from-scratch forward over prompt + generated tokens picks at every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import Llama, init_params, params_for_model
from gptk_jax.llama.prefix import (common_prefix_length, extend_rows, pad_suffixes,
                                   prefill_prefix)

CFG = LlamaConfig(vocab_size=67, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0)


@pytest.fixture(scope="module")
def params():
    return params_for_model(init_params(CFG, jax.random.PRNGKey(3)), CFG)


_apply = jax.jit(Llama(CFG).apply)   # the references: one program per shape, not one per op


def _full(params, ids):
    """Reference: the whole sequence through the trunk at batch 1, no cache, no padding."""
    tokens = jnp.asarray(np.asarray(ids, np.int32)[None])
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    return _apply({"params": params}, tokens, positions)


def _prompts(batch, prefix_len=9, seed=0):
    rng = np.random.RandomState(seed)
    prefix = list(rng.randint(1, CFG.vocab_size, prefix_len))
    return [prefix + list(rng.randint(1, CFG.vocab_size, rng.randint(1, 7)))
            for _ in range(batch)]


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2   # each row keeps one token
    assert common_prefix_length([[5, 1], [6, 1]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 2


def test_pad_suffixes_refuses_an_empty_suffix():
    with pytest.raises(ValueError, match="at least one token"):
        pad_suffixes([[1, 2], []], 0)


@pytest.mark.parametrize("batch", [1, 8])
def test_logits_and_hidden_equal_whole_prompt_prefill(params, batch):
    prompts = _prompts(batch)
    p = common_prefix_length(prompts)
    assert p >= 9
    shared = prefill_prefix(CFG, params, prompts[0][:p], max_len=32)
    out = extend_rows(CFG, params, shared, [r[p:] for r in prompts])
    assert list(np.asarray(out.cache.lengths)) == [len(r) for r in prompts]
    for b, row in enumerate(prompts):
        ref = _full(params, row)
        n = len(row) - p
        np.testing.assert_allclose(np.asarray(out.logits[b, :n]), np.asarray(ref.logits[0, p:]),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.hidden[b, :n]), np.asarray(ref.hidden[0, p:]),
                                   rtol=1e-5, atol=1e-5)
        assert int(np.argmax(out.logits[b, n - 1])) == int(np.argmax(ref.logits[0, -1]))


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_continuation_from_the_shared_cache(params, batch):
    """Ragged rows keep decoding in their own slots after the shared prefix."""
    prompts = _prompts(batch, seed=1)
    p = common_prefix_length(prompts)
    shared = prefill_prefix(CFG, params, prompts[0][:p], max_len=40)
    out = extend_rows(CFG, params, shared, [r[p:] for r in prompts], bucket=4)
    last = np.array([len(r) - p - 1 for r in prompts])
    nxt = np.argmax(np.asarray(out.logits)[np.arange(batch), last], -1).astype(np.int32)
    cache, generated = out.cache, [[int(t)] for t in nxt]
    for _ in range(6):
        positions = cache.lengths[:, None]
        step = _apply({"params": params}, jnp.asarray(nxt[:, None]), positions, cache)
        cache = step.cache
        nxt = np.argmax(np.asarray(step.logits[:, 0]), -1).astype(np.int32)
        for b in range(batch):
            generated[b].append(int(nxt[b]))
    for b, row in enumerate(prompts):        # reference: recompute everything at each step
        seq = list(row)
        for _ in range(7):
            seq.append(int(np.argmax(np.asarray(_full(params, seq).logits[0, -1]))))
        assert generated[b] == seq[len(row):], f"row {b}"
