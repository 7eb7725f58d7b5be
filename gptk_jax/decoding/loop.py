"""The decoding loop: one jitted state machine over a small state pytree, for every decoder.

    PromptBatch --prefill_state: one trunk call; first token = trunk argmax; the drafter
    consumes the prompt--> DecodeState --run: lax.while_loop of decode_step--> DecodeState
    (continuous batching: `refill` prefills new prompts into chosen slots between runs)

One `decode_step`, for every row at once (finished rows run along, frozen):
  1. draft: the drafter's W_max-1 tokens for offsets 2..W_max (and their scores), made at the
     end of the previous step (or by the prefill) from the trunk's hidden state at the last
     accepted position and the trunk's exact next token (offset 1), from its own state; the
     step verifies the first W-1 (drafting ahead lets auto W read the scores before choosing);
  2. verify: one trunk call over `[next_token, drafts]` (T=W) at the row's next W positions,
     writing cache slots `lengths .. lengths+W-1`;
  3. accept (acceptance.accept_step): the longest draft prefix equal to the trunk's argmax, plus
     the trunk's token after it (bonus); cut after a stop id or at the token limit;
  4. roll back logically: `lengths = old + 1 + accepted` (rejected slots are overwritten by the
     next write and never attended before, see llama/kv_cache.py); the drafter advances over the
     accepted positions only; the bonus token is the next step's `next_token`; the drafter
     drafts the next step's tokens.
Shared prefix: `prefill_state` / `refill` may take a `SharedPrefix` (the tokens every row starts
with, run through the trunk once at batch 1 by `prefill_shared_prefix`, llama/prefix.py's
primitive): its keys and values are broadcast into slots 0..P-1 of every row and only each row's
suffix is run, right-padded after it (`inputs.pad_suffixes`: positions P.., cache lengths
P + n_b). The drafter still consumes the whole prompt: the prefix's hidden states and tokens
(broadcast) followed by the suffix's, exactly what it reads from a right-padded whole prompt.
A row whose verify logits hold a NaN or Inf (broken weights or inputs) is flagged
(`nonfinite`, one `isfinite` reduction per step) and stopped; the engine raises naming it.
Every step emits >= 1 token per active row, and the tokens are the trunk's own argmax, so the
output is greedy decoding's (in float32, up to argmax ties). Greedy decoding *is* this step with
W = 1 and `NoDrafter`: no drafts, verify = one trunk call on `next_token`, emit its argmax.
W is fixed (a static int), or chosen per step (`AutoWidth`, decoding/width.py: the W of the best
expected tokens per measured step cost, from the pooled per-offset acceptance so far; buffers
and cache slots sized for W_max; `run` at one W returns when the choice changes). Each step
logs its W per row (`width_log`) and updates the pooled statistics (`width_stats`) either way.

A drafter is a hashable `Drafter` (static under jit) plus a pytree of arrays (`drafter_vars`)
passed to each call; see `NoDrafter` here, `HeadDrafter` (decoding/heads.py), `LookupDrafter`
(decoding/lookup.py) and the bounding drafters in decoding/oracle.py. Drafters keep per-row data
in their state (batch axis first), never in their variables, so continuous batching can refill a
row (the oracle's per-row references are the one exception: static batches only).

Rows never see each other: each has its own cache row, lengths, RoPE positions, drafter state
and log column indexed by the row's own step count (`row_steps`), so rows may start at different
loop iterations (continuous batching).

Letters: B batch (slots), R rows refilled at once, P padded prompt length, S cache slots,
W tokens per verify step (the trunk's next token + W-1 drafts; W = 1: greedy), M max new tokens,
D width, V vocab. K is kept for kv heads (llama/kv_cache.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from gptk_jax.decoding.acceptance import accept_step, accepted_length
from gptk_jax.decoding.inputs import PromptBatch, is_stop
from gptk_jax.decoding.width import (AutoWidth, WidthStats, init_width_stats, max_width,
                                     drafts_may_be_verified, step_width, update_width_stats)
from gptk_jax.kernels.argmax import first_argmax
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.kv_cache import KVCache, write_rows
from gptk_jax.llama.model import Llama


# --------------------------------------------------------------------------------------------
# Drafters
# --------------------------------------------------------------------------------------------

class Drafter:
    """What the loop needs from a drafter. Subclasses are frozen dataclasses (hashable: they are
    static under jit); every array they need lives in `variables`, an argument of each call.

    State is whatever pytree the drafter carries between steps (fixed shapes); `advance` consumes
    trunk positions that became part of the sequence (the prompt, then accepted positions only),
    so a recurrent drafter never re-reads the prefix, and a lookup drafter sees every token once.
    """
    max_drafts: int  # W-1 at most
    branches = 1     # drafts per offset verified together (decoding/tree.py: 2)

    def init_state(self, variables: Any, batch_size: int, capacity: int,
                   max_new_tokens: Optional[int] = None) -> Any:
        """capacity: the most positions a row's sequence can hold (the cache's slots);
        max_new_tokens: the most tokens a row emits (a drafter that keeps only its last
        prompt positions, eagle, sizes its own cache by it; None: unknown)."""
        return ()

    def advance(self, variables: Any, state: Any, hidden_normed: jax.Array,
                advance_mask: jax.Array, tokens: jax.Array) -> Any:
        """hidden_normed [B,T,D]; advance_mask [B,T] bool (False: not part of the sequence);
        tokens [B,T] int32 at those positions."""
        return state

    def draft(self, variables: Any, state: Any, last_hidden: jax.Array,
              last_hidden_normed: jax.Array, last_position: jax.Array,
              next_token: jax.Array) -> jax.Array:
        """last_hidden(_normed) [B,D], last_position [B], next_token [B] -> [B, >=W-1] int32."""
        raise NotImplementedError

    def draft_scored(self, variables: Any, state: Any, last_hidden: jax.Array,
                     last_hidden_normed: jax.Array, last_position: jax.Array,
                     next_token: jax.Array) -> tuple[jax.Array, Any]:
        """(drafts as `draft`, scores [B, same] float32 in [0, 1]: how sure the drafter is of
        each, higher = likelier accepted; or None: no scores). Auto W calibrates the scores
        against what verification accepts (decoding/width.py), so they need only rank."""
        return self.draft(variables, state, last_hidden, last_hidden_normed, last_position,
                          next_token), None


@dataclasses.dataclass(frozen=True)
class NoDrafter(Drafter):
    """No drafts: with W = 1 the step is a greedy step (the trunk's token, nothing to verify)."""
    max_drafts: int = 0

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        return jnp.zeros((next_token.shape[0], 0), jnp.int32)


# --------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------

def greedy_pick(logits: jax.Array) -> jax.Array:
    """The strategy: logits [..., V] -> tokens [...] int32 (jnp.argmax's tokens, by two
    vectorised reductions: kernels/argmax.py)."""
    return first_argmax(logits)


@flax.struct.dataclass
class Prefilled:
    cache: KVCache              # lengths = PromptBatch.cache_lengths
    logits: jax.Array           # [B,V] float32 at each row's last real prompt token
    hidden: jax.Array           # [B,D] trunk hidden there (before the final norm)
    hidden_normed: jax.Array    # [B,D] after the final norm
    next_positions: jax.Array   # [B] int32 RoPE position of the first generated token
    prompt_hidden_normed: jax.Array  # [B,P,D] at every prompt position (drafters consume it)


@flax.struct.dataclass
class SharedPrefix:
    """Prompt tokens every row starts with, run through the trunk once at batch 1."""
    tokens: jax.Array          # [1,P] int32
    k: tuple                   # L x [1,K,P,H]
    v: tuple                   # L x [1,K,P,H]
    hidden_normed: jax.Array   # [1,P,D] after the final norm (drafters consume it)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def prefill_shared_prefix(config: LlamaConfig, params: dict, tokens: jax.Array) -> SharedPrefix:
    """tokens [1,P] -> their keys, values and hidden states (positions 0..P-1, no logits)."""
    p = tokens.shape[1]
    positions = jnp.arange(p, dtype=jnp.int32)[None]                          # [1,P]
    out = Llama(config).apply({"params": params}, tokens, positions,
                              cache=KVCache.init(config, 1, p), compute_logits=False)
    return SharedPrefix(tokens=jnp.asarray(tokens, jnp.int32), k=out.cache.k, v=out.cache.v,
                        hidden_normed=out.hidden_normed)


def _rows(x: jax.Array, batch: int) -> jax.Array:
    """A batch-1 array repeated over `batch` rows."""
    return jnp.broadcast_to(x, (batch,) + x.shape[1:])


def prefix_cache(config: LlamaConfig, batch: int, slots: int, prefix: SharedPrefix) -> KVCache:
    """A fresh cache [B,...,S] whose slots 0..P-1 hold the prefix in every row (lengths P)."""
    cache = KVCache.init(config, batch, slots)
    p = prefix.length
    put = lambda buf, x: buf.at[:, :, :p].set(_rows(x, batch).astype(buf.dtype))
    return KVCache(k=tuple(map(put, cache.k, prefix.k)), v=tuple(map(put, cache.v, prefix.v)),
                   valid=cache.valid.at[:, :p].set(True),
                   lengths=jnp.full((batch,), p, jnp.int32))


def prefill(config: LlamaConfig, params: dict, prompts: PromptBatch, slots: int,
            prefix: SharedPrefix | None = None) -> Prefilled:
    """One trunk call over the padded prompts into a fresh cache of `slots` slots; with a
    prefix, over the suffixes (`inputs.pad_suffixes`) after the prefix's broadcast cache, and
    `prompt_hidden_normed` [B,P+T,D] is the prefix's followed by the suffixes'."""
    batch = prompts.tokens.shape[0]
    cache = (KVCache.init(config, batch, slots) if prefix is None
             else prefix_cache(config, batch, slots, prefix))
    out = Llama(config).apply({"params": params}, prompts.tokens, prompts.positions, cache=cache,
                              token_mask=prompts.token_mask, logits_index=prompts.last_index)
    at_last = lambda x: jnp.take_along_axis(x, prompts.last_index[:, None, None], axis=1)[:, 0]
    prompt_hidden_normed = out.hidden_normed
    if prefix is not None:
        prompt_hidden_normed = jnp.concatenate(
            [_rows(prefix.hidden_normed, batch).astype(out.hidden_normed.dtype),
             out.hidden_normed], axis=1)
    return Prefilled(cache=out.cache.replace(lengths=jnp.asarray(prompts.cache_lengths)),
                     logits=out.logits[:, 0], hidden=at_last(out.hidden),
                     hidden_normed=at_last(out.hidden_normed),
                     next_positions=jnp.asarray(prompts.prompt_lengths, jnp.int32),
                     prompt_hidden_normed=prompt_hidden_normed)


# --------------------------------------------------------------------------------------------
# Loop state, its start, the step, the loop
# --------------------------------------------------------------------------------------------

@flax.struct.dataclass
class DecodeState:
    cache: KVCache               # holds every emitted token but the last (`next_token`)
    tokens: jax.Array            # [B,M+W] int32 output buffer; valid up to num_generated
    next_token: jax.Array        # [B] int32 trunk argmax after the last cached position (emitted)
    positions: jax.Array         # [B] int32 RoPE position of next_token
    last_hidden: jax.Array       # [B,D] trunk hidden at the last cached position
    last_hidden_normed: jax.Array  # [B,D] same, after the final norm
    drafter_state: Any
    drafts: jax.Array            # [B,W_max-1] int32 the next step's drafts (offsets 2..W_max)
    draft_scores: Any            # [B,W_max-1] float32 their scores, or None (unscored drafter)
    num_generated: jax.Array     # [B] int32 tokens emitted per row (a stop token included)
    done: jax.Array              # [B] bool
    step: jax.Array              # [] int32 verify steps run (loop iterations)
    row_steps: jax.Array         # [B] int32 verify steps each row took part in
    accepted_log: jax.Array      # [M,B] int32 drafts accepted at a row's i-th step (-1: none)
    emitted_log: jax.Array       # [M,B] int32 tokens emitted at a row's i-th step (-1: none)
    width_log: jax.Array         # [M,B] int32 W of a row's i-th step (-1: none)
    nonfinite: jax.Array         # [B] bool: the trunk gave a NaN/Inf logit (the row is stopped)
    width_stats: WidthStats      # pooled per-offset acceptance, W histogram (decoding/width.py)

    @property
    def max_new_tokens(self) -> int:
        return self.accepted_log.shape[0]


def next_drafts(drafter: Drafter, drafter_vars: Any, w_max: int, drafter_state: Any,
                last_hidden: jax.Array, last_hidden_normed: jax.Array, positions: jax.Array,
                next_token: jax.Array) -> tuple[jax.Array, Any]:
    """The drafts of a row's next step from its state -> ([B,W_max-1] int32, scores or None)."""
    drafts, scores = drafter.draft_scored(drafter_vars, drafter_state, last_hidden,
                                          last_hidden_normed, positions - 1, next_token)
    n = drafter.branches * (w_max - 1)     # a tree drafter: each branch's, one after another
    drafts = drafts[:, :n].astype(jnp.int32)
    if scores is not None:
        scores = jnp.clip(scores[:, :n].astype(jnp.float32), 0.0, 1.0)
    return drafts, scores


def cache_slots(padded_length: int, max_new_tokens: int,
                tokens_per_step: int | AutoWidth = 1) -> int:
    """Slots a batch needs: an active row holds at most P + M - 2 slots (the last token is never
    fed back) and a verify step writes W more (auto W: W_max); finished rows stop growing."""
    return padded_length + max(max_new_tokens - 1, 0) + max_width(tokens_per_step) - 1


def prefill_state(config: LlamaConfig, drafter: Drafter, tokens_per_step: int | AutoWidth,
                  max_new_tokens: int, slots: int, params: dict, drafter_vars: Any,
                  prompts: PromptBatch, stop_ids: jax.Array, pad_id: jax.Array,
                  prefix: SharedPrefix | None = None) -> DecodeState:
    """The prefill, then the first token (the trunk's argmax, exact); the drafter consumes every
    real prompt position; inactive (filler) rows start done. `slots`: cache slots (a static
    batch: `cache_slots` of its prompts; continuous batching: its shared cache's).
    tokens_per_step: W, or an `AutoWidth` (buffers sized for its max_width). prefix: a
    `SharedPrefix` every row starts with; prompts then hold the suffixes (`inputs.pad_suffixes`)."""
    w, m = max_width(tokens_per_step), max_new_tokens
    batch = prompts.tokens.shape[0]
    pre = prefill(config, params, prompts, slots, prefix)
    active = jnp.asarray(prompts.active)
    first = jnp.where(active, greedy_pick(pre.logits), pad_id)
    nonfinite = active & ~jnp.all(jnp.isfinite(pre.logits), axis=-1)
    tokens, mask = jnp.asarray(prompts.tokens), jnp.asarray(prompts.token_mask)
    if prefix is not None:   # the drafter reads the whole prompt: prefix, then suffix
        tokens = jnp.concatenate([_rows(prefix.tokens, batch), tokens], axis=1)
        mask = jnp.concatenate([jnp.ones((batch, prefix.length), bool), mask], axis=1)
    drafter_state = drafter.init_state(drafter_vars, batch, slots, max_new_tokens=m)
    drafter_state = drafter.advance(drafter_vars, drafter_state, pre.prompt_hidden_normed,
                                    mask & active[:, None], tokens)
    drafts, scores = next_drafts(drafter, drafter_vars, w, drafter_state, pre.hidden,
                                 pre.hidden_normed, pre.next_positions, first)
    no_log = jnp.full((m, batch), -1, jnp.int32)
    return DecodeState(
        cache=pre.cache, tokens=jnp.full((batch, m + w), pad_id, jnp.int32).at[:, 0].set(first),
        next_token=first, positions=pre.next_positions, last_hidden=pre.hidden,
        last_hidden_normed=pre.hidden_normed, drafter_state=drafter_state, drafts=drafts,
        draft_scores=scores, num_generated=active.astype(jnp.int32),
        done=~active | is_stop(first, stop_ids) | (m <= 1) | nonfinite,
        step=jnp.array(0, jnp.int32), row_steps=jnp.zeros((batch,), jnp.int32),
        accepted_log=no_log, emitted_log=no_log, width_log=no_log, nonfinite=nonfinite,
        width_stats=init_width_stats(tokens_per_step))


def decode_step(config: LlamaConfig, drafter: Drafter, tokens_per_step: int | AutoWidth,
                params: dict, drafter_vars: Any, state: DecodeState, stop_ids: jax.Array
                ) -> DecodeState:
    """Draft, verify with one trunk call over W tokens, accept, roll back (see module doc); then
    the pooled width statistics and the next step's W (auto W: chosen, decoding/width.py).
    tokens_per_step: a fixed W, or an `AutoWidth` whose `width` is the W this step runs at."""
    w = step_width(tokens_per_step)
    draft = None       # auto W at W = 1: draft only if the next step may verify drafts
    if isinstance(tokens_per_step, AutoWidth) and w == 1 and tokens_per_step.costs:
        draft = drafts_may_be_verified(tokens_per_step, state.width_stats, ~state.done)
    new, accepted, beyond = _step_at(config, drafter, w, state, params=params,
                                     drafter_vars=drafter_vars, stop_ids=stop_ids, draft=draft)
    return new.replace(width_stats=update_width_stats(
        tokens_per_step, state.width_stats, w, accepted, ~state.done, state.draft_scores,
        new.draft_scores, ~new.done, drafted=draft, accepted_beyond=beyond))


@flax.struct.dataclass
class Verified:
    """One verify call, seen as one chain of W tokens (a tree: its best branch per row)."""
    drafts: jax.Array         # [B,W-1] int32 the chain's drafts
    tokens: jax.Array         # [B,W] int32 next_token, then the drafts
    trunk_tokens: jax.Array   # [B,W] int32 the trunk's argmax after each
    hidden: jax.Array         # [B,W,D]
    hidden_normed: jax.Array  # [B,W,D]
    cache: KVCache            # the chain's keys at slots lengths .. lengths+W-1
    nonfinite: jax.Array      # [B] bool: a NaN/Inf logit


def verify_chain(config: LlamaConfig, w: int, state: DecodeState, params: dict) -> Verified:
    """The trunk over next_token and the first W-1 drafts, in one call."""
    drafts = state.drafts[:, :w - 1]                                          # [B,W-1]
    tokens = jnp.concatenate([state.next_token[:, None], drafts], axis=1)     # [B,W]
    positions = state.positions[:, None] + jnp.arange(w, dtype=jnp.int32)     # [B,W]
    out = Llama(config).apply({"params": params}, tokens, positions, cache=state.cache)
    return Verified(drafts=drafts, tokens=tokens, trunk_tokens=greedy_pick(out.logits),
                    hidden=out.hidden, hidden_normed=out.hidden_normed, cache=out.cache,
                    nonfinite=~jnp.all(jnp.isfinite(out.logits), axis=(1, 2)))


def _step_at(config: LlamaConfig, drafter: Drafter, w: int, state: DecodeState, *,
             params: dict, drafter_vars: Any, stop_ids: jax.Array,
             draft: Optional[jax.Array] = None
             ) -> tuple[DecodeState, jax.Array, Optional[jax.Array]]:
    """The step at W = w (<= the state's buffer width) -> (state but width_stats, drafts
    accepted per row [B] before the stop / limit cut, and [B] the same counting one draft more:
    the draft after the verified ones against the bonus token, which is what a step at W + 1
    would have accepted (None: a tree, or no draft beyond W)). draft: [] bool, make the next step's
    drafts (None: always); where False the old drafts stay, unread (the next step runs at
    W = 1: width.drafts_may_be_verified), and the drafter's work is skipped."""
    active = ~state.done
    if drafter.branches > 1:    # several drafts per offset: the best branch (decoding/tree.py)
        from gptk_jax.decoding.tree import verify_tree
        out = verify_tree(config, w, state, params, drafter.branch_drafts)
    else:
        out = verify_chain(config, w, state, params)
    drafts, verify_tokens, trunk_tokens = out.drafts, out.tokens, out.trunk_tokens
    nonfinite = active & out.nonfinite                                        # [B]
    acc = accept_step(drafts, trunk_tokens, state.num_generated, active,
                      max_new_tokens=state.max_new_tokens, stop_ids=stop_ids)
    beyond = None
    if drafter.branches == 1 and w <= state.drafts.shape[1]:
        beyond = accepted_length(state.drafts[:, :w], trunk_tokens)             # [B] <= w

    # Positions now part of the sequence: next_token and the accepted drafts, for rows that go on
    # (a finished row's cache and drafter state are never read again).
    going_on = active & ~acc.finished
    kept = (jnp.arange(w)[None, :] <= acc.accepted[:, None]) & going_on[:, None]  # [B,W]
    num_kept = kept.sum(axis=1).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, acc.accepted[:, None, None], axis=1)[:, 0]
    keep_old = lambda new, old: jnp.where(going_on.reshape((-1,) + (1,) * (old.ndim - 1)),
                                          new, old)
    # A row's i-th verify step goes to row i of its log column (rows may start at different loop
    # iterations: continuous batching); finished rows write nowhere (index M: dropped).
    log_at = jnp.where(active, state.row_steps, state.max_new_tokens)
    log = lambda buf, x: buf.at[log_at, jnp.arange(buf.shape[1])].set(x, mode="drop")
    new = DecodeState(
        cache=out.cache.replace(lengths=state.cache.lengths + num_kept),
        tokens=write_rows(state.tokens, trunk_tokens, state.num_generated),
        next_token=keep_old(jnp.take_along_axis(trunk_tokens, acc.accepted[:, None], 1)[:, 0],
                            state.next_token),
        positions=state.positions + num_kept,
        last_hidden=keep_old(take(out.hidden), state.last_hidden),
        last_hidden_normed=keep_old(take(out.hidden_normed), state.last_hidden_normed),
        drafter_state=drafter.advance(drafter_vars, state.drafter_state, out.hidden_normed, kept,
                                      verify_tokens),
        drafts=state.drafts, draft_scores=state.draft_scores,
        num_generated=state.num_generated + acc.emitted,
        done=state.done | acc.finished | nonfinite,
        step=state.step + 1,
        row_steps=state.row_steps + active.astype(jnp.int32),
        accepted_log=log(state.accepted_log, acc.accepted),
        emitted_log=log(state.emitted_log, acc.emitted),
        width_log=log(state.width_log, jnp.full_like(acc.accepted, w)),
        nonfinite=state.nonfinite | nonfinite,
        width_stats=state.width_stats)
    return _with_next_drafts(drafter, drafter_vars, state, new, draft), acc.accepted, beyond


