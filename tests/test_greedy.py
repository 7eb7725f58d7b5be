"""Greedy decoding on a tiny random trunk: against a naive no-cache loop, ragged batches in both
padding modes against each prompt alone, stop ids, max_new_tokens, bucketing and filler rows.

One Decoder serves the module: its executables are shared across tests (same batch, bucket and
max_new_tokens) to keep this light.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding.engine import Decoder
from gptk_jax.decoding.greedy import greedy_generate
from gptk_jax.decoding.inputs import bucket_length, pad_prompts, stop_id_array
from gptk_jax.llama.model import Llama, init_params, params_for_model

CFG = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  rope_theta=10000.0, max_seq_len=128)
PAD = 0
MAX_NEW = 8
BUCKET = 16
# Ragged prompts, all within one bucket of 16 so batch-1 runs share one executable.
PROMPTS = [[1, 5, 7, 9, 11, 13, 2], [1, 3], [1, 4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42]]


@pytest.fixture(scope="module")
def params():
    params = init_params(CFG, jax.random.PRNGKey(0))
    # Sharpen the random logits: argmax near-ties would make float-order differences visible.
    params["tok_embeddings"]["embedding"] = params["tok_embeddings"]["embedding"] * 25.0
    return params


def naive_greedy(params, prompt, max_new, stop_ids=()):
    """Full forward without a cache over the growing sequence, argmax at its last position.

    The sequence lives in a fixed buffer (one compile); causal attention makes the slots past the
    current length irrelevant to the logits read."""
    model_params = params_for_model(params, CFG)
    width = len(prompt) + max_new
    forward = jax.jit(lambda tokens: Llama(CFG).apply(
        {"params": model_params}, tokens, jnp.arange(width)[None]).logits[0])
    seq = list(prompt)
    for _ in range(max_new):
        buffer = np.array([seq + [PAD] * (width - len(seq))], np.int32)
        token = int(np.argmax(forward(buffer)[len(seq) - 1]))
        seq.append(token)
        if token in stop_ids:
            break
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def reference(params):
    return [naive_greedy(params, p, MAX_NEW) for p in PROMPTS]


@pytest.fixture(scope="module")
def decoder(params):
    return Decoder(CFG, params, stop_ids=[], pad_id=PAD)


def generate(decoder, prompts, stop_ids=(), max_new_tokens=MAX_NEW, **kw):
    kw.setdefault("bucket", BUCKET)
    return decoder.replace(stop_ids=stop_ids).generate(prompts, max_new_tokens, **kw)


def test_pad_prompts_left_and_right():
    left = pad_prompts([[7, 8, 9], [5]], PAD, padding="left", bucket=4)
    np.testing.assert_array_equal(left.tokens, [[0, 7, 8, 9], [0, 0, 0, 5]])
    np.testing.assert_array_equal(left.token_mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(left.positions, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(left.last_index, [3, 3])
    np.testing.assert_array_equal(left.cache_lengths, [4, 4])
    right = pad_prompts([[7, 8, 9], [5]], PAD, padding="right", bucket=4, batch_size=3)
    np.testing.assert_array_equal(right.tokens, [[7, 8, 9, 0], [5, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(right.token_mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(right.positions, [[0, 1, 2, 3]] * 3)
    np.testing.assert_array_equal(right.last_index, [2, 0, 0])
    np.testing.assert_array_equal(right.cache_lengths, [3, 1, 1])
    np.testing.assert_array_equal(right.prompt_lengths, [3, 1, 1])
    np.testing.assert_array_equal(right.active, [True, True, False])
    assert bucket_length(33, 32) == 64 and bucket_length(32, 32) == 32 and bucket_length(5, 1) == 5
    np.testing.assert_array_equal(stop_id_array([9, 2, 9]), [2, 9, -1, -1, -1, -1, -1, -1])
    with pytest.raises(ValueError, match="empty"):
        pad_prompts([[1], []], PAD)
    with pytest.raises(ValueError, match="padding"):
        pad_prompts([[1]], PAD, padding="middle")


def test_single_prompt_matches_naive_loop(decoder, reference):
    for prompt, expected in zip(PROMPTS, reference):
        result = generate(decoder, [prompt])
        assert result.tokens == [expected]
        assert result.stop_reasons == ["length"]
        assert result.num_generated == [MAX_NEW] and result.num_steps == MAX_NEW


@pytest.mark.parametrize("padding", ["left", "right"])
def test_ragged_batch_equals_each_prompt_alone(decoder, reference, padding):
    batched = generate(decoder, PROMPTS, padding=padding)
    assert batched.padded_shape == (3, BUCKET)
    assert batched.tokens == reference
    for prompt, expected in zip(PROMPTS, reference):
        assert generate(decoder, [prompt], padding=padding).tokens == [expected]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_stop_id_ends_its_row_only(params, decoder, reference, padding):
    # Stop on the token row 0 produces at its 4th step (hand-picked from the reference run).
    stop = reference[0][3]
    assert stop not in reference[0][:3]
    result = generate(decoder, PROMPTS, stop_ids=[stop], padding=padding)
    for row, (tokens, expected) in enumerate(zip(result.tokens, reference)):
        if stop in expected:
            cut = expected.index(stop)
            assert tokens == expected[:cut], row
            assert result.stop_reasons[row] == "stop"
            assert result.num_generated[row] == cut + 1
        else:
            assert tokens == expected and result.stop_reasons[row] == "length"
    assert result.stop_reasons[0] == "stop" and result.num_generated[0] == 4
    # Agrees with the naive loop stopping on the same id.
    assert result.tokens[0] + [stop] == naive_greedy(params, PROMPTS[0], MAX_NEW, {stop})


def test_loop_ends_when_every_row_is_done(decoder, reference):
    firsts = {r[0] for r in reference}
    result = generate(decoder, PROMPTS, stop_ids=firsts)
    assert result.tokens == [[], [], []]
    assert result.num_generated == [1, 1, 1] and result.num_steps == 1


def test_max_new_tokens(decoder, reference):
    result = generate(decoder, PROMPTS, max_new_tokens=3)
    assert result.tokens == [r[:3] for r in reference]
    assert result.num_steps == 3 and result.stop_reasons == ["length"] * 3
    one = generate(decoder, PROMPTS, max_new_tokens=1)
    assert one.tokens == [r[:1] for r in reference] and one.num_steps == 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(decoder, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(decoder, PROMPTS, max_new_tokens=CFG.max_seq_len)


def test_bucketing_and_filler_rows_do_not_change_tokens(decoder, reference):
    exact = generate(decoder, PROMPTS, bucket=1)
    assert exact.padded_shape == (3, max(map(len, PROMPTS)))
    assert exact.tokens == reference
    wide = generate(decoder, PROMPTS, bucket=32, padding="right", batch_size=5)
    assert wide.padded_shape == (5, 32)
    assert wide.tokens == reference and len(wide.num_generated) == 3


def test_executables_are_reused(decoder):
    generate(decoder, PROMPTS)
    # Other prompts and stop ids, same (batch, bucket, max_new_tokens): no recompilation.
    again = generate(decoder, [PROMPTS[2], PROMPTS[0], [1, 2, 3, 4, 5]], stop_ids=[5],
                     padding="right")
    assert again.compile_seconds == 0.0


def test_executables_belong_to_their_decoder(params, decoder, reference):
    """No global cache: another Decoder of the same trunk compiles its own executables (which
    die with it); `replace` shares them."""
    other = Decoder(CFG, params, stop_ids=[], pad_id=PAD)
    result = other.generate([PROMPTS[0]], MAX_NEW, bucket=BUCKET)
    assert result.compile_seconds > 0 and result.tokens == [reference[0]]
    assert other.replace(stop_ids=[3]).generate([PROMPTS[1]], MAX_NEW,
                                                bucket=BUCKET).compile_seconds == 0.0
    assert other.executables is not decoder.executables


def test_compiled_executables_are_bounded_least_recently_used_first(params):
    bounded = Decoder(CFG, params, stop_ids=[], pad_id=PAD, max_compiled=2)
    run = lambda n: bounded.generate([[3] * n], 2, bucket=8)
    assert run(1).compile_seconds > 0          # bucket 8: prefill + loop executables
    assert run(2).compile_seconds == 0.0       # same shapes
    assert run(9).compile_seconds > 0          # bucket 16: two more, bucket 8's two evicted
    assert len(bounded.executables) == 2
    assert run(1).compile_seconds > 0          # compiled again


def test_greedy_result_has_the_step_statistics_of_one_token_per_step(decoder, reference):
    result = generate(decoder, PROMPTS)
    assert result.tokens_per_step == 1 and result.stats["tau"] == 1.0
    assert result.stats["steps_per_row"] == [n - 1 for n in result.num_generated]
    assert result.stop_tokens == [None] * 3
    assert [r["tokens"] for r in result.row_records()] == reference


def test_scan_layers_layout_gives_the_same_tokens(params, reference):
    result = greedy_generate(CFG.replace(scan_layers=True), params, PROMPTS, MAX_NEW, [], PAD,
                             bucket=BUCKET)
    assert result.tokens == reference


@pytest.mark.parametrize("padding", ["left", "right"])
def test_prefill_cache_lengths_and_valid_slots(params, padding):
    from gptk_jax.decoding.loop import prefill
    prompts = pad_prompts([[1, 2, 3], [4]], PAD, padding=padding, bucket=4)
    out = prefill(CFG, params_for_model(params, CFG), prompts, slots=6)
    valid = np.asarray(out.cache.valid)
    if padding == "left":
        assert list(np.asarray(out.cache.lengths)) == [4, 4]
        np.testing.assert_array_equal(valid[:, :4], [[0, 1, 1, 1], [0, 0, 0, 1]])
    else:  # the next token overwrites the first pad slot
        assert list(np.asarray(out.cache.lengths)) == [3, 1]
        np.testing.assert_array_equal(valid[:, :4], [[1, 1, 1, 0], [1, 0, 0, 0]])
    assert list(np.asarray(out.next_positions)) == [3, 1]
    assert out.logits.shape == (2, CFG.vocab_size) and out.hidden.shape == (2, CFG.dim)
