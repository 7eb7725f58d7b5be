"""The training-time draft vocabulary U: the heads' softmax runs over the `size` most frequent
target tokens of the TRAINING rows (EAGLE-3 / FR-Spec), not over all V ids.

    ids = training_draft_vocab(train_pipe.rows, tokenizer, 4096)     # stop ids first
    vocab = DraftVocab(ids, V)   # remap: targets -> (local index into ids, in U?)

Counted over every row's target tokens (tokens[prompt_len:], the target and its stop token),
most frequent first, ties by id, the translation stop ids first so a draft can end a
translation (decoding/draft_vocab.py's ranking, `most_frequent`). Only the rows the heads train
on are read: never the validation rows (their own pipeline) nor any test set.

In the loss (step.py) a target outside U cannot be scored by a softmax over U: it is masked out
of the cross-entropy and counted (`oov` per offset), and top-1 / acceptance count it as a miss
(the head can only propose ids in U). The heads folder carries the ids (heads/io.py,
draft_vocab.json) and evaluation drafts over them by default.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def training_draft_vocab(rows, tokenizer, size: int) -> tuple[int, ...]:
    """rows: objects with `tokens` [L] and `prompt_len` (data pipeline rows) -> the `size` most
    frequent target ids (stop ids first, then by count, ties by id)."""
    from gptk_jax.data.prompts import translation_stop_ids
    from gptk_jax.decoding.draft_vocab import most_frequent

    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for row in rows:
        target = np.asarray(row.tokens[row.prompt_len:], np.int64)
        counts += np.bincount(target, minlength=counts.size)[:counts.size]
    nonzero = np.flatnonzero(counts)
    return most_frequent({int(i): int(counts[i]) for i in nonzero}, size,
                         always=translation_stop_ids(tokenizer))


def vocab_sha256(ids: Sequence[int]) -> str:
    """sha256 of the ids as a JSON list (evaluation/store.py's sha256_json of the same list)."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


class DraftVocab:
    """ids [U] into a vocabulary of V: the restricted unembedding and the target remap (usable
    under jit: the arrays are constants)."""

    def __init__(self, ids: Sequence[int], vocab_size: int):
        ids = np.asarray(ids, np.int32)
        if ids.ndim != 1 or ids.size == 0 or len(set(ids.tolist())) != ids.size:
            raise ValueError("draft vocabulary ids must be a non-empty list of distinct ids")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size})")
        self.ids = ids
        self.local_of = np.full(vocab_size, -1, np.int32)
        self.local_of[ids] = np.arange(ids.size, dtype=np.int32)

    def rows(self, w, tied: bool):
        """The unembedding restricted to U: [U,D] of the table [V,D] (tied), [D,U] of the
        kernel [D,V] (untied)."""
        ids = jnp.asarray(self.ids)
        return jnp.take(w, ids, axis=0) if tied else jnp.take(w, ids, axis=1)

    def remap(self, targets):
        """targets [...] global ids -> (local [...] index into ids (0 where outside U),
        in_vocab [...] bool)."""
        local = jnp.asarray(self.local_of)[targets]
        return jnp.maximum(local, 0), local >= 0

    def to_global(self, local):
        """local indices [...] -> global ids [...]."""
        return jnp.asarray(self.ids)[local]
