"""Greedy decoding over the explicit KV cache: prompt padding and bucketing, prefill, a jitted
`lax.while_loop` decode, and the facade `greedy_generate` (token ids in, token ids out).

    prompt ids (lists) --pad_prompts--> PromptBatch [B,P]          host, numpy
      --prefill: one trunk call, logits at each row's last real token--> Prefilled
      --init_state: first token per row--> DecodeState
      --decode_loop: lax.while_loop of decode_step, one token per row per step--> DecodeState
      --> GenerationResult (lists per row, timing)

Padding. LEFT: pads first, RoPE positions = cumsum(mask)-1, pad slots stay invalid in the cache;
every row's next slot is P. RIGHT: pads last, positions = arange; after prefill the cache
`lengths` are set to each row's real prompt length, so the first decode step overwrites the first
pad slot (a query never sees slots past its own, see kv_cache.py). Both give the tokens a row gets
alone.

Compilation. Prompt lengths are rounded up to a multiple of `bucket`, and a short last batch is
filled with inactive rows (`batch_size`), so one executable per (batch, prompt bucket,
max_new_tokens, params shapes) serves every call; executables are compiled ahead of time and kept
in a small cache so compile time is reported apart from run time.

Strategy / loop / facade are separate: `greedy_pick` (logits -> token), `decode_step` /
`decode_loop` (pure functions of (params, state)), `greedy_generate` (lists and timing).
`pad_prompts`, `prefill` and `stop_mask` are public for other decoders (decoding/mtp.py).

Letters: B batch, P padded prompt length, S cache slots, M max new tokens, D width, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama, params_for_model

PADDING_MODES = ("left", "right")
DEFAULT_BUCKET = 32
STOP_IDS_MULTIPLE = 8  # stop-id arrays are padded (with -1) to this multiple: fewer recompiles


# --------------------------------------------------------------------------------------------
# Prompts: padding and bucketing (host side)
# --------------------------------------------------------------------------------------------

@flax.struct.dataclass
class PromptBatch:
    """Padded prompts, ready for `prefill` (numpy on the host, traced inside jit)."""
    tokens: Any          # [B,P] int32, pad_id at padding
    token_mask: Any      # [B,P] bool, False at padding
    positions: Any       # [B,P] int32 RoPE positions (left: cumsum(mask)-1; right: arange)
    prompt_lengths: Any  # [B] int32 real prompt lengths
    last_index: Any      # [B] int32 index in P of each row's last real token
    cache_lengths: Any   # [B] int32 cache `lengths` after prefill (left: P; right: prompt length)
    active: Any          # [B] bool, False for filler rows added to reach `batch_size`

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def padded_length(self) -> int:
        return self.tokens.shape[1]


def bucket_length(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket` (bucket <= 1: unchanged)."""
    if bucket <= 1:
        return length
    return -(-length // bucket) * bucket


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int, *, padding: str = "left",
                bucket: int = DEFAULT_BUCKET, batch_size: Optional[int] = None) -> PromptBatch:
    """Pads ragged prompts to [B, bucket_length(max len)], B = batch_size or len(prompt_ids).

    Rows beyond len(prompt_ids) are inactive fillers (one pad token) whose output is discarded.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if not prompt_ids:
        raise ValueError("no prompts given")
    lengths = [len(p) for p in prompt_ids]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one "
                         "token (encode with bos=True)")
    rows = batch_size or len(prompt_ids)
    if rows < len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts do not fit in batch_size {rows}")
    width = bucket_length(max(lengths), bucket)
    lengths = np.array(lengths + [1] * (rows - len(prompt_ids)), np.int32)
    tokens = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), bool)
    for b in range(rows):
        ids = prompt_ids[b] if b < len(prompt_ids) else [pad_id]
        if padding == "left":
            tokens[b, width - len(ids):] = ids
            mask[b, width - len(ids):] = True
        else:
            tokens[b, :len(ids)] = ids
            mask[b, :len(ids)] = True
    if padding == "left":
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        last_index = np.full((rows,), width - 1, np.int32)
        cache_lengths = np.full((rows,), width, np.int32)
    else:
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy()
        last_index = lengths - 1
        cache_lengths = lengths.copy()
    active = np.arange(rows) < len(prompt_ids)
    return PromptBatch(tokens=tokens, token_mask=mask, positions=positions,
                       prompt_lengths=lengths, last_index=last_index.astype(np.int32),
                       cache_lengths=cache_lengths, active=active)


def stop_id_array(stop_ids: Iterable[int]) -> np.ndarray:
    """Stop ids as an int32 array padded with -1 to a multiple of STOP_IDS_MULTIPLE."""
    ids = sorted({int(i) for i in stop_ids})
    size = max(STOP_IDS_MULTIPLE, bucket_length(len(ids), STOP_IDS_MULTIPLE))
    return np.array(ids + [-1] * (size - len(ids)), np.int32)


def stop_mask(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """[B] bool: tokens [B] that are one of stop_ids [n] (-1 entries match nothing)."""
    return (tokens[:, None] == stop_ids[None, :]).any(axis=-1)


# --------------------------------------------------------------------------------------------
# Prefill and the decode loop (pure functions; jitted by the facade)
# --------------------------------------------------------------------------------------------

@flax.struct.dataclass
class Prefilled:
    cache: KVCache            # lengths = PromptBatch.cache_lengths
    logits: jax.Array         # [B,V] float32 at each row's last real prompt token
    hidden: jax.Array         # [B,D] trunk hidden there (before the final norm)
    hidden_normed: jax.Array  # [B,D] after the final norm
    next_positions: jax.Array  # [B] int32 RoPE position of the first generated token


def prefill(config: LlamaConfig, params: dict, prompts: PromptBatch, cache_len: int) -> Prefilled:
    """One trunk call over the padded prompts into a fresh cache of `cache_len` slots."""
    batch = prompts.tokens.shape[0]
    cache = KVCache.init(config, batch, cache_len)
    out = Llama(config).apply({"params": params}, prompts.tokens, prompts.positions, cache=cache,
                              token_mask=prompts.token_mask, logits_index=prompts.last_index)
    at_last = lambda x: jnp.take_along_axis(x, prompts.last_index[:, None, None], axis=1)[:, 0]
    return Prefilled(cache=out.cache.replace(lengths=jnp.asarray(prompts.cache_lengths)),
                     logits=out.logits[:, 0], hidden=at_last(out.hidden),
                     hidden_normed=at_last(out.hidden_normed),
                     next_positions=jnp.asarray(prompts.prompt_lengths, jnp.int32))


def greedy_pick(logits: jax.Array) -> jax.Array:
    """The strategy: logits [B,V] -> tokens [B] int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array         # [B,M] int32 generated tokens, pad_id after a row is done
    last_token: jax.Array     # [B] int32 the token the next step feeds to the trunk
    positions: jax.Array      # [B] int32 its RoPE position
    num_generated: jax.Array  # [B] int32 tokens produced per row (a stop token included)
    done: jax.Array           # [B] bool
    step: jax.Array           # [] int32 tokens emitted per row so far (= next column of tokens)