def _with_next_drafts(drafter: Drafter, drafter_vars: Any, state: DecodeState,
                      new: DecodeState, draft: Optional[jax.Array]) -> DecodeState:
    """new with the next step's drafts and scores: made from new's state, or (draft [] bool
    False) the old ones kept, unread, the drafter's work skipped."""
    make = lambda: next_drafts(drafter, drafter_vars,
                               state.drafts.shape[1] // drafter.branches + 1,
                               new.drafter_state, new.last_hidden,
                               new.last_hidden_normed, new.positions, new.next_token)
    if draft is None:
        next_d, next_scores = make()
    else:
        next_d, next_scores = jax.lax.cond(draft, make,
                                           lambda: (state.drafts, state.draft_scores))
    return new.replace(drafts=next_d, draft_scores=next_scores)


def run(config: LlamaConfig, drafter: Drafter, tokens_per_step: int | AutoWidth, params: dict,
        drafter_vars: Any, state: DecodeState, stop_ids: jax.Array, stop_at_first: jax.Array
        ) -> DecodeState:
    """Steps until every row is done, or (stop_at_first, a [] bool: continuous batching with
    prompts still queued) until some row is; no host round-trip. Each active row emits >= 1
    token per step and stops at M, so this ends. Auto W: the steps run at `tokens_per_step.width`
    and the loop also ends as soon as the choice for the next step (`width_stats.next_width`)
    differs; the host then runs the executable of that W (engine.py: a W change costs one host
    round trip and no copy of the cache, which a `lax.switch` over the W's would cost)."""
    w = step_width(tokens_per_step)

    def cond(s):
        going = jnp.where(stop_at_first, ~jnp.any(s.done), ~jnp.all(s.done))
        return going & (s.width_stats.next_width == w)

    def body(s):
        return decode_step(config, drafter, tokens_per_step, params, drafter_vars, s,
                           stop_ids)

    return jax.lax.while_loop(cond, body, state)


