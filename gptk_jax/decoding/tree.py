"""Two drafts per offset verified in one trunk call: a tree of two branches (e.g. prompt lookup's
continuation and a learned drafter's chain) that share the trunk's next token as their root.

    drafter = TreeDrafter(first=LookupDrafter(max_drafts=W-1), second=heads_drafter,
                          max_drafts=W-1)
    variables = TreeDrafter.variables(first_vars, second_vars)

One verify call runs 2W-1 tokens: [next_token, a_1..a_{W-1}, b_1..b_{W-1}] at positions
[p, p+1..p+W-1, p+1..p+W-1], with a tree mask (each token sees the cache, the root and its own
branch's earlier drafts: `tree_mask`). Per row the branch with more accepted drafts is kept (ties:
the first); when it is the second, its keys and values move from slots p+W..p+2W-2 down to
p+1..p+W-1, so the cache holds exactly the chain the row accepted, and the stale slots past the
accepted length are overwritten later as after any rejected draft. Everything after the verify
(acceptance, the stop cut, the logs, the drafters' advance) sees one chain of W tokens, the
chosen branch's (loop.Verified), so the output is greedy's exactly as for one chain.

The tree costs 2W-1 tokens per verify instead of W (bench/bench_verify_cost.py measures what a
token costs); W is fixed (auto W chooses among chains of one drafter).

Letters: B batch, W tokens per branch (root included), N = 2W-1 tokens verified (in this file,
not query heads), M cache slots moved per row (W-1, the second branch's; in this file, not max new
tokens), D width, K kv heads, S cache slots, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.decoding.acceptance import accepted_length
from gptk_jax.decoding.loop import DecodeState, Drafter, Verified, greedy_pick
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import Llama


def tree_mask(w: int) -> np.ndarray:
    """[N,N] bool for the root + two branches of W-1: node i sees node j iff j is i or one of
    its ancestors (the root, its branch's earlier drafts)."""
    n = 2 * w - 1
    branch = np.array([0] + [1] * (w - 1) + [2] * (w - 1))     # 0: the root
    depth = np.array([0] + list(range(1, w)) * 2)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    same = (branch[i] == branch[j]) & (depth[j] <= depth[i])
    return same | (j == 0)


def branch_index(w: int) -> np.ndarray:
    """[2,W] the verify positions of each branch's chain (the root, then its drafts)."""
    return np.stack([np.arange(w), np.concatenate([[0], np.arange(w, 2 * w - 1)])])


def _move_slots(buffer: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    """buffer [B,K,S,H]: slots src [B,M] copied to dst [B,M] (one gather, one scatter)."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    moved = buffer[rows, :, src]                                # [B,M,K,H]
    return buffer.at[rows, :, dst].set(moved, mode="drop", unique_indices=True)


def verify_tree(config: LlamaConfig, w: int, state: DecodeState, params: dict) -> Verified:
    """The trunk over the root and both branches' first W-1 drafts in one call -> each row's
    better branch as one chain (its cache slots moved into place)."""
    half = state.drafts.shape[1] // 2
    first, second = state.drafts[:, :w - 1], state.drafts[:, half:half + w - 1]   # [B,W-1]
    tokens = jnp.concatenate([state.next_token[:, None], first, second], axis=1)  # [B,N]
    depth = jnp.asarray(np.concatenate([[0], np.arange(1, w), np.arange(1, w)]), jnp.int32)
    positions = state.positions[:, None] + depth[None, :]                         # [B,N]
    out = Llama(config).apply({"params": params}, tokens, positions, cache=state.cache,
                              tree_mask=tree_mask(w))
    trunk = greedy_pick(out.logits)                                               # [B,N]
    idx = jnp.asarray(branch_index(w))                                            # [2,W]
    acc_first = accepted_length(first, trunk[:, idx[0]])
    acc_second = accepted_length(second, trunk[:, idx[1]])
    use_second = acc_second > acc_first                                           # [B]
    chosen = jnp.where(use_second[:, None], idx[1][None], idx[0][None])          # [B,W]
    at = lambda x: jnp.take_along_axis(x, chosen.reshape(chosen.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
    chain_tokens = at(tokens)
    start = state.cache.lengths[:, None]                                          # [B,1]
    dst = start + 1 + jnp.arange(w - 1)[None, :]                                  # [B,W-1]
    src = jnp.where(use_second[:, None], dst + (w - 1), dst)
    cache = out.cache.replace(k=tuple(_move_slots(k, src, dst) for k in out.cache.k),
                              v=tuple(_move_slots(v, src, dst) for v in out.cache.v))
    return Verified(drafts=chain_tokens[:, 1:], tokens=chain_tokens, trunk_tokens=at(trunk),
                    hidden=at(out.hidden), hidden_normed=at(out.hidden_normed), cache=cache,
                    nonfinite=~jnp.all(jnp.isfinite(out.logits), axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class TreeDrafter(Drafter):
    """Two drafters' W-1 drafts per step, verified together (module doc); each drafter keeps
    its own state and sees every accepted position."""
    first: Drafter
    second: Drafter
    max_drafts: int
    branches = 2

    @staticmethod
    def variables(first_vars: Any, second_vars: Any) -> dict:
        return {"first": first_vars, "second": second_vars}

    def init_state(self, variables, batch_size, capacity, max_new_tokens=None):
        return (self.first.init_state(variables["first"], batch_size, capacity, max_new_tokens),
                self.second.init_state(variables["second"], batch_size, capacity,
                                       max_new_tokens))

    def advance(self, variables, state, hidden_normed, advance_mask, tokens):
        return (self.first.advance(variables["first"], state[0], hidden_normed, advance_mask,
                                   tokens),
                self.second.advance(variables["second"], state[1], hidden_normed, advance_mask,
                                    tokens))

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position,
              next_token):
        """-> [B, 2(W-1)]: the first drafter's W-1 drafts, then the second's."""
        args = (last_hidden, last_hidden_normed, last_position, next_token)
        a = self.first.draft(variables["first"], state[0], *args)[:, :self.max_drafts]
        b = self.second.draft(variables["second"], state[1], *args)[:, :self.max_drafts]
        return jnp.concatenate([a, b], axis=1).astype(jnp.int32)
