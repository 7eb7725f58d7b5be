"""Self-speculative (blockwise parallel) decoding: a jitted `lax.while_loop` over a small state.

    prompt ids --greedy.pad_prompts--> PromptBatch
      --prefill_state: one trunk call; first token = trunk argmax; drafter consumes the prompt-->
    MTPState --mtp_loop: lax.while_loop of mtp_step--> MTPState --> MTPResult (lists, stats)

One `mtp_step`, for every row at once (finished rows run along, frozen):
  1. draft: the drafter proposes K-1 tokens (offsets 2..K) from the trunk's hidden state at the
     last accepted position and the trunk's exact next token (offset 1), from its own state;
  2. verify: one trunk call over `[next_token, drafts]` (T=K) at the row's next K positions,
     writing cache slots `lengths .. lengths+K-1`;
  3. accept (acceptance.accept_step): the longest draft prefix equal to the trunk's argmax, plus
     the trunk's token after it (bonus); cut after a stop id or at the token limit;
  4. roll back logically: `lengths = old + 1 + accepted` (rejected slots are overwritten by the
     next write and never attended before, see kv_cache.py); the drafter advances over the
     accepted positions only; the bonus token is the next step's `next_token`.
Every step emits >= 1 token per active row, and the tokens are the trunk's own argmax, so the
output is greedy decoding's (in float32, up to argmax ties).

A drafter is a hashable `Drafter` (static under jit) plus a pytree of arrays (`drafter_vars`)
passed to each call; see `HeadDrafter` here, `LookupDrafter` (prompt lookup, optionally in
front of another drafter) in decoding/lookup.py, and the bounding drafters in decoding/oracle.py.

Letters: B batch, P padded prompt length, S cache slots, K tokens per verify step, M max new
tokens, R verify steps, D width, V vocab.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding.acceptance import accept_step, is_stop, summarize
from gptk_jax.decoding.greedy import (DEFAULT_BUCKET, GenerationResult, PromptBatch, _compiled,
                                      cache_slots, device_params, greedy_pick, pad_prompts,
                                      stop_id_array)
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
    max_drafts: int  # K-1 at most

    def init_state(self, variables: Any, batch_size: int, capacity: int) -> Any:
        """capacity: the most positions a row's sequence can hold (the cache's slots)."""
        return ()

    def advance(self, variables: Any, state: Any, hidden_normed: jax.Array,
                advance_mask: jax.Array, tokens: jax.Array) -> Any:
        """hidden_normed [B,T,D]; advance_mask [B,T] bool (False: not part of the sequence);
        tokens [B,T] int32 at those positions."""
        return state

    def draft(self, variables: Any, state: Any, last_hidden: jax.Array,
              last_hidden_normed: jax.Array, last_position: jax.Array,
              next_token: jax.Array) -> jax.Array:
        """last_hidden(_normed) [B,D], last_position [B], next_token [B] -> [B, >=K-1] int32."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class HeadDrafter(Drafter):
    """Trained MTP heads (gptk_jax.heads) as a drafter; variables = {"head": …, "trunk": …}."""
    head: Any        # flax.linen Module from gptk_jax.heads.make_head
    max_drafts: int  # head_config.k - 1

    @staticmethod
    def variables(head_params: Any, trunk_params: Any) -> dict:
        return {"head": head_params, "trunk": trunk_params}

    def _apply(self, variables, method, *args):
        return self.head.apply({"params": variables["head"]}, variables["trunk"], *args,
                               method=method)

    def init_state(self, variables, batch_size, capacity):
        return self._apply(variables, "init_state", batch_size)

    def advance(self, variables, state, hidden_normed, advance_mask, tokens):
        return self._apply(variables, "advance", state, hidden_normed, advance_mask)

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        return self._apply(variables, "draft", state, last_hidden, last_hidden_normed,
                           last_position, next_token)


# --------------------------------------------------------------------------------------------
# Loop state, prefill, step, loop (pure functions; jitted by the facade)
# --------------------------------------------------------------------------------------------

