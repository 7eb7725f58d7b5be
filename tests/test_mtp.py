"""Self-speculative decoding (decoding/mtp.py) reproduces greedy decoding token for token.

Tiny random trunk, float32. Drafters span the range: random tokens (acceptance ~ 0), the true
greedy continuation (every draft accepted, τ = K), the continuation with 30% of drafts corrupted
(ragged partial acceptance across rows), and real heads from gptk_jax.heads at init.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding import Decoder, head_drafter
from gptk_jax.decoding.inputs import pad_prompts, stop_id_array
from gptk_jax.decoding.loop import cache_slots, decode_step, prefill, prefill_state
from gptk_jax.decoding.mtp import mtp_generate
from gptk_jax.decoding.oracle import (OracleDrafter, RandomDrafter, RepeatDrafter,
                                      oracle_variables)
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.llama.model import Llama, init_params, params_for_model

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0, max_seq_len=256)
K = 4            # tokens per verify step: the trunk's next token + 3 drafts
MAX_NEW = 24
PAD = 0
BUCKET = 8
PROMPT_LENGTHS = [3, 9, 5, 12, 1, 7, 4, 10]


@pytest.fixture(scope="module")
def params():
    return params_for_model(init_params(CFG, jax.random.PRNGKey(0)), CFG)


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(3)
    return [rs.randint(1, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def decoder(params):
    """Greedy; `replace` gives the drafters' decoders (sharing params and executables)."""
    return Decoder(CFG, params, stop_ids=[], pad_id=PAD)


@pytest.fixture(scope="module")
def stop_ids(decoder, prompts):
    """A stop id that ends some rows mid-way and not others: the 7th token row 0 generates."""
    free = decoder.generate(prompts, MAX_NEW, bucket=BUCKET)
    return [free.tokens[0][6]]


@pytest.fixture(scope="module")
def greedy(decoder, prompts, stop_ids):
    out = {}
    for padding in ("left", "right"):
        for batch in (1, 8):
            out[batch, padding] = decoder.replace(stop_ids=stop_ids).generate(
                prompts[:batch], MAX_NEW, padding=padding, bucket=BUCKET)
    assert set(out[8, "left"].stop_reasons) == {"stop", "length"}  # rows end differently
    return out


def _continuations(result, stop_ids):
    return [t + ([stop_ids[0]] if r == "stop" else []) for t, r in
            zip(result.tokens, result.stop_reasons)]


def _drafter(name, greedy_result, prompts, stop_ids):
    if name == "random":
        return RandomDrafter(K - 1, CFG.vocab_size), jax.random.PRNGKey(7)
    if name == "repeat":
        return RepeatDrafter(K - 1), ()
    corrupt = {"oracle": 0.0, "noisy_oracle": 0.3}[name]
    variables = oracle_variables(_continuations(greedy_result, stop_ids),
                                 [len(p) for p in prompts], len(prompts), K - 1, seed=1)
    return OracleDrafter(K - 1, CFG.vocab_size, corrupt), variables


def _assert_same_as_greedy(result, reference):
    assert result.tokens == reference.tokens
    assert result.stop_reasons == reference.stop_reasons
    assert result.num_generated == reference.num_generated


