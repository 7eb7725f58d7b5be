"""Continuous batching: B decoding slots serve a queue of prompts, and a slot whose row finished
takes the next prompt at once (iteration-level scheduling: Orca; vLLM's continuous batching), so
a batch no longer runs until its slowest row is done with the other slots idle.

    queue of prompt ids (first come, first served)
      --prefill: the first B prompts--> MTPState [B slots]
      repeat:
        --run (jitted lax.while_loop of mtp.mtp_step): until some row is done (all of them
          once the queue is empty)
        host: harvest the finished rows (tokens, per-row logs); free their slots
        --refill (jitted): prefill the next prompts [R,P] and scatter them into free slots
      --> ContinuousResult (per prompt, in input order)

Greedy decoding is the same loop with K = 1 and `NoDrafter` (one token per step, no drafts), so
greedy and MTP share the scheduler and are compared like for like.

Rows never see each other: each has its own cache row, lengths, RoPE positions, drafter state
and log column, and a refill overwrites all of them for its slot (the cache row with a fresh
one: keys, values, `valid`), so every prompt gets the tokens it gets alone, i.e. greedy
decoding's. The host is visited once per refill, never per step. A refill prefills R rows, R a
power of two (filler rows scatter nowhere), at the bucketed length of its longest prompt, into
the shared cache whose slots fit the longest bucketed prompt of the whole queue; few executables
serve a run, and their compilation is timed apart.

Drafters must keep per-row state only in their state (batch axis first), not in their
variables: HeadDrafter, LookupDrafter, RandomDrafter and RepeatDrafter qualify; OracleDrafter
(per-row references in its variables) does not.

Letters: B slots (batch), N prompts, R rows refilled at once, P padded prompt length, S cache
slots, K tokens per verify step, M max new tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding.acceptance import summarize
from gptk_jax.decoding.greedy import (DEFAULT_BUCKET, _compiled, bucket_length, device_params,
                                      pad_prompts, stop_id_array)
from gptk_jax.decoding.mtp import (Drafter, MTPResult, MTPState, check_num_tokens_per_step,
                                   mtp_cache_slots, mtp_step, prefill_state)
from gptk_jax.llama.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class NoDrafter(Drafter):
    """No drafts: with K = 1 the MTP step is a greedy step (the trunk's token, nothing to verify)."""
    max_drafts: int = 0

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        return jnp.zeros((next_token.shape[0], 0), jnp.int32)


# --------------------------------------------------------------------------------------------
# Jitted pieces: refill (prefill into chosen slots) and run (steps until a slot frees)
# --------------------------------------------------------------------------------------------

def refill(config: LlamaConfig, drafter: Drafter, num_tokens_per_step: int, max_new_tokens: int,
           slots: int, params: dict, drafter_vars: Any, state: MTPState, prompts, rows: jax.Array,
           stop_ids: jax.Array, pad_id: jax.Array) -> MTPState:
    """Prefills prompts [R,P] and puts them in slots rows [R] of state (row index >= B: a filler
    row, dropped). Everything per row is replaced: cache row, output buffer, next token,
    positions, hidden states, drafter state, counters, logs."""
    new = prefill_state(config, drafter, num_tokens_per_step, max_new_tokens, params,
                        drafter_vars, prompts, stop_ids, pad_id, slots=slots)
    put = lambda big, small: big.at[rows].set(small, mode="drop")          # batch axis 0
    put1 = lambda big, small: big.at[:, rows].set(small, mode="drop")      # batch axis 1
    cache = KVCache(k=put1(state.cache.k, new.cache.k), v=put1(state.cache.v, new.cache.v),
                    valid=put(state.cache.valid, new.cache.valid),
                    lengths=put(state.cache.lengths, new.cache.lengths))
    return state.replace(
        cache=cache, tokens=put(state.tokens, new.tokens),
        next_token=put(state.next_token, new.next_token),
        positions=put(state.positions, new.positions),
        last_hidden=put(state.last_hidden, new.last_hidden),
        last_hidden_normed=put(state.last_hidden_normed, new.last_hidden_normed),
        drafter_state=jax.tree.map(put, state.drafter_state, new.drafter_state),
        num_generated=put(state.num_generated, new.num_generated),
        done=put(state.done, new.done), row_steps=put(state.row_steps, new.row_steps),
        accepted_log=put1(state.accepted_log, new.accepted_log),
        emitted_log=put1(state.emitted_log, new.emitted_log))


def prefill(config: LlamaConfig, drafter: Drafter, num_tokens_per_step: int,
            max_new_tokens: int, slots: int, params: dict, drafter_vars: Any, prompts,
            stop_ids: jax.Array, pad_id: jax.Array) -> MTPState:
    """The first B prompts into a cache of `slots` slots (mtp.prefill_state)."""
    return prefill_state(config, drafter, num_tokens_per_step, max_new_tokens, params,
                         drafter_vars, prompts, stop_ids, pad_id, slots=slots)


def run(config: LlamaConfig, drafter: Drafter, num_tokens_per_step: int, params: dict,
        drafter_vars: Any, state: MTPState, stop_ids: jax.Array, stop_at_first: jax.Array
        ) -> MTPState:
    """MTP steps until some row is done (stop_at_first, a [] bool: the queue still has prompts)
    or every row is. Each active row emits >= 1 token per step and stops at M, so this ends."""
    def cond(s):
        return jnp.where(stop_at_first, ~jnp.any(s.done), ~jnp.all(s.done))

    def body(s):
        return mtp_step(config, drafter, num_tokens_per_step, params, drafter_vars, s, stop_ids)

    return jax.lax.while_loop(cond, body, state)


# --------------------------------------------------------------------------------------------
# Facade: the host-side scheduler
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ContinuousResult(MTPResult):
    """MTPResult over the whole queue (per prompt, input order). num_steps = loop iterations
    (trunk calls of the decode loop) + prefill calls; decode_seconds includes the host's
    bookkeeping between loop runs."""
    loop_iterations: int
    prefill_calls: int
    batch_size: int
    loop_seconds: float   # in the jitted decode loop (decode_seconds less the host's share)


def _pow2_at_most(n: int, cap: int) -> int:
    r = 1
    while r < n:
        r *= 2
    return min(r, cap)


def continuous_generate(model_config: LlamaConfig, params: dict,
                        prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                        stop_ids: Iterable[int], pad_id: int, *, batch_size: int,
                        drafter: Optional[Drafter] = None, drafter_vars: Any = (),
                        num_tokens_per_step: int = 1, padding: str = "left",
                        bucket: int = DEFAULT_BUCKET,
                        on_finished: Optional[Callable[[int], None]] = None
                        ) -> ContinuousResult:
    """Greedy continuation of every prompt through `batch_size` continuously refilled slots:
    greedy decoding (drafter None, K = 1) or draft-and-verify with `drafter`, K tokens per step.
    Same tokens per prompt as `greedy.greedy_generate`. `on_finished(n)` is called each time n
    more prompts are done (a progress bar's update)."""
    if drafter is None:
        if num_tokens_per_step != 1:
            raise ValueError(f"without a drafter K must be 1 (greedy), got {num_tokens_per_step}")
        drafter = NoDrafter()
    else:
        check_num_tokens_per_step(drafter, num_tokens_per_step)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not prompt_ids:
        raise ValueError("no prompts given")
    k, m, batch = num_tokens_per_step, max_new_tokens, batch_size
    longest = int(max(len(p) for p in prompt_ids))
    if longest + m + k - 1 > model_config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {m} new tokens + {k - 1} drafts exceeds "
                         f"the model's max_seq_len {model_config.max_seq_len}")
    params = device_params(params, model_config)
    drafter_vars = jax.device_put(drafter_vars)   # (see device_params)
    width = bucket_length(longest, bucket)   # the widest prompt batch
    slots = mtp_cache_slots(width, m, k)
    stops = stop_id_array(stop_ids)
    pad = np.array(pad_id, np.int32)
    statics = (model_config, drafter, k)
    compile_seconds = 0.0

    def timed(fn, fn_statics, args):
        nonlocal compile_seconds
        exe, seconds = _compiled(fn, fn_statics, args, donate=(2,) if fn is not prefill else ())
        compile_seconds += seconds
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        return out, time.perf_counter() - t0

    start = time.perf_counter()
    queue = collections.deque(range(len(prompt_ids)))   # first come, first served
    slot_prompt = [-1] * batch          # prompt index each slot serves, -1: free
    records: dict[int, tuple] = {}      # prompt index -> (tokens, accepted log, emitted log)
    # The first B prompts: one prefill, as a static batch would (filler rows start done).
    first = [queue.popleft() for _ in range(min(batch, len(queue)))]
    prompts = pad_prompts([prompt_ids[i] for i in first], pad_id, padding=padding, bucket=bucket,
                          batch_size=batch)
    state, prefill_seconds = timed(prefill, statics + (m, slots),
                                   (params, drafter_vars, prompts, stops, pad))
    slot_prompt[:len(first)] = first
    prefill_calls, loop_seconds = 1, 0.0
    while True:
        # Decode until a slot frees (or, with the queue empty, until all rows are done).
        state, seconds = timed(run, statics, (params, drafter_vars, state, stops,
                                              np.array(bool(queue))))
        loop_seconds += seconds
        # Harvest the finished rows.
        done, counts, row_steps = jax.device_get((state.done, state.num_generated,
                                                  state.row_steps))
        finished = [b for b in range(batch) if done[b] and slot_prompt[b] >= 0]
        if finished:
            tokens, acc_log, emit_log = jax.device_get(
                (state.tokens, state.accepted_log, state.emitted_log))
            for b in finished:
                records[slot_prompt[b]] = (tokens[b, :counts[b]].tolist(),
                                           acc_log[:row_steps[b], b].tolist(),
                                           emit_log[:row_steps[b], b].tolist())
                slot_prompt[b] = -1
            if on_finished is not None:
                on_finished(len(finished))
        if not queue:
            if all(p < 0 for p in slot_prompt):
                break
            continue
        # Refill the free slots from the queue (R rows, a power of two; fillers dropped).
        free = [b for b in range(batch) if slot_prompt[b] < 0]
        take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
        rows_n = _pow2_at_most(len(take), batch)
        prompts = pad_prompts([prompt_ids[i] for i in take], pad_id, padding=padding,
                              bucket=bucket, batch_size=rows_n)
        rows = np.array(free[:len(take)] + [batch] * (rows_n - len(take)), np.int32)
        state, seconds = timed(refill, statics + (m, slots),
                               (params, drafter_vars, state, prompts, rows, stops, pad))
        prefill_seconds += seconds
        prefill_calls += 1
        for b, i in zip(free, take):
            slot_prompt[b] = i
    wall = time.perf_counter() - start - compile_seconds
    iterations = int(state.step)
    return _result(records, len(prompt_ids), stops, k, batch, prefill_seconds,
                   wall - prefill_seconds, compile_seconds, iterations, prefill_calls, width,
                   loop_seconds)


