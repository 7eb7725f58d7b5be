"""Shared-prefix prefill in the decoders (decoding/engine.py, loop.py) equals prefilling each
whole prompt: same tokens, features and logits to float32 tolerance, batch 1 and ragged batch 8,
static (`generate`) and continuous (`generate_continuous`), for greedy, trained-heads (LSTM: its
state reads every prompt position) and lookup (its history reads every prompt token) decoders.

Tiny random trunk, float32; prompts = one common 20-token prefix + ragged suffixes that repeat
pieces of the prefix (so the lookup finds drafts there).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.decoding import Decoder, head_drafter
from gptk_jax.decoding.inputs import pad_prompts, pad_suffixes, stop_id_array
from gptk_jax.decoding.lookup import LookupDrafter
from gptk_jax.decoding.loop import (cache_slots, prefill, prefill_shared_prefix,
                                    prefill_state)
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import init_params, params_for_model

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0, max_seq_len=256)
K = 4
MAX_NEW = 20
PAD = 0
BUCKET = 8
PREFIX = 20
SUFFIX_LENGTHS = [3, 9, 5, 12, 1, 7, 4, 10, 6, 2, 8]   # 11 prompts: continuous refills slots


@pytest.fixture(scope="module")
def params():
    return params_for_model(init_params(CFG, jax.random.PRNGKey(11)), CFG)


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(5)
    prefix = rs.randint(1, CFG.vocab_size, PREFIX).tolist()
    out = []
    for i, n in enumerate(SUFFIX_LENGTHS):   # distinct first suffix tokens: common prefix = 20
        piece = prefix[rs.randint(0, PREFIX - 4):][:4]
        suffix = ([1 + i] + rs.randint(1, CFG.vocab_size, n).tolist() + piece)[:n]
        out.append(prefix + suffix)
    return out


@pytest.fixture(scope="module")
def drafters(params):
    head_config = HeadConfig(kind="lstm", k=K)
    head = make_head(head_config, CFG)
    head_params = init_head_params(head, params, jax.random.PRNGKey(5))
    heads, head_vars = head_drafter(head_config, head_params, CFG, params)
    return {"greedy": (None, ()), "heads": (heads, head_vars),
            "lookup": (LookupDrafter(K - 1), LookupDrafter.variables())}


@pytest.fixture(scope="module")
def stop_ids(params, prompts):
    free = Decoder(CFG, params, stop_ids=[], pad_id=PAD, shared_prefix=False).generate(
        prompts, MAX_NEW, bucket=BUCKET)
    rows_with = np.zeros(CFG.vocab_size, int)     # rows that emit the token (after the 2nd)
    for t in free.tokens:
        rows_with[np.unique(t[2:MAX_NEW - 2])] += 1
    return [int(np.argmin(np.abs(rows_with - len(prompts) / 2)))]  # ends about half the rows


def _decoder(params, stop_ids, drafters, name, shared_prefix):
    drafter, variables = drafters[name]
    base = Decoder(CFG, params, stop_ids=stop_ids, pad_id=PAD, shared_prefix=shared_prefix)
    if drafter is None:
        return base
    return base.replace(drafter=drafter, drafter_vars=variables, tokens_per_step=K)


@pytest.fixture(scope="module")
def alone(params, prompts, stop_ids, drafters):
    """Each prompt decoded on its own, whole-prompt prefill: the reference."""
    out = {}
    for name in drafters:
        decoder = _decoder(params, stop_ids, drafters, name, False)
        out[name] = [decoder.generate([p], MAX_NEW, bucket=BUCKET) for p in prompts]
    return out


def _same(result, references):
    assert result.tokens == [r.tokens[0] for r in references]
    assert result.stop_reasons == [r.stop_reasons[0] for r in references]
    assert result.num_generated == [r.num_generated[0] for r in references]
    assert result.stats["accepted_per_row"] == [r.stats["accepted_per_row"][0]
                                                for r in references]


@pytest.mark.parametrize("name", ["greedy", "heads", "lookup"])
@pytest.mark.parametrize("batch", [1, 8])
def test_static_batch_equals_whole_prompts(params, prompts, stop_ids, drafters, alone, name,
                                           batch):
    rows, refs = prompts[:batch], alone[name][:batch]
    suffix_tokens = sum(len(p) - PREFIX for p in rows)
    whole = sum(len(p) for p in rows)
    off = _decoder(params, stop_ids, drafters, name, False).generate(rows, MAX_NEW,
                                                                     bucket=BUCKET)
    _same(off, refs)
    assert (off.prefill_tokens, off.shared_prefix_tokens, off.prompt_tokens) == (whole, 0, whole)
    on = _decoder(params, stop_ids, drafters, name, True)
    if batch == 1:     # one row cannot tell its prefix: a registered (held) one is reused
        assert on.generate(rows, MAX_NEW, bucket=BUCKET).shared_prefix_tokens == 0
        on.add_shared_prefix(prompts[0][:PREFIX])
        first_run = 0
    else:              # the rows' common prefix, prefilled once, then held
        first_run = PREFIX
    for run in (first_run, 0):    # the second batch reuses the held prefix
        result = on.generate(rows, MAX_NEW, bucket=BUCKET, padding="left")
        _same(result, refs)
        assert result.shared_prefix_tokens == PREFIX
        assert result.prefill_tokens == run + suffix_tokens < whole
        assert result.prompt_tokens == whole
        assert result.prefill_tokens_saved == pytest.approx(1 - (run + suffix_tokens) / whole)
    if batch == 8:
        assert set(result.stop_reasons) == {"stop", "length"}
        if name == "lookup":
            assert result.stats["mean_accepted_drafts"] > 0.1   # it finds the repeated pieces


@pytest.mark.parametrize("name", ["greedy", "heads", "lookup"])
@pytest.mark.parametrize("batch", [1, 8])
def test_continuous_equals_whole_prompts(params, prompts, stop_ids, drafters, alone, name,
                                         batch):
    refs = alone[name]
    whole = sum(len(p) for p in prompts)
    off = _decoder(params, stop_ids, drafters, name, False).generate_continuous(
        prompts, MAX_NEW, batch_size=batch, bucket=BUCKET)
    _same(off, refs)
    assert off.prefill_tokens == whole
    on = _decoder(params, stop_ids, drafters, name, True).generate_continuous(
        prompts, MAX_NEW, batch_size=batch, bucket=BUCKET)
    _same(on, refs)
    assert on.prefill_calls > 1          # slots were refilled (with the shared prefix)
    assert on.shared_prefix_tokens == PREFIX
    assert on.prefill_tokens == PREFIX + whole - PREFIX * len(prompts)


@pytest.mark.parametrize("name", ["heads", "lookup"])
@pytest.mark.parametrize("batch", [1, 8])
def test_prefill_state_equals_whole_prompt_prefill(params, prompts, drafters, name, batch):
    """Logits, hidden states, first tokens and the drafter's state after the prefill agree
    with the whole prompts' (right-padded: the same slots) to float32 tolerance."""
    drafter, variables = drafters[name]
    rows = prompts[:batch]
    whole = pad_prompts(rows, PAD, padding="right", bucket=BUCKET)
    shared = pad_suffixes(rows, PREFIX, PAD, bucket=BUCKET)
    slots = cache_slots(max(whole.padded_length, PREFIX + shared.padded_length), MAX_NEW, K)
    prefix = jax.jit(prefill_shared_prefix, static_argnums=0)(
        CFG, params, jnp.asarray([rows[0][:PREFIX]], jnp.int32))
    stops, pad = stop_id_array([]), np.array(PAD, np.int32)
    run = jax.jit(prefill_state, static_argnums=(0, 1, 2, 3, 4))
    ref = run(CFG, drafter, K, MAX_NEW, slots, params, variables, whole, stops, pad)
    got = run(CFG, drafter, K, MAX_NEW, slots, params, variables, shared, stops, pad, prefix)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                                    atol=2e-5)
    np.testing.assert_array_equal(got.next_token, ref.next_token)
    np.testing.assert_array_equal(got.positions, ref.positions)
    np.testing.assert_array_equal(got.cache.lengths, ref.cache.lengths)
    close(got.last_hidden, ref.last_hidden)
    close(got.last_hidden_normed, ref.last_hidden_normed)
    jax.tree.map(close, got.drafter_state, ref.drafter_state)
    for layer in range(CFG.n_layers):          # the real slots of the cache
        for b, p in enumerate(rows):
            close(got.cache.k[layer][b, :, :len(p)], ref.cache.k[layer][b, :, :len(p)])
            close(got.cache.v[layer][b, :, :len(p)], ref.cache.v[layer][b, :, :len(p)])
    pre_ref = jax.jit(prefill, static_argnums=(0, 3))(CFG, params, whole, slots)
    pre_got = jax.jit(prefill, static_argnums=(0, 3))(CFG, params, shared, slots, prefix)
    close(pre_got.logits, pre_ref.logits)
    for b, p in enumerate(rows):
        close(pre_got.prompt_hidden_normed[b, :len(p)], pre_ref.prompt_hidden_normed[b, :len(p)])


def test_held_prefixes_and_switching_off(params, prompts, stop_ids, drafters):
    decoder = _decoder(params, stop_ids, drafters, "greedy", True)
    decoder.generate(prompts[:4], MAX_NEW, bucket=BUCKET)
    assert [len(k) for k in decoder.prefixes] == [PREFIX]
    off = decoder.replace(shared_prefix=False)
    assert off.prefixes is decoder.prefixes and not off.shared_prefix
    assert off.generate(prompts[:4], MAX_NEW, bucket=BUCKET).shared_prefix_tokens == 0
    mtp = decoder.replace(drafter=drafters["lookup"][0], drafter_vars=drafters["lookup"][1])
    assert mtp.shared_prefix      # kept across replace, and the held prefix is shared
    result = mtp.generate(prompts[4:8], MAX_NEW, bucket=BUCKET)
    assert result.prefill_tokens == sum(len(p) - PREFIX for p in prompts[4:8])
    # prompts sharing fewer than 16 tokens prefill whole
    short = [p[PREFIX - 10:] for p in prompts[:4]]
    assert decoder.generate(short, MAX_NEW, bucket=BUCKET).shared_prefix_tokens == 0