@pytest.mark.parametrize("batch, drafter_name, padding", [
    (1, "random", "left"), (1, "oracle", "left"),
    (8, "random", "left"), (8, "oracle", "left"), (8, "noisy_oracle", "left"),
    (8, "noisy_oracle", "right"),
])
def test_mtp_equals_greedy(decoder, prompts, stop_ids, greedy, batch, drafter_name, padding):
    reference = greedy[batch, padding]
    drafter, variables = _drafter(drafter_name, reference, prompts[:batch], stop_ids)
    mtp = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables,
                          tokens_per_step=K)
    result = mtp.generate(prompts[:batch], MAX_NEW, padding=padding, bucket=BUCKET)
    _assert_same_as_greedy(result, reference)
    stats = result.stats
    assert result.num_steps == 1 + max(stats["steps_per_row"])
    # every verify step emits >= 1 token; all emitted tokens but the prefill's are counted
    assert stats["tokens_from_verify_steps"] == sum(n - 1 for n in result.num_generated)
    if drafter_name == "random":
        assert stats["mean_accepted_drafts"] < 0.2
    if drafter_name == "oracle":
        # every draft accepted: K tokens per verify step, except a shorter block at the tail
        for b, accepted in enumerate(stats["accepted_per_row"]):
            assert accepted[:-1] == [K - 1] * (len(accepted) - 1)
            assert len(accepted) == -(-(result.num_generated[b] - 1) // K)
        # so τ is as high as the row lengths allow: tokens / sum over rows of ceil((n-1)/K)
        ideal_steps = sum(-(-(n - 1) // K) for n in result.num_generated)
        assert stats["tau"] == pytest.approx(
            stats["tokens_from_verify_steps"] / ideal_steps)
    if drafter_name == "noisy_oracle":
        per_row = stats["accepted_per_row"]
        assert 0.5 < stats["mean_accepted_drafts"] < K - 1.5
        assert len({tuple(a) for a in per_row}) > 1  # rows accept different amounts
        assert len(set(stats["steps_per_row"])) > 1  # and finish after different step counts


def test_cache_after_partly_rejected_block_matches_greedy_cache(params, decoder, prompts,
                                                                 greedy):
    """One verify step in which row 0 accepts 1 of 3 drafts and row 1 accepts 2; the rolled-back
    cache then gives the next logits a cache built token by token gives (rejected slots hold
    stale keys that must stay invisible)."""
    rows = [1, 3]
    batch_prompts = [prompts[r] for r in rows]
    free = decoder.generate(batch_prompts, MAX_NEW, bucket=BUCKET)
    reference = np.zeros((2, 16), np.int32)
    for b, n_ok in enumerate([1, 2]):  # corrupt the draft right after the accepted ones
        cont = list(free.tokens[b][:16])
        cont[1 + n_ok] = (cont[1 + n_ok] + 1) % CFG.vocab_size
        reference[b, :len(cont)] = cont
    drafter = OracleDrafter(K - 1, CFG.vocab_size)
    variables = {"reference": reference,
                 "prompt_lengths": np.array([len(p) for p in batch_prompts], np.int32),
                 "key": jax.random.PRNGKey(0)}
    batch = pad_prompts(batch_prompts, PAD, bucket=BUCKET)
    stops, pad = stop_id_array([]), np.int32(PAD)
    slots = cache_slots(batch.padded_length, MAX_NEW, K)
    state = jax.jit(prefill_state, static_argnums=(0, 1, 2, 3, 4))(
        CFG, drafter, K, MAX_NEW, slots, params, variables, batch, stops, pad)
    state = jax.jit(decode_step, static_argnums=(0, 1, 2))(CFG, drafter, K, params, variables,
                                                            state, stops)

    accepted = np.asarray(state.accepted_log[0]).tolist()
    assert accepted == [1, 2]
    lengths = np.asarray(state.cache.lengths)
    assert lengths.tolist() == [batch.padded_length + 2, batch.padded_length + 3]
    # the rejected slots right after `lengths` were written by the verify step
    assert np.asarray(state.cache.valid)[np.arange(2), lengths].all()
    trunk = jax.jit(lambda tokens, positions, cache: Llama(CFG).apply(
        {"params": params}, tokens, positions, cache=cache))
    mtp_logits = trunk(state.next_token[:, None], state.positions[:, None],
                       state.cache).logits[:, 0]

    for b, prompt in enumerate(batch_prompts):
        emitted = free.tokens[b][:accepted[b] + 2]  # prefill token, accepted drafts, bonus
        assert np.asarray(state.tokens)[b, :len(emitted)].tolist() == emitted
        assert int(state.next_token[b]) == emitted[-1]
        one = pad_prompts([prompt], PAD, bucket=BUCKET)
        pre = jax.jit(prefill, static_argnums=(0, 3))(CFG, params, one, 2 * BUCKET + K)
        cache, pos = pre.cache, len(prompt)
        for token in emitted:
            out = trunk(jnp.array([[token]]), jnp.array([[pos]]), cache)
            cache, pos = out.cache, pos + 1
        np.testing.assert_allclose(mtp_logits[b], out.logits[0, 0], atol=1e-5, rtol=0)


def test_k_beyond_the_drafter_is_refused(params, prompts):
    with pytest.raises(ValueError, match="at most 3"):
        mtp_generate(CFG, params, RepeatDrafter(3), (), prompts[:1], 4, [], PAD,
                     tokens_per_step=5)
    with pytest.raises(ValueError, match=">= 2"):
        mtp_generate(CFG, params, RepeatDrafter(3), (), prompts[:1], 4, [], PAD,
                     tokens_per_step=1)


@pytest.mark.parametrize("kind", ["linear", "poma", "lstm"])
def test_mtp_with_heads_equals_greedy(params, decoder, prompts, stop_ids, greedy, kind):
    """Real heads at init drafting inside the loop (LSTM: state advanced over accepted positions
    only). Zero-initialised linear heads reproduce the trunk's next-token logits at every offset,
    so they draft the trunk's next token repeated: the same acceptance as RepeatDrafter."""
    head_config = HeadConfig(kind=kind, k=K)
    head = make_head(head_config, CFG)
    head_params = init_head_params(head, params, jax.random.PRNGKey(5))
    drafter, variables = head_drafter(head_config, head_params, CFG, params)
    result = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables).generate(
        prompts, MAX_NEW, bucket=BUCKET)
    assert result.tokens_per_step == K    # the heads' k by default
    _assert_same_as_greedy(result, greedy[8, "left"])
    if kind == "linear":
        repeat = mtp_generate(CFG, params, RepeatDrafter(K - 1), (), prompts, MAX_NEW, stop_ids,
                              PAD, tokens_per_step=K, bucket=BUCKET)
        assert result.stats["accepted_per_row"] == repeat.stats["accepted_per_row"]
