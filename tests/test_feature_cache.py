"""The trunk-feature cache built in length buckets (features/cache.py, data/pipeline.py
`length_sorted_batches`): the same values as the build in input order and as the trunk run on
each row alone, with fewer tokens through the trunk (hand-counted)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from gptk_jax.data.pipeline import length_sorted_batches
from gptk_jax.heads.config import HeadConfig
from gptk_jax.llama.checkpoint import load_converted
from gptk_jax.llama.model import Llama
from gptk_jax.features.cache import FeatureCache, build_groups
from gptk_jax.training.inputs import Trunk, ensure_tiny_trunk

# 12 rows, 4 per trunk call. Sorted: 3 5 6 8 | 9 12 35 38 | 40 66 70 90 -> T 16, 48, 96
# (multiples of 16): 4 * (16 + 48 + 96) = 640 tokens. Input order (multiples of 32):
# [70 5 9 40] [3 66 12 35] [8 90 6 38] -> 96 each: 4 * 3 * 96 = 1152 tokens.
LENGTHS = [70, 5, 9, 40, 3, 66, 12, 35, 8, 90, 6, 38]
BUILD_BATCH = 4
BUCKETED_TOKENS, INPUT_ORDER_TOKENS = 640, 1152


@dataclasses.dataclass(frozen=True)
class Row:                    # what the cache reads of a pipeline row
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
    rng = np.random.default_rng(0)
    # pair indices not in row order (rows dropped by the length filter leave gaps)
    return [Row(rng.integers(0, 256, n).astype(np.int32), max(1, n // 3), 3 * i + 1)
            for i, n in enumerate(LENGTHS)]


def test_length_sorted_batches_hand_case():
    groups = length_sorted_batches([40, 3, 33, 64, 65, 1, 32], batch_size=3, multiple=32)
    assert [(t, list(index)) for t, index in groups] == [(32, [5, 1, 6]), (64, [2, 0, 3]),
                                                         (96, [4])]
    # ties keep the input order
    assert [list(i) for _, i in length_sorted_batches([7, 7, 7], 2, 8)] == [[0, 1], [2]]
    with pytest.raises(ValueError):
        length_sorted_batches([3], batch_size=0, multiple=32)


def test_build_groups_token_counts(rows):
    for bucketed, expected in ((True, BUCKETED_TOKENS), (False, INPUT_ORDER_TOKENS)):
        groups = build_groups(rows, BUILD_BATCH, bucketed)
        assert sum(BUILD_BATCH * t for t, _ in groups) == expected
        assert sorted(int(i) for _, index in groups for i in index) == list(range(len(rows)))


def _build(tmp_path, trunk, rows, head_config, bucketed):
    return FeatureCache.open_or_build(tmp_path / ("bucketed" if bucketed else "input-order"),
                                      trunk, rows, head_config, "float32", BUILD_BATCH,
                                      argmax_chunk=16, log=lambda msg: None, progress=False,
                                      bucketed=bucketed)


@pytest.mark.parametrize("kind", ["linear", "poma", "lstm"])
def test_bucketed_cache_equals_input_order_cache(tmp_path, trunk, rows, kind):
    head_config = HeadConfig(kind=kind, k=3)
    bucketed = _build(tmp_path, trunk, rows, head_config, True)
    input_order = _build(tmp_path, trunk, rows, head_config, False)
    assert bucketed.meta["build"]["trunk_tokens"] == BUCKETED_TOKENS
    assert input_order.meta["build"]["trunk_tokens"] == INPUT_ORDER_TOKENS
    assert bucketed.meta["build"]["lengths"] == [16, 48, 96]
    assert input_order.meta["build"]["lengths"] == [96]
    assert np.array_equal(bucketed.spans, input_order.spans)
    assert sorted(bucketed.arrays) == sorted(input_order.arrays)
    for field, values in bucketed.arrays.items():
        other = input_order.arrays[field]
        assert values.shape == other.shape and values.shape[0] == int(bucketed.spans[:, 2].sum())
        # every real position of every row: the same value, up to float32 rounding (attention
        # over 16 / 48 / 96 slots and over 96 slots accumulates in different blocks); ids exactly
        _assert_same(np.asarray(values), np.asarray(other), field)
    # and what a training batch receives (rows in batch order, a filler row)
    batch = {"tokens": np.zeros((3, 96), np.int32),
             "example_index": np.asarray([rows[9].index, -1, rows[4].index], np.int32)}
    a, b = bucketed.attach(batch), input_order.attach(batch)
    for field in bucketed.arrays:
        _assert_same(a[field], b[field], field)
        assert not a[field][1].any()                           # the filler row


def _assert_same(a: np.ndarray, b: np.ndarray, field: str) -> None:
    if np.issubdtype(a.dtype, np.integer):
        np.testing.assert_array_equal(a, b, err_msg=field)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=field)


def test_bucketed_cache_matches_the_trunk_on_each_row_alone(tmp_path, trunk, rows):
    head_config = HeadConfig(kind="linear", k=3)
    cache = _build(tmp_path, trunk, rows, head_config, True)
    model_apply = jax.jit(Llama(trunk.config).apply)   # one program per row length
    for row in rows[::3]:            # lengths 70, 40, 12, 90: both trunk-call lengths
        n = len(row.tokens)
        out = model_apply({"params": trunk.params}, row.tokens[None],
                          np.arange(n, dtype=np.int32)[None], token_mask=np.ones((1, n), bool))
        batch = {"tokens": np.zeros((1, n), np.int32),
                 "example_index": np.asarray([row.index], np.int32)}
        got = cache.attach(batch)
        start = max(0, row.prompt_len - max(head_config.offsets))
        np.testing.assert_allclose(got["hidden_normed"][0, start:],
                                   np.asarray(out.hidden_normed[0, start:]), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(got["trunk_argmax"][0, start:],
                                      np.asarray(jax.numpy.argmax(out.logits[0, start:], -1)))
        assert not got["hidden_normed"][0, :start].any()       # outside the span: zeros