def _result(records: dict, num_prompts: int, stops: np.ndarray, k: int, batch: int,
            prefill_seconds: float, decode_seconds: float, compile_seconds: float,
            iterations: int, prefill_calls: int, width: int,
            loop_seconds: float) -> ContinuousResult:
    stop_set = {int(i) for i in stops if i >= 0}
    out_tokens, reasons, stop_tokens, counts = [], [], [], []
    longest_log = max([len(records[i][1]) for i in range(num_prompts)] + [1])
    accepted_log = np.full((longest_log, num_prompts), -1, np.int64)
    emitted_log = np.full((longest_log, num_prompts), -1, np.int64)
    for i in range(num_prompts):
        row, accepted, emitted = records[i]
        stopped = bool(row) and row[-1] in stop_set
        out_tokens.append(row[:-1] if stopped else row)
        reasons.append("stop" if stopped else "length")
        stop_tokens.append(row[-1] if stopped else None)
        counts.append(len(row))
        accepted_log[:len(accepted), i] = accepted
        emitted_log[:len(emitted), i] = emitted
    stats = summarize(accepted_log, emitted_log, num_drafts=k - 1)
    return ContinuousResult(
        tokens=out_tokens, stop_reasons=reasons, num_generated=counts,
        num_steps=iterations + prefill_calls, prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds, compile_seconds=compile_seconds,
        padded_shape=(batch, width), num_tokens_per_step=k, stats=stats,
        stop_tokens=stop_tokens, loop_iterations=iterations, prefill_calls=prefill_calls,
        batch_size=batch, loop_seconds=loop_seconds)
