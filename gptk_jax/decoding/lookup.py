"""Prompt-lookup (n-gram) drafting, alone or in front of trained heads.

The drafts for offsets 2..W are the tokens that followed the most recent earlier occurrence of
the sequence's last n tokens (n from `max_ngram` down to `min_ngram`, the longest match wins),
looked up in the row's own tokens: the prompt and everything emitted so far. This is prompt
lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's "ngram"
speculator), here inside the jitted draft-verify loop of decoding/loop.py, per row, batched, with
no host round-trip. Translation copies names, numbers and (for weak translators) whole phrases
from the source, so the lookup is often right where trained heads are not.

With a `fallback` drafter (e.g. the trained heads' HeadDrafter), offsets the lookup cannot fill
(no match, or a match too close to the end of the sequence) take the fallback's drafts; without
one they repeat the trunk's next token. The fallback drafts only in steps where some row
needs it (`lax.cond`: at batch 1, a full lookup match skips the heads' vocabulary projection).
The trunk verifies every draft, so the output is greedy decoding's whatever is drafted.

State: the row's tokens so far (`history` [B,S], S = capacity = the cache's slots) and their
count (`length` [B]); `advance` appends the tokens of the positions that became part of the
sequence. At draft time the sequence is history[:length] + next_token (the trunk's token,
emitted but not yet cached).

Letters: B batch, S capacity (cache slots), T positions per advance, W tokens per verify step
(W-1 drafts).
(K is kept for kv heads.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from gptk_jax.decoding.checks import DecodingError
from gptk_jax.decoding.loop import Drafter


def append_tokens(history: jax.Array, length: jax.Array, tokens: jax.Array,
                  mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """history [B,S], length [B]; appends tokens [B,T] where mask [B,T] (in order, ragged)."""
    capacity = history.shape[1]
    slots = length[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1    # [B,T]
    slots = jnp.where(mask, slots, capacity)                                    # dropped
    rows = jnp.arange(history.shape[0])[:, None]
    history = history.at[rows, slots].set(tokens.astype(history.dtype), mode="drop")
    return history, length + mask.sum(axis=1, dtype=jnp.int32)


def lookup_drafts(history: jax.Array, length: jax.Array, next_token: jax.Array,
                  num_drafts: int, max_ngram: int, min_ngram: int
                  ) -> tuple[jax.Array, jax.Array]:
    """-> (drafts [B,W-1] int32, valid [B,W-1] bool).

    seq = history[:length] + [next_token] (index L = length holds next_token). For n = max_ngram
    down to min_ngram: the query is seq[L-n+1 .. L]; a match starts at s with s + n - 1 < L
    (strictly earlier than the query's end) and seq[s .. s+n-1] == query; the latest such s
    wins, and the longest n with any match. Drafts are seq[s+n .. s+n+W-2]; positions past L are
    not valid.
    """
    batch, capacity = history.shape
    rows = jnp.arange(batch)
    seq = jnp.concatenate([history, jnp.full((batch, max_ngram + num_drafts), -1, history.dtype)],
                          axis=1)                                               # [B,S+n+W-1]
    seq = seq.at[rows, length].set(next_token.astype(seq.dtype))
    # Slots past L hold stale tokens (rejected writes are not cleared): mask them out.
    index = jnp.arange(seq.shape[1])[None, :]
    seq = jnp.where(index <= length[:, None], seq, -1)
    width = capacity + 1                                     # candidate starts s = 0 .. C
    starts = jnp.arange(width)[None, :]                      # [1,W]
    best_start = jnp.full((batch,), -1, jnp.int32)
    best_n = jnp.zeros((batch,), jnp.int32)
    for n in range(max_ngram, min_ngram - 1, -1):
        query_at = length[:, None] - n + 1 + jnp.arange(n)[None, :]             # [B,n]
        query = jnp.take_along_axis(seq, jnp.maximum(query_at, 0), axis=1)      # [B,n]
        match = (starts <= (length[:, None] - n)) & (length[:, None] - n + 1 >= 0)
        for i in range(n):
            match &= seq[:, i:i + width] == query[:, i:i + 1]
        start_n = jnp.max(jnp.where(match, starts, -1), axis=1)                 # [B]
        take = (best_start < 0) & (start_n >= 0)
        best_start = jnp.where(take, start_n, best_start)
        best_n = jnp.where(take, n, best_n)
    draft_at = best_start[:, None] + best_n[:, None] + jnp.arange(num_drafts)[None, :]  # [B,W-1]
    valid = (best_start[:, None] >= 0) & (draft_at <= length[:, None])
    drafts = jnp.take_along_axis(seq, jnp.clip(draft_at, 0, seq.shape[1] - 1), axis=1)
    return jnp.where(valid, drafts, 0).astype(jnp.int32), valid


@dataclasses.dataclass(frozen=True)
class LookupDrafter(Drafter):
    """Prompt-lookup drafts; variables = {"fallback": the fallback's variables} (or {})."""
    max_drafts: int
    max_ngram: int = 3
    min_ngram: int = 1
    fallback: Optional[Drafter] = None

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise DecodingError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                                f"{self.max_ngram}")
        if self.max_drafts < 1:
            raise DecodingError(f"max_drafts must be >= 1, got {self.max_drafts}")

    @staticmethod
    def variables(fallback_vars: Any = None) -> dict:
        return {} if fallback_vars is None else {"fallback": fallback_vars}

    def init_state(self, variables, batch_size, capacity, max_new_tokens=None):
        state = {"history": jnp.zeros((batch_size, capacity), jnp.int32),
                 "length": jnp.zeros((batch_size,), jnp.int32)}
        if self.fallback is not None:
            state["fallback"] = self.fallback.init_state(variables["fallback"], batch_size,
                                                         capacity, max_new_tokens)
        return state

    def advance(self, variables, state, hidden_normed, advance_mask, tokens):
        history, length = append_tokens(state["history"], state["length"], tokens, advance_mask)
        new = {"history": history, "length": length}
        if self.fallback is not None:
            new["fallback"] = self.fallback.advance(variables["fallback"], state["fallback"],
                                                    hidden_normed, advance_mask, tokens)
        return new

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        return self.draft_scored(variables, state, last_hidden, last_hidden_normed,
                                 last_position, next_token)[0]

    def draft_scored(self, variables, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """Scores: 1 where the lookup found the draft, else the fallback's score (0 without a
        fallback, or where the fallback scores nothing)."""
        num_drafts = self.max_drafts
        drafts, valid = lookup_drafts(state["history"], state["length"], next_token, num_drafts,
                                      self.max_ngram, self.min_ngram)          # [B,W-1]
        found = valid.astype(jnp.float32)
        if self.fallback is None:
            return jnp.where(valid, drafts, next_token[:, None]).astype(jnp.int32), found

        def fit(x):   # the fallback's [B,<=W-1] -> [B,W-1] (fewer offsets: repeat its last)
            x = x[:, :num_drafts]
            if x.shape[1] < num_drafts:
                x = jnp.concatenate([x, jnp.repeat(x[:, -1:], num_drafts - x.shape[1], 1)], 1)
            return x

        def fallback_drafts(_):
            other, scores = self.fallback.draft_scored(
                variables["fallback"], state["fallback"], last_hidden, last_hidden_normed,
                last_position, next_token)
            scores = jnp.zeros(other.shape, jnp.float32) if scores is None else scores
            return fit(other.astype(jnp.int32)), fit(scores.astype(jnp.float32))

        # The fallback's drafting (a vocabulary projection for heads) runs only when some row
        # needs it; its state still advances every step (in `advance`).
        other, other_scores = jax.lax.cond(
            jnp.all(valid), lambda _: (jnp.zeros_like(drafts), jnp.zeros_like(found)),
            fallback_drafts, None)
        return (jnp.where(valid, drafts, other).astype(jnp.int32),
                jnp.where(valid, found, other_scores))
