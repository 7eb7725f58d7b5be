"""Prompt-lookup drafting (decoding/lookup.py): hand-computed lookups, ragged appends, the
drafter inside the jitted loop against a plain-Python lookup, and exactness against greedy
(alone and in front of real heads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding import Decoder, head_drafter
from gptk_jax.decoding.lookup import LookupDrafter, append_tokens, lookup_drafts
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.llama.model import init_params, params_for_model

from _lookup_reference import expected_accepted

CFG = LlamaConfig(vocab_size=23, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0, max_seq_len=256)
K = 4
MAX_NEW = 30
PAD = 0
PROMPT_LENGTHS = [3, 9, 5, 12, 1, 7, 4, 10]


def _lookup(history, next_token, k1=3, max_ngram=3, min_ngram=1, capacity=16):
    hist = np.zeros((1, capacity), np.int32)
    hist[0, :len(history)] = history
    hist[0, len(history):] = 99   # stale slots past the length must never match
    drafts, valid = lookup_drafts(jnp.asarray(hist), jnp.asarray([len(history)], jnp.int32),
                                  jnp.asarray([next_token], jnp.int32), k1, max_ngram, min_ngram)
    return [int(d) if v else None for d, v in zip(np.asarray(drafts[0]), np.asarray(valid[0]))]


@pytest.mark.parametrize("history, next_token, kwargs, expected", [
    # query [5,6,7] matches at 0: the three tokens after it
    ([5, 6, 7, 8, 5, 6], 7, {}, [8, 5, 6]),
    # no earlier occurrence of 9 (nor of any suffix ending in 9)
    ([1, 2, 3], 9, {}, [None, None, None]),
    # the match's continuation runs into the query: next_token itself, then nothing
    ([4, 4], 4, {}, [4, None, None]),
    # the longest n wins over a more recent shorter match ([3] at 5 -> 5)
    ([1, 2, 3, 4, 9, 3, 5, 1, 2], 3, {}, [4, 9, 3]),
    # among equal n the most recent match wins ([1,2] at 0 and at 3)
    ([1, 2, 7, 1, 2, 8, 1], 2, dict(max_ngram=2), [8, 1, 2]),
    # min_ngram=2: a single-token match does not count
    ([3, 8, 1, 5], 3, dict(min_ngram=2), [None, None, None]),
    ([3, 8, 1, 5], 3, dict(min_ngram=1), [8, 1, 5]),
    # stale tokens (99) past the length are never matched or drafted
    ([1, 2], 1, {}, [2, 1, None]),
    ([1, 2, 99], 1, {}, [2, 99, 1]),   # 99 in the sequence is a token like any other
    ([1, 2, 3], 99, {}, [None, None, None]),
])
def test_lookup_drafts_by_hand(history, next_token, kwargs, expected):
    assert _lookup(history, next_token, **kwargs) == expected


def test_append_tokens_is_ragged_and_ordered():
    history = jnp.zeros((2, 6), jnp.int32)
    length = jnp.asarray([0, 2], jnp.int32)
    history = history.at[1, :2].set(jnp.asarray([7, 8]))
    tokens = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    mask = jnp.asarray([[False, True, True], [True, False, False]])
    history, length = append_tokens(history, length, tokens, mask)
    assert np.asarray(length).tolist() == [2, 3]
    assert np.asarray(history).tolist() == [[2, 3, 0, 0, 0, 0], [7, 8, 4, 0, 0, 0]]


def test_drafter_arguments_are_checked():
    with pytest.raises(ValueError, match="min_ngram"):
        LookupDrafter(3, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="max_drafts"):
        LookupDrafter(0)


# --- inside the loop ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    params = params_for_model(init_params(CFG, jax.random.PRNGKey(2)), CFG)
    rs = np.random.RandomState(4)
    # prompts that repeat a phrase, as translation prompts repeat names and numbers
    prompts = []
    for n in PROMPT_LENGTHS:
        phrase = rs.randint(1, CFG.vocab_size, 4).tolist()
        prompts.append((phrase + rs.randint(1, CFG.vocab_size, n).tolist() + phrase)[:n + 4])
    decoder = Decoder(CFG, params, stop_ids=[], pad_id=PAD)
    free = decoder.generate(prompts, MAX_NEW + K, bucket=8)
    stop_ids = [free.tokens[0][9]]
    return decoder.replace(stop_ids=stop_ids), prompts, stop_ids, free.tokens


@pytest.mark.parametrize("batch, padding", [(1, "left"), (8, "left"), (8, "right")])
def test_lookup_in_the_loop_matches_python_and_greedy(setup, batch, padding):
    decoder, prompts, stop_ids, continuations = setup
    prompts = prompts[:batch]
    greedy = decoder.generate(prompts, MAX_NEW, padding=padding, bucket=8)
    lookup = decoder.replace(drafter=LookupDrafter(K - 1), drafter_vars=LookupDrafter.variables())
    result = lookup.generate(prompts, MAX_NEW, padding=padding, bucket=8)
    assert result.tokens == greedy.tokens
    assert result.stop_reasons == greedy.stop_reasons
    expected = [expected_accepted(p, c, stop_ids, MAX_NEW, K)
                for p, c in zip(prompts, continuations)]
    assert result.stats["accepted_per_row"] == expected
    if batch == 8:
        assert set(greedy.stop_reasons) == {"stop", "length"}
        assert result.stats["mean_accepted_drafts"] > 0.3   # the lookup does find things


@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_lookup_in_front_of_heads_equals_greedy(setup, kind):
    decoder, prompts, stop_ids, _ = setup
    params = decoder.params
    head_config = HeadConfig(kind=kind, k=3)   # heads draft 2 offsets; the lookup 3
    head = make_head(head_config, CFG)
    head_params = init_head_params(head, params, jax.random.PRNGKey(5))
    heads, head_vars = head_drafter(head_config, head_params, CFG, params)
    drafter = LookupDrafter(K - 1, fallback=heads)
    greedy = decoder.generate(prompts, MAX_NEW, bucket=8)
    result = decoder.replace(drafter=drafter, drafter_vars=LookupDrafter.variables(head_vars),
                             tokens_per_step=K).generate(prompts, MAX_NEW, bucket=8)
    assert result.tokens == greedy.tokens
    assert result.stop_reasons == greedy.stop_reasons
