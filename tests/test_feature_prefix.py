"""The trunk-feature cache runs the prefix every row shares once (features/cache.py,
llama/prefix.py): its values equal the trunk run on each whole row alone, and the trunk runs on
fewer tokens (hand-counted)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from gptk_jax.heads.config import HeadConfig
from gptk_jax.llama.checkpoint import load_converted
from gptk_jax.llama.model import Llama
from gptk_jax.features.cache import FeatureCache
from gptk_jax.training.inputs import Trunk, ensure_tiny_trunk

# 8 rows: a 40-token prefix shared by all, then 4 prompt tokens of their own and targets;
# suffix lengths 5..35 and 60. Build batch 4, calls padded to multiples of 16.
# Shared: suffixes sorted 5 10 15 20 | 25 30 35 60 -> T 32, 64: 40 + 4*32 + 4*64 = 424 tokens.
# Whole rows: 45 50 55 60 | 65 70 75 100 -> T 64, 112: 4*64 + 4*112 = 704 tokens.
PREFIX, OWN_PROMPT = 40, 4
SUFFIXES = [35, 5, 60, 10, 30, 15, 25, 20]
SHARED_TOKENS, WHOLE_TOKENS = 424, 704


@dataclasses.dataclass(frozen=True)
class Row:
    tokens: np.ndarray
    prompt_len: int
    index: int


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    path = ensure_tiny_trunk(tmp_path_factory.mktemp("tiny") / "trunk")
    model = load_converted(path)
    return Trunk(config=model.config, params=model.params, tokenizer=model.tokenizer,
                 name="random-tiny", path=path)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(5)
    prefix = rng.integers(1, 256, PREFIX)
    return [Row(np.concatenate([prefix, rng.integers(1, 256, n)]).astype(np.int32),
                PREFIX + OWN_PROMPT, 2 * i) for i, n in enumerate(SUFFIXES)]


def _cache(tmp_path, trunk, rows, kind):
    return FeatureCache.open_or_build(tmp_path / kind, trunk, rows, HeadConfig(kind=kind, k=3),
                                      "float32", 4, argmax_chunk=16, log=lambda msg: None,
                                      progress=False)


def test_shared_prefix_cache_equals_each_row_alone(tmp_path, trunk, rows):
    cache = _cache(tmp_path, trunk, rows, "linear")
    assert cache.meta["build"]["trunk_tokens"] == SHARED_TOKENS       # whole rows: 704
    assert cache.meta["build"]["lengths"] == [32, 64]
    model_apply = jax.jit(Llama(trunk.config).apply)   # one program per row length
    for row in rows:
        n = len(row.tokens)
        out = model_apply({"params": trunk.params}, row.tokens[None],
                          np.arange(n, dtype=np.int32)[None], token_mask=np.ones((1, n), bool))
        got = cache.attach({"tokens": np.zeros((1, n), np.int32),
                            "example_index": np.asarray([row.index], np.int32)})
        start = row.prompt_len - 3
        np.testing.assert_allclose(got["hidden_normed"][0, start:],
                                   np.asarray(out.hidden_normed[0, start:]), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(got["trunk_argmax"][0, start:],
                                      np.asarray(jax.numpy.argmax(out.logits[0, start:], -1)))
        assert not got["hidden_normed"][0, :start].any()


def test_a_head_reading_every_position_runs_whole_rows(tmp_path, trunk, rows):
    """The context LSTM reads position 0 on: nothing is shared, whole rows run as before."""
    cache = _cache(tmp_path, trunk, rows, "lstm")
    assert cache.meta["build"]["trunk_tokens"] == WHOLE_TOKENS
    assert cache.meta["build"]["shared_prefix"] == 0
