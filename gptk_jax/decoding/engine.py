"""The decoding engine: a `Decoder` owns what every call shares and its compiled executables.

    decoder = Decoder(model_config, params, stop_ids=tok.stop_ids, pad_id=tok.pad_id)  # greedy
    mtp = decoder.replace(drafter=drafter, drafter_vars=variables, tokens_per_step=4)
    result = mtp.generate(prompt_ids, max_new_tokens, batch_size=8)         # one static batch
    result = mtp.generate_continuous(prompt_ids, max_new_tokens, batch_size=8)   # a queue

One loop serves everything (decoding/loop.py): greedy is W = 1 with `NoDrafter`; a drafter
makes it draft-and-verify, W tokens per step. A static batch is `prefill_state` then `run` until
every row is done; continuous batching runs until some row is done, harvests it on the host and
`refill`s its slot with the next prompt (Orca's iteration-level scheduling; vLLM's continuous
batching), so a batch no longer waits for its slowest row. Both give every prompt the tokens it
gets alone, i.e. greedy decoding's.

The decoder puts the params (in the layout `Llama(model_config)` reads) and the drafter
variables on the device once, at construction: numpy arguments would be copied into every call
of an executable (538 MB for SmolLM2, ~55 ms a call on CPU). Executables are compiled ahead of
time (`lower().compile()`, timed apart from prefill and decode) and kept on the decoder in a
small least-recently-used cache, keyed by the function, its static arguments and the argument
shapes; they die with the decoder (and the decoders `replace` made from it, which share them).
Bounded because every XLA:CPU executable maps its code into the process (hundreds of mappings
each), and a process that compiles many shapes would reach the kernel's vm.max_map_count.

Letters: B batch (slots), Q queued prompts, R rows refilled at once, P padded prompt length, W tokens
per verify step (1: greedy), M max new tokens. (K is kept for kv heads.)
"""

from __future__ import annotations

import collections
import copy
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from gptk_jax.decoding.inputs import DEFAULT_BUCKET, bucket_length, pad_prompts, stop_id_array
from gptk_jax.decoding.loop import Drafter, NoDrafter, cache_slots, prefill_state, refill, run
from gptk_jax.decoding.results import (ContinuousResult, GenerationResult, MTPResult,
                                       RowRecord, build_result, harvest)
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import params_for_model

class DecodingError(GptkError, ValueError):
    """A request the trunk cannot decode (token ids outside its vocabulary) or a trunk that
    gave non-finite logits; the message names the prompts."""


def check_nonfinite(nonfinite: np.ndarray, prompt_of_row: Sequence[int]) -> None:
    """Raises DecodingError when any row's flag is set; prompt_of_row[b]: the prompt index."""
    bad = [int(prompt_of_row[b]) for b in np.flatnonzero(nonfinite) if prompt_of_row[b] >= 0]
    if bad:
        raise DecodingError(f"the trunk gave non-finite logits (NaN/Inf) while decoding prompt"
                            f"{'s' if len(bad) > 1 else ''} {', '.join(map(str, sorted(bad)))}: "
                            f"its weights or these inputs are broken; no output for them")


MAX_COMPILED = 32   # per decoder: 2 per static batch shape; continuous: ~2 + 1 per refill shape


class Executables:
    """Compiled executables, least recently used dropped first once more than `capacity`."""

    def __init__(self, capacity: int = MAX_COMPILED):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def get(self, fn: Callable, statics: tuple, args: tuple, donate: tuple = ()
            ) -> tuple[Any, float]:
        """(executable of fn(*statics, *args), seconds spent compiling it now)."""
        leaves, treedef = jax.tree.flatten(args)
        key = (fn.__module__, fn.__qualname__, statics, treedef,
               tuple((np.shape(x), np.result_type(x).name) for x in leaves))
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], 0.0
        start = time.perf_counter()
        exe = jax.jit(lambda *a: fn(*statics, *a), donate_argnums=donate).lower(*args).compile()
        self._items[key] = exe
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return exe, time.perf_counter() - start


def check_drafter(drafter: Optional[Drafter], tokens_per_step: Optional[int]) -> int:
    """W for this drafter: 1 without one (greedy); with one 2 .. max_drafts + 1 (default the
    most it supports)."""
    if drafter is None:
        if tokens_per_step not in (None, 1):
            raise ValueError(f"without a drafter K must be 1 (greedy), got {tokens_per_step}")
        return 1
    w = drafter.max_drafts + 1 if tokens_per_step is None else tokens_per_step
    if not isinstance(w, int) or isinstance(w, bool) or w < 2:
        raise ValueError(f"tokens per step K must be an integer >= 2 (1 trunk token + K-1 "
                         f"drafts), got {w!r}")
    if w - 1 > drafter.max_drafts:
        raise ValueError(f"K={w} needs {w - 1} drafts per step but the drafter supports at most "
                         f"{drafter.max_drafts} (K <= {drafter.max_drafts + 1})")
    return w