def refill(config: LlamaConfig, drafter: Drafter, tokens_per_step: int | AutoWidth,
           max_new_tokens: int,
           slots: int, params: dict, drafter_vars: Any, state: DecodeState,
           prompts: PromptBatch, rows: jax.Array, stop_ids: jax.Array, pad_id: jax.Array,
           prefix: SharedPrefix | None = None) -> DecodeState:
    """Prefills prompts [R,P] and puts them in slots rows [R] of state (row index >= B: a filler
    row, dropped). Everything per row is replaced: cache row (keys, values, `valid`), output
    buffer, next token, positions, hidden states, drafter state, counters, logs; the batch's
    pooled width statistics (auto W) go on. prefix: as in `prefill_state`."""
    new = prefill_state(config, drafter, tokens_per_step, max_new_tokens, slots, params,
                        drafter_vars, prompts, stop_ids, pad_id, prefix)
    put = lambda big, small: big.at[rows].set(small, mode="drop")          # batch axis 0
    put1 = lambda big, small: big.at[:, rows].set(small, mode="drop")      # batch axis 1
    cache = KVCache(k=jax.tree.map(put, state.cache.k, new.cache.k),
                    v=jax.tree.map(put, state.cache.v, new.cache.v),
                    valid=put(state.cache.valid, new.cache.valid),
                    lengths=put(state.cache.lengths, new.cache.lengths))
    return state.replace(
        cache=cache, tokens=put(state.tokens, new.tokens),
        next_token=put(state.next_token, new.next_token),
        positions=put(state.positions, new.positions),
        last_hidden=put(state.last_hidden, new.last_hidden),
        last_hidden_normed=put(state.last_hidden_normed, new.last_hidden_normed),
        drafter_state=jax.tree.map(put, state.drafter_state, new.drafter_state),
        drafts=put(state.drafts, new.drafts),
        draft_scores=jax.tree.map(put, state.draft_scores, new.draft_scores),
        num_generated=put(state.num_generated, new.num_generated),
        done=put(state.done, new.done), row_steps=put(state.row_steps, new.row_steps),
        accepted_log=put1(state.accepted_log, new.accepted_log),
        emitted_log=put1(state.emitted_log, new.emitted_log),
        width_log=put1(state.width_log, new.width_log),
        nonfinite=put(state.nonfinite, new.nonfinite))