@flax.struct.dataclass
class MTPState:
    cache: KVCache               # holds every emitted token but the last (`next_token`)
    tokens: jax.Array            # [B,M+K] int32 output buffer; valid up to num_generated
    next_token: jax.Array        # [B] int32 trunk argmax after the last cached position (emitted)
    positions: jax.Array         # [B] int32 RoPE position of next_token
    last_hidden: jax.Array       # [B,D] trunk hidden at the last cached position
    last_hidden_normed: jax.Array  # [B,D] same, after the final norm
    drafter_state: Any
    num_generated: jax.Array     # [B] int32 tokens emitted per row (a stop token included)
    done: jax.Array              # [B] bool
    step: jax.Array              # [] int32 verify steps run (loop iterations)
    row_steps: jax.Array         # [B] int32 verify steps each row took part in
    accepted_log: jax.Array      # [M,B] int32 drafts accepted at a row's i-th step (-1: none)
    emitted_log: jax.Array       # [M,B] int32 tokens emitted at a row's i-th step (-1: none)

    @property
    def max_new_tokens(self) -> int:
        return self.accepted_log.shape[0]


def mtp_cache_slots(padded_length: int, max_new_tokens: int, num_tokens_per_step: int) -> int:
    """An active row holds at most P + M - 2 slots and writes K more; finished rows stop growing."""
    return cache_slots(padded_length, max_new_tokens) + num_tokens_per_step - 1


def prefill_state(config: LlamaConfig, drafter: Drafter, num_tokens_per_step: int,
                  max_new_tokens: int, params: dict, drafter_vars: Any, prompts: PromptBatch,
                  stop_ids: jax.Array, pad_id: jax.Array, slots: Optional[int] = None
                  ) -> MTPState:
    """One trunk call over the prompts; the first token is the trunk's argmax (exact), and the
    drafter consumes every real prompt position. `slots`: cache slots (default: what these
    prompts need, `mtp_cache_slots`; continuous batching passes its shared cache's)."""
    k, m = num_tokens_per_step, max_new_tokens
    batch, width = prompts.tokens.shape
    slots = slots or mtp_cache_slots(width, m, k)
    cache = KVCache.init(config, batch, slots)
    out = Llama(config).apply({"params": params}, prompts.tokens, prompts.positions, cache=cache,
                              token_mask=prompts.token_mask, logits_index=prompts.last_index)
    at_last = lambda x: jnp.take_along_axis(x, prompts.last_index[:, None, None], axis=1)[:, 0]
    active = jnp.asarray(prompts.active)
    first = jnp.where(active, greedy_pick(out.logits[:, 0]), pad_id)
    drafter_state = drafter.init_state(drafter_vars, batch, slots)
    drafter_state = drafter.advance(drafter_vars, drafter_state, out.hidden_normed,
                                    prompts.token_mask & active[:, None], prompts.tokens)
    no_log = jnp.full((m, batch), -1, jnp.int32)
    return MTPState(
        cache=out.cache.replace(lengths=jnp.asarray(prompts.cache_lengths)),
        tokens=jnp.full((batch, m + k), pad_id, jnp.int32).at[:, 0].set(first),
        next_token=first, positions=jnp.asarray(prompts.prompt_lengths, jnp.int32),
        last_hidden=at_last(out.hidden), last_hidden_normed=at_last(out.hidden_normed),
        drafter_state=drafter_state, num_generated=active.astype(jnp.int32),
        done=~active | is_stop(first, stop_ids) | (m <= 1), step=jnp.array(0, jnp.int32),
        row_steps=jnp.zeros((batch,), jnp.int32), accepted_log=no_log, emitted_log=no_log)