class Decoder:
    """Greedy (no drafter) or draft-and-verify decoding of one trunk; see the module doc.

    model_config, params: the trunk (stacked or per-layer params; converted and put on the device
    here). stop_ids: a row ends after emitting one of these; pad_id fills the padding.
    drafter, drafter_vars: a `Drafter` and its variables (None: greedy); tokens_per_step W:
    default 1 without a drafter, else the drafter's max_drafts + 1. max_compiled: executables
    kept on this decoder.
    """

    def __init__(self, model_config: LlamaConfig, params: dict, *, stop_ids: Iterable[int],
                 pad_id: int, drafter: Optional[Drafter] = None, drafter_vars: Any = (),
                 tokens_per_step: Optional[int] = None, max_compiled: int = MAX_COMPILED):
        self.config = model_config
        self.params = jax.device_put(params_for_model(params, model_config))
        self.executables = Executables(max_compiled)
        self._configure(stop_ids, pad_id, drafter, drafter_vars, tokens_per_step)

    def _configure(self, stop_ids, pad_id, drafter, drafter_vars, tokens_per_step):
        self.tokens_per_step = check_drafter(drafter, tokens_per_step)
        self.drafter = drafter
        self.drafter_vars = jax.device_put(drafter_vars)
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self.pad_id = int(pad_id)
        self._stops = stop_id_array(self.stop_ids)
        self._pad = np.array(self.pad_id, np.int32)
        self._statics = (self.config, drafter or NoDrafter(), self.tokens_per_step)

    def replace(self, **changes) -> "Decoder":
        """A decoder with other stop_ids / pad_id / drafter / drafter_vars / tokens_per_step
        that shares this one's device params, and its executables while drafter and W stay the
        same (other stop ids or drafter variables of the same shapes reuse them). A new drafter
        starts with drafter_vars () and its default W unless those are given too."""
        settings = dict(stop_ids=self.stop_ids, pad_id=self.pad_id, drafter=self.drafter,
                        drafter_vars=self.drafter_vars,
                        tokens_per_step=self.tokens_per_step)
        unknown = sorted(set(changes) - set(settings))
        if unknown:
            raise TypeError(f"Decoder.replace: cannot change {unknown} (a new trunk needs a new "
                            f"Decoder); changeable: {sorted(settings)}")
        if "drafter" in changes:
            settings.update(drafter_vars=(), tokens_per_step=None)
        settings.update(changes)
        new = copy.copy(self)
        new._configure(**settings)
        if new._statics != self._statics:    # executables of another loop: not worth sharing
            new.executables = Executables(self.executables.capacity)
        return new

    # --- checks and executables -----------------------------------------------------------------
    def _check_request(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt_ids:
            raise ValueError("no prompts given")
        vocab = self.config.vocab_size
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise DecodingError(f"prompt {i} has no tokens")
            low, high = int(min(ids)), int(max(ids))
            if low < 0 or high >= vocab:
                raise DecodingError(f"prompt {i} holds token id {high if high >= vocab else low}, "
                                    f"outside the model's vocabulary 0..{vocab - 1} (is the "
                                    f"tokenizer the model's own?)")
        longest, w = int(max(len(p) for p in prompt_ids)), self.tokens_per_step
        if longest + max_new_tokens + w - 1 > self.config.max_seq_len:
            drafts = f" + {w - 1} drafts" if w > 1 else ""
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens{drafts} "
                             f"exceeds the model's max_seq_len {self.config.max_seq_len}")

    def _call(self, fn: Callable, extra_statics: tuple, args: tuple, donate: tuple = ()
              ) -> tuple[Any, float, float]:
        """fn's executable run on args -> (output, run seconds, compile seconds)."""
        exe, compile_seconds = self.executables.get(fn, self._statics + extra_statics, args,
                                                    donate)
        start = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        return out, time.perf_counter() - start, compile_seconds

    # --- a static batch ---------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                 padding: str = "left", bucket: int = DEFAULT_BUCKET,
                 batch_size: Optional[int] = None) -> GenerationResult:
        """Greedy continuation of each prompt (one batch), up to max_new_tokens or a stop id.
        batch_size pads the batch with inactive rows, so a short last batch reuses the
        executables. -> GenerationResult (greedy) / MTPResult (with a drafter)."""
        self._check_request(prompt_ids, max_new_tokens)
        prompts = pad_prompts(prompt_ids, self.pad_id, padding=padding, bucket=bucket,
                              batch_size=batch_size)
        slots = cache_slots(prompts.padded_length, max_new_tokens, self.tokens_per_step)
        state, prefill_seconds, compile_a = self._call(
            prefill_state, (max_new_tokens, slots),
            (self.params, self.drafter_vars, prompts, self._stops, self._pad))
        state, decode_seconds, compile_b = self._call(
            run, (), (self.params, self.drafter_vars, state, self._stops, np.array(False)),
            donate=(2,))
        check_nonfinite(jax.device_get(state.nonfinite), range(len(prompt_ids)))
        return build_result(GenerationResult if self.drafter is None else MTPResult,
                            harvest(state, range(len(prompt_ids))), self._stops,
                            self.tokens_per_step, num_steps=1 + int(state.step),
                            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                            compile_seconds=compile_a + compile_b,
                            padded_shape=tuple(prompts.tokens.shape))

    # --- continuous batching ----------------------------------------------------------------------
    def generate_continuous(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                            batch_size: int, padding: str = "left", bucket: int = DEFAULT_BUCKET,
                            on_finished: Optional[Callable[[int], None]] = None,
                            on_row: Optional[Callable[[int, RowRecord], None]] = None
                            ) -> ContinuousResult:
        """Every prompt through `batch_size` slots, each refilled with the next prompt (first
        come, first served) as soon as its row finishes. Per prompt the tokens of `generate`.
        A refill prefills R rows, R a power of two (filler rows scatter nowhere), at the bucketed
        length of its longest prompt, into the shared cache whose slots fit the longest bucketed
        prompt of the whole queue: few executables serve a run. `on_finished(n)` is called each
        time n more prompts are done (a progress bar's update); `on_row(i, record)` as prompt i
        finishes, with its RowRecord (tokens, a stop token included; per-step logs), so a caller
        can write each output as it is made."""
        self._check_request(prompt_ids, max_new_tokens)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        m, batch = max_new_tokens, batch_size
        width = bucket_length(int(max(len(p) for p in prompt_ids)), bucket)  # widest batch
        statics = (m, cache_slots(width, m, self.tokens_per_step))
        shared = (self.params, self.drafter_vars)
        clock = {"prefill": 0.0, "loop": 0.0, "compile": 0.0}

        def timed(fn, fn_statics, args, part):   # run and refill update the state in place
            out, seconds, compile_seconds = self._call(
                fn, fn_statics, args, donate=() if fn is prefill_state else (2,))
            clock[part] += seconds
            clock["compile"] += compile_seconds
            return out

        start = time.perf_counter()
        queue = collections.deque(range(len(prompt_ids)))
        slot_prompt = [-1] * batch          # prompt index each slot serves, -1: free
        records = {}                        # prompt index -> RowRecord
        # The first B prompts: one prefill, as a static batch would (filler rows start done).
        first = [queue.popleft() for _ in range(min(batch, len(queue)))]
        prompts = pad_prompts([prompt_ids[i] for i in first], self.pad_id, padding=padding,
                              bucket=bucket, batch_size=batch)
        state = timed(prefill_state, statics, shared + (prompts, self._stops, self._pad),
                      "prefill")
        slot_prompt[:len(first)] = first
        prefill_calls = 1
        while True:
            # Decode until a slot frees (or, with the queue empty, until all rows are done).
            state = timed(run, (), shared + (state, self._stops, np.array(bool(queue))), "loop")
            done, nonfinite = jax.device_get((state.done, state.nonfinite))
            check_nonfinite(nonfinite, slot_prompt)
            finished = [b for b in range(batch) if done[b] and slot_prompt[b] >= 0]
            for b, record in zip(finished, harvest(state, finished) if finished else []):
                records[slot_prompt[b]] = record
                if on_row is not None:
                    on_row(slot_prompt[b], record)
                slot_prompt[b] = -1
            if finished and on_finished is not None:
                on_finished(len(finished))
            if not queue:
                if all(p < 0 for p in slot_prompt):
                    break
                continue
            # Refill the free slots from the queue (R rows, a power of two; fillers dropped).
            free = [b for b in range(batch) if slot_prompt[b] < 0]
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            rows_n = _pow2_at_most(len(take), batch)
            prompts = pad_prompts([prompt_ids[i] for i in take], self.pad_id, padding=padding,
                                  bucket=bucket, batch_size=rows_n)
            rows = np.array(free[:len(take)] + [batch] * (rows_n - len(take)), np.int32)
            state = timed(refill, statics, shared + (state, prompts, rows, self._stops,
                                                     self._pad), "prefill")
            prefill_calls += 1
            for b, i in zip(free, take):
                slot_prompt[b] = i
        wall = time.perf_counter() - start - clock["compile"]
        iterations = int(state.step)
        return build_result(
            ContinuousResult, [records[i] for i in range(len(prompt_ids))], self._stops,
            self.tokens_per_step, num_steps=iterations + prefill_calls,
            prefill_seconds=clock["prefill"], decode_seconds=wall - clock["prefill"],
            compile_seconds=clock["compile"], padded_shape=(batch, width),
            loop_iterations=iterations, prefill_calls=prefill_calls, batch_size=batch,
            loop_seconds=clock["loop"])


def _pow2_at_most(n: int, cap: int) -> int:
    r = 1
    while r < n:
        r *= 2
    return min(r, cap)
