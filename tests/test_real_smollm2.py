"""The real SmolLM2-135M-Instruct Q4_1 GGUF: our conversion against transformers reading the same
file in float32 (it dequantizes and un-permutes q/k with its own code).

Twenty newstest2014 German sentences in a two-shot translation prompt (shots: the first short
newstest2013 pairs, read at run time) go through transformers' `generate` (one left-padded
batch, 32 greedy tokens, keeping the logits each token was picked from) and through our jitted
greedy decoder: the continuations must agree token for token. Our logits, teacher-forced over
prompt + continuation, must agree with transformers' at every generated position to a small bound
(the measured maximum is printed; run with -s to see it).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _hf_reference as ref
from conftest import read_lines
from convert import cli
from gptk_jax import artifacts
from gptk_jax.llama.checkpoint import load_converted
from gptk_jax.data.prompts import PromptFormat, few_shot_from
from gptk_jax.data.wmt import Pair
from gptk_jax.decoding.greedy import greedy_generate
from gptk_jax.llama.model import Llama

pytestmark = pytest.mark.slow

NUM_SENTENCES = 20
NEW_TOKENS = 32
LOGITS_BOUND = 1e-3
LOGITS_BATCH = 10


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(our conversion, loaded with scan_layers; transformers' float32 model of the same GGUF)."""
    path = artifacts.fetch("smollm2_gguf")
    out = tmp_path_factory.mktemp("smollm2") / "converted"
    start = time.perf_counter()
    assert cli.main(["--format", "gguf", "--input", str(path), "--output", str(out)]) == 0
    print(f"\nconverted SmolLM2-135M Q4_1 in {time.perf_counter() - start:.1f} s")
    return load_converted(out, scan_layers=True), ref.hf_from_gguf(path)


@pytest.fixture(scope="module")
def prompts(smollm2, wmt_dir):
    ours, _ = smollm2
    shots = few_shot_from((Pair(de, en) for de, en in zip(
        read_lines(wmt_dir / "newstest2013.de"), read_lines(wmt_dir / "newstest2013.en"))),
        n=2, max_chars=60)
    # no trailing space after "English:" (SmolLM2 then starts its translations with digits)
    fmt = PromptFormat(instruction="Translate German to English.\n",
                       shot_template="German: {src}\nEnglish: {tgt}\n",
                       query_template="German: {src}\nEnglish:", shots=shots)
    sources = read_lines(wmt_dir / "newstest2014.de")[:NUM_SENTENCES]
    tok = ours.tokenizer
    return [tok.encode(fmt.prompt_text(s), bos=tok.add_bos) for s in sources]


@pytest.fixture(scope="module")
def hf_generated(smollm2, prompts):
    """transformers' greedy continuations and the logits they were picked from [B,32,V]."""
    ours, hf = smollm2
    return ref.hf_greedy_batch(hf, prompts, NEW_TOKENS, pad_id=ours.tokenizer.pad_id)


def test_conversion_reads_smollm2_as_published(smollm2):
    ours, hf = smollm2
    c = ours.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == \
        (49152, 576, 30, 9, 3, 1536)
    assert c.tie_embeddings and c.rope_scaling is None and c.rope_theta == 100000.0
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == 3
    tok = ours.tokenizer
    assert tok.vocab_size == 49152 and tok.eos_id == 2 and not tok.add_bos


def test_greedy_translations_match_transformers_token_for_token(smollm2, prompts,
                                                                hf_generated):
    ours, _ = smollm2
    want, _ = hf_generated
    result = greedy_generate(ours.config, ours.params, prompts, NEW_TOKENS, stop_ids=(),
                             pad_id=ours.tokenizer.pad_id, padding="left")
    mismatches = [i for i, (a, b) in enumerate(zip(result.tokens, want)) if a != b]
    for i in mismatches:
        print(f"sentence {i}: ours {ours.tokenizer.decode(result.tokens[i])!r}\n"
              f"   transformers {ours.tokenizer.decode(want[i])!r}")
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} continuations differ"
    assert len(want) == NUM_SENTENCES and all(len(t) == NEW_TOKENS for t in want)
    # text, not one token repeated (what a model with wrongly converted weights degenerates to)
    assert len({t for row in want for t in row}) > 150


def test_logits_at_every_generated_position_match_transformers(smollm2, prompts, hf_generated):
    ours, _ = smollm2
    continuations, hf_logits = hf_generated
    # teacher-forced: prompt + the first 31 generated tokens; the last 32 positions' logits are
    # those of the 32 greedy picks
    sequences = [p + c[:-1] for p, c in zip(prompts, continuations)]
    width = max(map(len, sequences))
    apply = jax.jit(lambda params, tokens, positions: Llama(ours.config).apply(
        {"params": params}, tokens, positions).logits)
    max_diff = 0.0
    for start in range(0, len(sequences), LOGITS_BATCH):
        batch = sequences[start:start + LOGITS_BATCH]
        # right padding: causal attention keeps it away from the real positions compared
        tokens = np.zeros((LOGITS_BATCH, width), np.int32)
        for row, seq in enumerate(batch):
            tokens[row, :len(seq)] = seq
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
        got = np.asarray(apply(ours.params, jnp.asarray(tokens), jnp.asarray(positions)))
        for row, seq in enumerate(batch):
            ours_at_picks = got[row, len(seq) - NEW_TOKENS:len(seq)]       # [32, V]
            max_diff = max(max_diff,
                           float(np.abs(ours_at_picks - hf_logits[start + row]).max()))
    max_abs = float(np.abs(hf_logits).max())
    print(f"\nSmolLM2-135M Q4_1 vs transformers, {len(sequences)} x {NEW_TOKENS} generated "
          f"positions: max |logit difference| {max_diff:.3g} (logits up to {max_abs:.3g})")
    assert max_abs > 5.0
    assert max_diff < LOGITS_BOUND