def init_state(prefilled: Prefilled, active: jax.Array, stop_ids: jax.Array, pad_id: jax.Array,
               max_new_tokens: int, pick: Callable = greedy_pick) -> DecodeState:
    """The first generated token comes from the prefill logits; inactive rows start done."""
    batch = prefilled.logits.shape[0]
    first = jnp.where(active, pick(prefilled.logits), pad_id)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = ~active | stop_mask(first, stop_ids) | (max_new_tokens <= 1)
    return DecodeState(cache=prefilled.cache, tokens=tokens, last_token=first,
                       positions=prefilled.next_positions, num_generated=active.astype(jnp.int32),
                       done=done, step=jnp.array(1, jnp.int32))


def decode_step(config: LlamaConfig, params: dict, state: DecodeState, stop_ids: jax.Array,
                pad_id: jax.Array, pick: Callable = greedy_pick) -> DecodeState:
    """One trunk call on one token per row. Done rows run along (the batch has one shape) but
    emit pad_id and stop counting; their cache writes stay within the slots reserved for them."""
    max_new = state.tokens.shape[1]
    out = Llama(config).apply({"params": params}, state.last_token[:, None],
                              state.positions[:, None], cache=state.cache)
    picked = jnp.where(state.done, pad_id, pick(out.logits[:, 0]))  # [B]
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, picked[:, None], state.step, axis=1)
    done = state.done | stop_mask(picked, stop_ids) | (state.step + 1 >= max_new)
    return DecodeState(cache=out.cache, tokens=tokens, last_token=picked,
                       positions=state.positions + 1,
                       num_generated=state.num_generated + (~state.done).astype(jnp.int32),
                       done=done, step=state.step + 1)


def decode_loop(config: LlamaConfig, params: dict, state: DecodeState, stop_ids: jax.Array,
                pad_id: jax.Array, pick: Callable = greedy_pick) -> DecodeState:
    """Steps until every row is done (a stop id or max_new_tokens); no host round-trip."""
    max_new = state.tokens.shape[1]
    cond = lambda s: (s.step < max_new) & ~jnp.all(s.done)
    body = lambda s: decode_step(config, params, s, stop_ids, pad_id, pick)
    return jax.lax.while_loop(cond, body, state)


def cache_slots(padded_length: int, max_new_tokens: int) -> int:
    """Slots needed: the prompt, then one per decode step (the last token is never fed back)."""
    return padded_length + max(max_new_tokens - 1, 0)


