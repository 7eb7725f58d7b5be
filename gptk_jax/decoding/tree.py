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

Branches of different lengths: `TreeDrafter(..., first_drafts=La, second_drafts=Lb)` verifies
1 + La + Lb tokens with W - 1 = max(La, Lb), e.g. prompt lookup's continuation longer than the
heads' chain (a lookup match often runs on; the heads' acceptance falls with the offset). The
chosen chain is still one chain of W: where its branch is shorter, its drafts past the branch
are NEVER (no trunk token equals it), so acceptance stops there as at a rejected draft.

Letters: B batch, W tokens per chain (root included; the longer branch's drafts + 1), La / Lb
each branch's drafts, N = 1 + La + Lb tokens verified (in this file, not query heads), M cache
slots moved per row (Lb, the second branch's; in this file, not max new tokens), D width,
K kv heads, S cache slots, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.decoding.acceptance import accepted_length
from gptk_jax.decoding.loop import DecodeState, Drafter, Verified, greedy_pick
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import Llama


NEVER = -1   # a draft no trunk token equals: the chain's positions past its branch's drafts


def _layout(lengths: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(branch [N], depth [N]) of the verify tokens [root, a_1..a_La, b_1..b_Lb]; 0: the root."""
    la, lb = lengths
    branch = np.array([0] + [1] * la + [2] * lb)
    depth = np.concatenate([[0], np.arange(1, la + 1), np.arange(1, lb + 1)]).astype(np.int32)
    return branch, depth


def tree_mask(w: int, lengths: Optional[tuple[int, int]] = None) -> np.ndarray:
    """[N,N] bool for the root + two branches (of W-1 drafts each, or `lengths`): node i sees
    node j iff j is i or one of its ancestors (the root, its branch's earlier drafts)."""
    branch, depth = _layout(lengths or (w - 1, w - 1))
    i, j = np.arange(len(branch))[:, None], np.arange(len(branch))[None, :]
    same = (branch[i] == branch[j]) & (depth[j] <= depth[i])
    return same | (j == 0)


def branch_index(w: int, lengths: Optional[tuple[int, int]] = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """([2,W] the verify positions of each branch's chain: the root, then its drafts, then the
    root again where the branch is shorter than W-1; [2,W] bool: a real position)."""
    la, lb = lengths or (w - 1, w - 1)
    index, real = np.zeros((2, w), np.int32), np.zeros((2, w), bool)
    for row, (first, n) in enumerate(((1, la), (1 + la, lb))):
        index[row, 1:n + 1] = np.arange(first, first + n)
        real[row, :n + 1] = True
    return index, real


def _move_slots(buffer: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    """buffer [B,K,S,H]: slots src [B,M] copied to dst [B,M] (one gather, one scatter)."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    moved = buffer[rows, :, src]                                # [B,M,K,H]
    return buffer.at[rows, :, dst].set(moved, mode="drop", unique_indices=True)


def verify_tree(config: LlamaConfig, w: int, state: DecodeState, params: dict,
                lengths: Optional[tuple[int, int]] = None) -> Verified:
    """The trunk over the root and both branches' drafts (W-1 each, or La, Lb = `lengths`, the
    longer W-1) in one call -> each row's better branch as one chain of W (its cache slots moved
    into place; a shorter branch's chain ends in NEVER drafts, which are never accepted)."""
    la, lb = lengths or (w - 1, w - 1)
    half = state.drafts.shape[1] // 2
    first, second = state.drafts[:, :la], state.drafts[:, half:half + lb]        # [B,La] [B,Lb]
    tokens = jnp.concatenate([state.next_token[:, None], first, second], axis=1)  # [B,N]
    _, depth = _layout((la, lb))
    positions = state.positions[:, None] + jnp.asarray(depth)[None, :]            # [B,N]
    out = Llama(config).apply({"params": params}, tokens, positions, cache=state.cache,
                              tree_mask=tree_mask(w, (la, lb)))
    trunk = greedy_pick(out.logits)                                               # [B,N]
    index, real = branch_index(w, (la, lb))                                       # [2,W]
    idx = jnp.asarray(index)
    acc_first = accepted_length(first, trunk[:, idx[0]])
    acc_second = accepted_length(second, trunk[:, idx[1]])
    use_second = acc_second > acc_first                                           # [B]
    chosen = jnp.where(use_second[:, None], idx[1][None], idx[0][None])          # [B,W]
    chosen_real = jnp.where(use_second[:, None], real[1][None], real[0][None])   # [B,W]
    at = lambda x: jnp.take_along_axis(x, chosen.reshape(chosen.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
    chain_tokens = at(tokens)
    drafts = jnp.where(chosen_real[:, 1:], chain_tokens[:, 1:], NEVER)            # [B,W-1]
    start = state.cache.lengths[:, None]                                          # [B,1]
    dst = start + 1 + jnp.arange(lb)[None, :]                                     # [B,Lb]
    src = jnp.where(use_second[:, None], dst + la, dst)
    cache = out.cache.replace(k=tuple(_move_slots(k, src, dst) for k in out.cache.k),
                              v=tuple(_move_slots(v, src, dst) for v in out.cache.v))
    return Verified(drafts=drafts, tokens=chain_tokens, trunk_tokens=at(trunk),
                    hidden=at(out.hidden), hidden_normed=at(out.hidden_normed), cache=cache,
                    nonfinite=~jnp.all(jnp.isfinite(out.logits), axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class TreeDrafter(Drafter):
    """Two drafters' drafts per step, verified together (module doc); each drafter keeps its
    own state and sees every accepted position. first_drafts / second_drafts: each branch's
    drafts per step (None: max_drafts); the longer is max_drafts (W - 1)."""
    first: Drafter
    second: Drafter
    max_drafts: int
    first_drafts: Optional[int] = None
    second_drafts: Optional[int] = None
    branches = 2

    def __post_init__(self):
        la, lb = self.branch_drafts
        if min(la, lb) < 1 or max(la, lb) != self.max_drafts:
            raise ValueError(f"TreeDrafter: branch drafts {la}, {lb} must be >= 1 and the "
                             f"longer must equal max_drafts = {self.max_drafts}")

    @property
    def branch_drafts(self) -> tuple[int, int]:
        """(La, Lb): the drafts each branch verifies per step."""
        return (self.first_drafts or self.max_drafts, self.second_drafts or self.max_drafts)

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
        """-> [B, 2(W-1)]: the first drafter's La drafts, then the second's Lb, each padded
        with zeros to W-1 (verify_tree reads La and Lb)."""
        args = (last_hidden, last_hidden_normed, last_position, next_token)
        la, lb = self.branch_drafts
        pad = lambda x, n: jnp.pad(x[:, :n], ((0, 0), (0, self.max_drafts - n)))
        a = pad(self.first.draft(variables["first"], state[0], *args), la)
        b = pad(self.second.draft(variables["second"], state[1], *args), lb)
        return jnp.concatenate([a, b], axis=1).astype(jnp.int32)
