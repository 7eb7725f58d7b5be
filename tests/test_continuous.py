"""Continuous batching (decoding/continuous.py) on a tiny random trunk: more prompts than slots,
ragged prompts and outputs, stop ids and the token limit. Every prompt must get greedy decoding's
tokens (static greedy_generate is the reference), with greedy (K = 1) and with drafters, and a
refilled slot must start fresh: the lookup's accepted drafts per step equal a plain-Python lookup
over that prompt alone (a stale history from the slot's previous prompt would show there)."""

import math

import jax
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding import Decoder, head_drafter
from gptk_jax.decoding.continuous import continuous_generate
from gptk_jax.decoding.lookup import LookupDrafter
from gptk_jax.decoding.oracle import RandomDrafter
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.llama.model import init_params, params_for_model

from _lookup_reference import expected_accepted

CFG = LlamaConfig(vocab_size=23, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0, max_seq_len=256)
K = 4
MAX_NEW = 24
PAD = 0
BUCKET = 8
PROMPT_LENGTHS = [3, 9, 5, 12, 1, 7, 4, 10, 20, 2, 6]   # 11 prompts, two refill widths


@pytest.fixture(scope="module")
def setup():
    params = params_for_model(init_params(CFG, jax.random.PRNGKey(7)), CFG)
    rs = np.random.RandomState(3)
    prompts = []
    for n in PROMPT_LENGTHS:     # a repeated phrase gives the lookup something to find
        phrase = rs.randint(1, CFG.vocab_size, 3).tolist()
        prompts.append((phrase + rs.randint(1, CFG.vocab_size, n).tolist() + phrase)[:n + 3])
    decoder = Decoder(CFG, params, stop_ids=[], pad_id=PAD)
    free = decoder.generate(prompts, MAX_NEW + K, bucket=BUCKET)
    # a stop id that ends some rows early and not others
    counts = np.bincount(np.concatenate([t[2:12] for t in free.tokens]), minlength=CFG.vocab_size)
    stop_ids = [int(np.argsort(counts)[-3])]
    decoder = decoder.replace(stop_ids=stop_ids)
    greedy = decoder.generate(prompts, MAX_NEW, bucket=BUCKET)
    assert set(greedy.stop_reasons) == {"stop", "length"}, "setup: want ragged outputs"
    assert len(set(greedy.num_generated)) > 3, "setup: want ragged outputs"
    return decoder, prompts, stop_ids, greedy, free.tokens


@pytest.mark.parametrize("batch", [1, 3, 4, 16])
def test_greedy_through_refilled_slots_equals_static_greedy(setup, batch):
    decoder, prompts, stop_ids, greedy, _ = setup
    result = decoder.generate_continuous(prompts, MAX_NEW, batch_size=batch, bucket=BUCKET)
    assert result.tokens == greedy.tokens
    assert result.stop_reasons == greedy.stop_reasons
    assert result.num_generated == greedy.num_generated
    # K = 1: one token per step; the prefill emits each prompt's first token
    steps = [n - 1 for n in greedy.num_generated]
    assert result.stats["steps_per_row"] == steps
    assert result.stats["tau"] == 1.0
    # Every slot busy while the queue lasts: no fewer iterations than the work spread over B
    # slots, no more than static batches of B (each running until its longest row is done).
    static = sum(max(steps[i:i + batch]) for i in range(0, len(steps), batch))
    assert math.ceil(sum(steps) / batch) <= result.loop_iterations <= static
    if batch in (3, 4):
        assert result.loop_iterations < static
        assert result.prefill_calls > math.ceil(len(prompts) / batch)   # rows refilled singly
    if batch == 16:    # all prompts fit: one prefill, then the static loop
        assert result.prefill_calls == 1 and result.loop_iterations == static


