"""The engine refuses what it cannot decode and stops on what it must not emit (issue 15):
prompt ids outside the vocabulary, and a trunk whose logits turn NaN/Inf (one isfinite
reduction per step), in static batches, continuous batching and with a drafter. The non-finite
error names its cause (issue 27): a pad id outside the embedding, a prompt that fails alone at
batch 1, the tensors holding NaN (decoding/nonfinite.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.decoding import Decoder, DecodingError
from gptk_jax.decoding.lookup import LookupDrafter
from gptk_jax.decoding.loop import Drafter
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import init_params

CFG = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  rope_theta=10000.0, max_seq_len=128)
PROMPTS = [[1, 5, 7, 9], [1, 3], [1, 4, 8, 15, 16]]
POISON = 66          # the token whose embedding row is NaN in the broken trunk


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def broken(params):
    """The same trunk with one embedding row NaN: a prompt holding that token, or a row that
    emits it, gets NaN logits from then on."""
    tree = jax.tree.map(lambda x: x, params)
    emb = np.array(tree["tok_embeddings"]["embedding"])
    emb[POISON] = np.nan
    tree["tok_embeddings"]["embedding"] = jnp.asarray(emb)
    return tree


@pytest.mark.parametrize("bad, named", [([[1, 2, 97]], "token id 97"),
                                        ([[1, 2], [3, -1]], "prompt 1 holds token id -1"),
                                        ([[1], []], "prompt 1 has no tokens")])
def test_prompt_ids_outside_the_vocabulary_are_refused(params, bad, named):
    decoder = Decoder(CFG, params, stop_ids=(), pad_id=0)
    for call in (lambda: decoder.generate(bad, 4),
                 lambda: decoder.generate_continuous(bad, 4, batch_size=1)):
        with pytest.raises(DecodingError, match=named):
            call()
    assert len(decoder.executables) == 0          # refused before anything was compiled


def test_nonfinite_logits_stop_with_an_error_naming_the_prompt(broken):
    prompts = PROMPTS + [[1, POISON, 3]]          # prompt 3 reads the NaN row in its prefill
    greedy = Decoder(CFG, broken, stop_ids=(), pad_id=0)
    with pytest.raises(DecodingError, match=r"non-finite logits .* prompt 3\b"):
        greedy.generate(prompts, 4)
    with pytest.raises(DecodingError, match=r"non-finite logits .* prompt 3\b"):
        greedy.generate_continuous(prompts, 4, batch_size=2)
    lookup = greedy.replace(drafter=LookupDrafter(3), drafter_vars=LookupDrafter.variables(),
                            tokens_per_step=4)
    with pytest.raises(DecodingError, match=r"prompt 3\b"):
        lookup.generate(prompts, 4)


@dataclasses.dataclass(frozen=True)
class PoisonDrafter(Drafter):
    """Drafts POISON at every offset: the prompts are clean (a finite prefill), and the first
    verify step feeds the NaN embedding row, so the NaN appears inside the decode loop."""
    max_drafts: int = 3

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        return jnp.full((next_token.shape[0], self.max_drafts), POISON, jnp.int32)


def test_nan_reached_inside_the_loop_is_caught(broken):
    poisoned = Decoder(CFG, broken, stop_ids=(), pad_id=0, drafter=PoisonDrafter(),
                       tokens_per_step=4)
    with pytest.raises(DecodingError, match=r"non-finite logits .* prompts 0, 1, 2:"):
        poisoned.generate(PROMPTS, 6)
    # continuous batching fails at the first run: prompt 2 was still queued
    with pytest.raises(DecodingError, match=r"non-finite logits .* prompts 0, 1:"):
        poisoned.generate_continuous(PROMPTS, 6, batch_size=2)


def test_finite_trunk_decodes_as_before(params):
    greedy = Decoder(CFG, params, stop_ids=(), pad_id=0)
    out = greedy.generate(PROMPTS, 4)
    assert [len(t) for t in out.tokens] == [4, 4, 4]


# --- the non-finite error names its cause (decoding/nonfinite.py) -------------------------------
CHECK_DIGESTS = "load the model with its tensor digests verified"


def test_a_nan_weight_read_by_a_prompt_is_named(broken):
    """Prompt 3 holds the token whose embedding row is NaN: it fails alone at batch 1 too, so
    the message blames the prompt's weights, names the tensor and the token id, and says how to
    check the weights."""
    prompts = PROMPTS + [[1, POISON, 3]]
    greedy = Decoder(CFG, broken, stop_ids=(), pad_id=0)
    for call in (lambda: greedy.generate(prompts, 4),
                 lambda: greedy.generate_continuous(prompts, 4, batch_size=2)):
        with pytest.raises(DecodingError) as e:
            call()
        message = str(e.value)
        assert "prompt 3 alone (batch 1, no padding) gives non-finite logits" in message
        assert (f"tok_embeddings.embedding (32 non-finite values, in the rows of token ids "
                f"{POISON})") in message
        assert f"the failing prompts hold token id {POISON}" in message
        assert CHECK_DIGESTS in message and "padding id" not in message
        assert "\n" not in message


def test_a_nan_in_a_layer_weight_is_named(params):
    """One NaN in a stacked layer weight: every prompt fails, each alone too."""
    tree = jax.tree.map(lambda x: x, params)
    w2 = np.array(tree["layers"]["feed_forward"]["w2"]["kernel"])
    w2[1, 3, 5] = np.nan
    tree["layers"]["feed_forward"]["w2"]["kernel"] = jnp.asarray(w2)
    with pytest.raises(DecodingError) as e:
        Decoder(CFG, tree, stop_ids=(), pad_id=0).generate(PROMPTS, 4)
    message = str(e.value)
    assert "cause: the weights: prompts 0, 1, 2 alone (batch 1, no padding) give non-finite " \
           "logits" in message
    # the decoder's per-layer layout names the layer
    assert "layers_1.feed_forward.w2.kernel (1 non-finite value)" in message
    assert "tok_embeddings" not in message and CHECK_DIGESTS in message


def test_a_pad_id_outside_the_embedding_is_named(params):
    """pad_id = vocab_size (a model converted with --allow-small-vocab by an older version):
    the padded rows read a row that does not exist; the prompts alone decode, so the message
    blames the padding and says what to check."""
    decoder = Decoder(CFG, params, stop_ids=(), pad_id=CFG.vocab_size)
    for call in (lambda: decoder.generate(PROMPTS, 4),
                 lambda: decoder.generate_continuous(PROMPTS, 4, batch_size=2)):
        with pytest.raises(DecodingError) as e:
            call()
        message = str(e.value)
        assert "cause: the padding id 97 is outside the embedding table (rows 0..96)" in message
        assert "alone (batch 1, no padding) give finite logits" in message
        assert "the pad id must be < vocab_size 97" in message and "python -m convert" in message
        assert "the weights hold" not in message
    # what the message says: without padding the same prompts decode
    out = decoder.generate([PROMPTS[2]], 4, bucket=1)
    assert len(out.tokens[0]) == 4


def test_a_pad_id_whose_row_is_nan_is_named(broken):
    decoder = Decoder(CFG, broken, stop_ids=(), pad_id=POISON)
    with pytest.raises(DecodingError) as e:
        decoder.generate(PROMPTS, 4)
    message = str(e.value)
    assert f"cause: the padding id {POISON}'s embedding row holds non-finite values" in message
    assert "prompts 0, 1, 2 alone (batch 1, no padding) give finite logits" in message
    assert CHECK_DIGESTS in message


def test_a_nan_reached_by_drafted_tokens_blames_the_weights(broken):
    """Clean prompts, a finite prefill, then drafts of the NaN row: the weights, reached while
    decoding."""
    poisoned = Decoder(CFG, broken, stop_ids=(), pad_id=0, drafter=PoisonDrafter(),
                       tokens_per_step=4)
    with pytest.raises(DecodingError) as e:
        poisoned.generate(PROMPTS, 6)
    message = str(e.value)
    assert "cause: the weights, reached while decoding" in message
    assert f"in the rows of token ids {POISON})" in message and CHECK_DIGESTS in message
    assert "prompts 0, 1, 2 alone give finite logits at the prompt" in message