def _prefill_and_init(config, max_new_tokens, params, prompts, stop_ids, pad_id):
    prefilled = prefill(config, params, prompts,
                        cache_slots(prompts.tokens.shape[1], max_new_tokens))
    return init_state(prefilled, jnp.asarray(prompts.active), stop_ids, pad_id, max_new_tokens)


def _loop(config, params, state, stop_ids, pad_id):
    return decode_loop(config, params, state, stop_ids, pad_id)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation cache
# --------------------------------------------------------------------------------------------

# Least recently used first. Bounded: every XLA:CPU executable maps its code into the process
# (hundreds of memory mappings each), and a long run that compiles many shapes would otherwise
# reach the kernel's vm.max_map_count and crash inside a later compilation.
_COMPILED: "collections.OrderedDict" = collections.OrderedDict()
MAX_COMPILED = 64


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), np.result_type(x).name) for x in leaves)


def _compiled(fn, statics: tuple, args: tuple, donate: tuple = ()) -> tuple[Any, float]:
    """(executable, seconds spent compiling it now) for fn(*statics, *args)."""
    key = (fn.__module__, fn.__qualname__, statics, _signature(args))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    jitted = jax.jit(lambda *a: fn(*statics, *a), donate_argnums=donate)
    exe = jitted.lower(*args).compile()
    _COMPILED[key] = exe
    while len(_COMPILED) > MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return exe, time.perf_counter() - start


def clear_compiled() -> None:
    _COMPILED.clear()


def device_params(params: dict, model_config: LlamaConfig) -> dict:
    """params in the layout `Llama(model_config)` expects, on the device: numpy arguments are
    copied into every call of a compiled executable (538 MB for SmolLM2, ~55 ms a call here),
    so the decoders do it once per generate call."""
    return jax.device_put(params_for_model(params, model_config))


# --------------------------------------------------------------------------------------------
# Facade
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]     # generated ids per prompt, the stop token excluded
    stop_reasons: list[str]     # "stop" (a stop id) or "length" (max_new_tokens) per prompt
    num_generated: list[int]    # tokens produced per prompt (a stop token included)
    num_steps: int              # trunk calls: the prefill plus decode steps
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float      # spent compiling in this call (0 when executables were cached)
    padded_shape: tuple         # (B, P): batch rows (fillers included) and bucketed prompt length

    @property
    def total_generated(self) -> int:
        return int(sum(self.num_generated))

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over prefill + decode time (compilation excluded)."""
        seconds = self.prefill_seconds + self.decode_seconds
        return self.total_generated / seconds if seconds > 0 else float("nan")


def greedy_generate(model_config: LlamaConfig, params: dict, prompt_ids: Sequence[Sequence[int]],
                    max_new_tokens: int, stop_ids: Iterable[int], pad_id: int, *,
                    padding: str = "left", bucket: int = DEFAULT_BUCKET,
                    batch_size: Optional[int] = None) -> GenerationResult:
    """Greedy continuation of each prompt (one batch), up to max_new_tokens or a stop id.

    `params` in the layout `Llama(model_config)` expects (stacked params are converted);
    `batch_size` pads the batch with inactive rows so a short last batch reuses the executable.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = device_params(params, model_config)
    prompts = pad_prompts(prompt_ids, pad_id, padding=padding, bucket=bucket,
                          batch_size=batch_size)
    longest = int(max(len(p) for p in prompt_ids))
    if longest + max_new_tokens > model_config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's max_seq_len {model_config.max_seq_len}")
    stops = stop_id_array(stop_ids)
    pad = np.array(pad_id, np.int32)

    start_exe, compile_a = _compiled(_prefill_and_init, (model_config, max_new_tokens),
                                     (params, prompts, stops, pad))
    t0 = time.perf_counter()
    state = jax.block_until_ready(start_exe(params, prompts, stops, pad))
    t1 = time.perf_counter()
    loop_exe, compile_b = _compiled(_loop, (model_config,), (params, state, stops, pad),
                                    donate=(1,))
    t2 = time.perf_counter()
    state = jax.block_until_ready(loop_exe(params, state, stops, pad))
    t3 = time.perf_counter()

    tokens, counts, done = jax.device_get((state.tokens, state.num_generated, state.done))
    stop_set = {int(i) for i in stops if i >= 0}
    out_tokens, reasons = [], []
    for b in range(len(prompt_ids)):
        row = [int(t) for t in tokens[b, :counts[b]]]
        if row and row[-1] in stop_set:
            out_tokens.append(row[:-1])
            reasons.append("stop")
        else:
            out_tokens.append(row)
            reasons.append("length")
    return GenerationResult(
        tokens=out_tokens, stop_reasons=reasons, num_generated=[int(c) for c in
                                                                counts[:len(prompt_ids)]],
        num_steps=int(state.step), prefill_seconds=t1 - t0, decode_seconds=t3 - t2,
        compile_seconds=compile_a + compile_b, padded_shape=tuple(prompts.tokens.shape))