def _drafters(decoder):
    params = decoder.params
    lstm_config = HeadConfig(kind="lstm", k=K)
    lstm = make_head(lstm_config, CFG)
    lstm_drafter, lstm_vars = head_drafter(lstm_config, init_head_params(
        lstm, params, jax.random.PRNGKey(5)), CFG, params)
    linear_config = HeadConfig(kind="linear", k=3)
    linear = make_head(linear_config, CFG)
    linear_drafter, linear_vars = head_drafter(linear_config, init_head_params(
        linear, params, jax.random.PRNGKey(6)), CFG, params)
    return {
        "lookup": (LookupDrafter(K - 1), LookupDrafter.variables()),
        "random": (RandomDrafter(K - 1, CFG.vocab_size), jax.random.PRNGKey(1)),
        "lstm-heads": (lstm_drafter, lstm_vars),
        "lookup+linear-heads": (LookupDrafter(K - 1, fallback=linear_drafter),
                                LookupDrafter.variables(linear_vars)),
    }


@pytest.mark.parametrize("name", ["lookup", "random", "lstm-heads", "lookup+linear-heads"])
@pytest.mark.parametrize("batch, padding", [(3, "left"), (4, "right")])
def test_mtp_through_refilled_slots_is_exact(setup, name, batch, padding):
    decoder, prompts, stop_ids, greedy, _ = setup
    drafter, variables = _drafters(decoder)[name]
    mtp = decoder.replace(drafter=drafter, drafter_vars=variables, tokens_per_step=K)
    result = mtp.generate_continuous(prompts, MAX_NEW, batch_size=batch, padding=padding,
                                     bucket=BUCKET)
    assert result.tokens == greedy.tokens
    assert result.stop_reasons == greedy.stop_reasons
    assert sum(result.stats["steps_per_row"]) == result.stats["verify_steps"]
    assert all(sum(e) == n - 1 for e, n in zip(result.stats["emitted_per_row"],
                                                result.num_generated))


@pytest.mark.parametrize("batch", [2, 5])
def test_refilled_slots_start_fresh(setup, batch):
    """Per prompt, the lookup's accepted drafts per step are those of a plain-Python lookup over
    that prompt alone, and equal the static decoder's: nothing of a slot's previous prompt
    (the lookup's history, the cache row) survives a refill."""
    decoder, prompts, stop_ids, greedy, continuations = setup
    lookup = decoder.replace(drafter=LookupDrafter(K - 1), drafter_vars=LookupDrafter.variables())
    result = lookup.generate_continuous(prompts, MAX_NEW, batch_size=batch, bucket=BUCKET)
    expected = [expected_accepted(p, c, stop_ids, MAX_NEW, K)
                for p, c in zip(prompts, continuations)]
    assert result.stats["accepted_per_row"] == expected
    assert result.stats["mean_accepted_drafts"] > 0.3    # the lookup does find things here
    static = lookup.generate(prompts, MAX_NEW, bucket=BUCKET)
    assert static.stats["accepted_per_row"] == expected
    assert result.stats["tau"] == static.stats["tau"]


def test_bad_arguments_are_refused(setup):
    decoder, prompts, stop_ids, _, _ = setup
    params = decoder.params
    with pytest.raises(ValueError, match="without a drafter W must be 1"):
        continuous_generate(CFG, params, prompts, MAX_NEW, stop_ids, PAD, batch_size=2,
                            tokens_per_step=4)
    with pytest.raises(ValueError, match="supports at most 3"):
        continuous_generate(CFG, params, prompts, MAX_NEW, stop_ids, PAD, batch_size=2,
                            drafter=LookupDrafter(K - 1), drafter_vars={},
                            tokens_per_step=K + 1)
    with pytest.raises(ValueError, match="batch_size"):
        continuous_generate(CFG, params, prompts, MAX_NEW, stop_ids, PAD, batch_size=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        continuous_generate(CFG, params, [[1] * 250], MAX_NEW, stop_ids, PAD, batch_size=2)
