"""Drafters for tests and benchmarks: bounds on what trained heads can do.

- `OracleDrafter`: drafts the true greedy continuation (computed beforehand by greedy decoding),
  so every draft is accepted (τ = W): the upper bound of self-speculative decoding. With
  `corrupt_prob > 0` each draft is replaced by a wrong token with that probability (ragged,
  partial acceptance, reproducible from a key).
- `RandomDrafter`: uniform random tokens (acceptance ~ 0: the lower bound, τ ~ 1).
- `RepeatDrafter`: repeats the trunk's next token (what zero-initialised linear heads do).

All are stateless apart from the oracle's per-row count of consumed positions. Letters: B batch,
R reference length, W tokens per verify step (W-1 drafts), D width, V vocab. (K: kv heads.)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.decoding.loop import Drafter


def _row_keys(key: jax.Array, last_position: jax.Array, next_token: jax.Array) -> jax.Array:
    """One key per row from (position, token): drafts do not depend on the batch layout."""
    fold = lambda p, t: jax.random.fold_in(jax.random.fold_in(key, p), t)
    return jax.vmap(fold)(last_position, next_token)


@dataclasses.dataclass(frozen=True)
class OracleDrafter(Drafter):
    """variables = `oracle_variables(...)`; state [B] int32 = positions consumed per row."""
    max_drafts: int
    vocab_size: int
    corrupt_prob: float = 0.0

    def init_state(self, variables, batch_size, capacity, max_new_tokens=None):
        return jnp.zeros((batch_size,), jnp.int32)

    def advance(self, variables, state, hidden_normed, advance_mask, tokens):
        return state + advance_mask.sum(axis=1).astype(jnp.int32)

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        reference = variables["reference"]                                   # [B,R]
        # state - prompt_length = index in the continuation of next_token (offset 1)
        index = (state - variables["prompt_lengths"])[:, None] + \
            jnp.arange(1, self.max_drafts + 1)[None, :]                      # [B,W-1]
        index = jnp.clip(index, 0, reference.shape[1] - 1)
        drafts = jnp.take_along_axis(reference, index, axis=1)
        if self.corrupt_prob > 0:
            keys = _row_keys(variables["key"], last_position, next_token)
            corrupt = jax.vmap(lambda k: jax.random.bernoulli(
                k, self.corrupt_prob, (self.max_drafts,)))(keys)
            drafts = jnp.where(corrupt, (drafts + 1) % self.vocab_size, drafts)
        return drafts.astype(jnp.int32)


def oracle_variables(continuations: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                     batch_size: int, max_drafts: int, seed: int = 0) -> dict:
    """continuations: the greedy output per row (e.g. GenerationResult.tokens, plus the stop
    token if one was emitted); rows past len(continuations) are inactive fillers."""
    width = max([len(c) for c in continuations] + [1]) + max_drafts
    reference = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    for b, (cont, n) in enumerate(zip(continuations, prompt_lengths)):
        reference[b, :len(cont)] = cont
        lengths[b] = n
    return {"reference": reference, "prompt_lengths": lengths,
            "key": jax.random.PRNGKey(seed)}


@dataclasses.dataclass(frozen=True)
class RandomDrafter(Drafter):
    """Uniform random drafts; variables = a PRNG key."""
    max_drafts: int
    vocab_size: int

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        keys = _row_keys(variables, last_position, next_token)
        return jax.vmap(lambda k: jax.random.randint(k, (self.max_drafts,), 0,
                                                     self.vocab_size))(keys).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RepeatDrafter(Drafter):
    """Drafts the trunk's next token at every offset; variables unused (pass ())."""
    max_drafts: int

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        return jnp.repeat(next_token[:, None], self.max_drafts, axis=1).astype(jnp.int32)