def mtp_step(config: LlamaConfig, drafter: Drafter, num_tokens_per_step: int, params: dict,
             drafter_vars: Any, state: MTPState, stop_ids: jax.Array) -> MTPState:
    """Draft, verify with one trunk call over K tokens, accept, roll back (see module doc)."""
    k = num_tokens_per_step
    active = ~state.done
    drafts = drafter.draft(drafter_vars, state.drafter_state, state.last_hidden,
                           state.last_hidden_normed, state.positions - 1, state.next_token)
    drafts = drafts[:, :k - 1].astype(jnp.int32)                              # [B,K-1]
    verify_tokens = jnp.concatenate([state.next_token[:, None], drafts], axis=1)  # [B,K]
    verify_positions = state.positions[:, None] + jnp.arange(k, dtype=jnp.int32)  # [B,K]
    out = Llama(config).apply({"params": params}, verify_tokens, verify_positions,
                              cache=state.cache)
    trunk_tokens = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)          # [B,K]
    acc = accept_step(drafts, trunk_tokens, state.num_generated, active,
                      max_new_tokens=state.max_new_tokens, stop_ids=stop_ids)

    # Positions now part of the sequence: next_token and the accepted drafts, for rows that go on
    # (a finished row's cache and drafter state are never read again).
    going_on = active & ~acc.finished
    kept = (jnp.arange(k)[None, :] <= acc.accepted[:, None]) & going_on[:, None]  # [B,K]
    num_kept = kept.sum(axis=1).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, acc.accepted[:, None, None], axis=1)[:, 0]
    keep_old = lambda new, old: jnp.where(going_on.reshape((-1,) + (1,) * (old.ndim - 1)),
                                          new, old)
    # A row's i-th verify step goes to row i of its log column (rows may start at different loop
    # iterations: continuous batching); finished rows write nowhere (index M: dropped).
    log_at = jnp.where(active, state.row_steps, state.max_new_tokens)
    log = lambda buf, x: buf.at[log_at, jnp.arange(buf.shape[1])].set(x, mode="drop")
    return MTPState(
        cache=out.cache.replace(lengths=state.cache.lengths + num_kept),
        tokens=write_rows(state.tokens, trunk_tokens, state.num_generated),
        next_token=keep_old(jnp.take_along_axis(trunk_tokens, acc.accepted[:, None], 1)[:, 0],
                            state.next_token),
        positions=state.positions + num_kept,
        last_hidden=keep_old(take(out.hidden), state.last_hidden),
        last_hidden_normed=keep_old(take(out.hidden_normed), state.last_hidden_normed),
        drafter_state=drafter.advance(drafter_vars, state.drafter_state, out.hidden_normed, kept,
                                      verify_tokens),
        num_generated=state.num_generated + acc.emitted,
        done=state.done | acc.finished,
        step=state.step + 1,
        row_steps=state.row_steps + active.astype(jnp.int32),
        accepted_log=log(state.accepted_log, acc.accepted),
        emitted_log=log(state.emitted_log, acc.emitted))


def mtp_loop(config: LlamaConfig, drafter: Drafter, num_tokens_per_step: int, params: dict,
             drafter_vars: Any, state: MTPState, stop_ids: jax.Array,
             pad_id: jax.Array) -> MTPState:
    """Steps until every row is done; no host round-trip. Output past a row's end -> pad_id."""
    cond = lambda s: (s.step < s.max_new_tokens) & ~jnp.all(s.done)
    body = lambda s: mtp_step(config, drafter, num_tokens_per_step, params, drafter_vars, s,
                              stop_ids)
    state = jax.lax.while_loop(cond, body, state)
    columns = jnp.arange(state.tokens.shape[1])[None, :]
    return state.replace(tokens=jnp.where(columns < state.num_generated[:, None], state.tokens,
                                          pad_id))


# --------------------------------------------------------------------------------------------
# Facade
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MTPResult(GenerationResult):
    """GenerationResult (num_steps = 1 prefill + verify steps) plus the acceptance statistics
    of `acceptance.summarize` (τ = tokens per verify step, bonus token included)."""
    num_tokens_per_step: int
    stats: dict
    stop_tokens: list  # the stop id each row ended on (not in `tokens`), None for "length"

    def row_records(self) -> list[dict]:
        """One JSON-able dict per prompt: its tokens, stop reason, verify steps, drafts accepted
        and tokens emitted at each of its steps."""
        s = self.stats
        return [{"tokens": t, "stop_reason": r, "num_generated": n, "verify_steps": steps,
                 "accepted_per_step": acc, "emitted_per_step": emitted}
                for t, r, n, steps, acc, emitted in zip(
                    self.tokens, self.stop_reasons, self.num_generated, s["steps_per_row"],
                    s["accepted_per_row"], s["emitted_per_row"])]


def check_num_tokens_per_step(drafter: Drafter, num_tokens_per_step: int) -> None:
    if not isinstance(num_tokens_per_step, int) or num_tokens_per_step < 2:
        raise ValueError(f"tokens per step K must be an integer >= 2 (1 trunk token + K-1 "
                         f"drafts), got {num_tokens_per_step!r}")
    if num_tokens_per_step - 1 > drafter.max_drafts:
        raise ValueError(f"K={num_tokens_per_step} needs {num_tokens_per_step - 1} drafts per "
                         f"step but the drafter supports at most {drafter.max_drafts} "
                         f"(K <= {drafter.max_drafts + 1})")


def mtp_generate(model_config: LlamaConfig, params: dict, drafter: Drafter, drafter_vars: Any,
                 prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Iterable[int], pad_id: int, *, num_tokens_per_step: int,
                 padding: str = "left", bucket: int = DEFAULT_BUCKET,
                 batch_size: Optional[int] = None) -> MTPResult:
    """Greedy continuation of each prompt (one batch) by draft-and-verify, K tokens per step.

    Same tokens as `greedy.greedy_generate` with the same arguments. `params` in the layout
    `Llama(model_config)` expects (stacked params are converted).
    """
    check_num_tokens_per_step(drafter, num_tokens_per_step)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = device_params(params, model_config)
    drafter_vars = jax.device_put(drafter_vars)   # (see device_params)
    prompts = pad_prompts(prompt_ids, pad_id, padding=padding, bucket=bucket,
                          batch_size=batch_size)
    longest = int(max(len(p) for p in prompt_ids))
    if longest + max_new_tokens + num_tokens_per_step - 1 > model_config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens + "
                         f"{num_tokens_per_step - 1} drafts exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len}")
    stops = stop_id_array(stop_ids)
    pad = np.array(pad_id, np.int32)
    statics = (model_config, drafter, num_tokens_per_step)

    start_exe, compile_a = _compiled(prefill_state, statics + (max_new_tokens,),
                                     (params, drafter_vars, prompts, stops, pad))
    t0 = time.perf_counter()
    state = jax.block_until_ready(start_exe(params, drafter_vars, prompts, stops, pad))
    t1 = time.perf_counter()
    loop_exe, compile_b = _compiled(mtp_loop, statics, (params, drafter_vars, state, stops, pad),
                                    donate=(2,))
    t2 = time.perf_counter()
    state = jax.block_until_ready(loop_exe(params, drafter_vars, state, stops, pad))
    t3 = time.perf_counter()
    return _result(state, prompts, len(prompt_ids), stops, num_tokens_per_step,
                   t1 - t0, t3 - t2, compile_a + compile_b)


def _result(state: MTPState, prompts: PromptBatch, num_prompts: int, stops: np.ndarray,
            k: int, prefill_seconds: float, decode_seconds: float,
            compile_seconds: float) -> MTPResult:
    tokens, counts, accepted_log, emitted_log, steps = jax.device_get(
        (state.tokens, state.num_generated, state.accepted_log, state.emitted_log, state.step))
    stop_set = {int(i) for i in stops if i >= 0}
    out_tokens, reasons, stop_tokens = [], [], []
    for b in range(num_prompts):
        row = [int(t) for t in tokens[b, :counts[b]]]
        stopped = bool(row) and row[-1] in stop_set
        out_tokens.append(row[:-1] if stopped else row)
        reasons.append("stop" if stopped else "length")
        stop_tokens.append(row[-1] if stopped else None)
    steps = int(steps)
    stats = summarize(accepted_log[:steps, :num_prompts], emitted_log[:steps, :num_prompts],
                      num_drafts=k - 1)
    return MTPResult(
        tokens=out_tokens, stop_reasons=reasons,
        num_generated=[int(c) for c in counts[:num_prompts]], num_steps=1 + steps,
        prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
        compile_seconds=compile_seconds, padded_shape=tuple(prompts.tokens.shape),
        num_tokens_per_step=k, stats=stats, stop_tokens=stop_tokens)
