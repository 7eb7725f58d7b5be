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

    auto = decoder.replace(drafter=drafter, drafter_vars=variables, tokens_per_step="auto",
                           verify_cost="runs/verify_cost.json")   # or a dict; None: measured

`tokens_per_step="auto"` (or an `AutoWidth`) chooses W per step, 1 .. the drafter's most, by
expected tokens per second: the drafter's running per-offset acceptance against the step's
measured cost at this batch and W (decoding/width.py, decoding/cost.py). `run` is compiled per
W and returns when the choice changes; `_run` then runs the chosen W's executable on the same
(donated) state. The result's stats add the W histogram and the final acceptance estimates.

The decoder puts the params (in the layout `Llama(model_config)` reads) and the drafter
variables on the device once, at construction: numpy arguments would be copied into every call
of an executable (538 MB for SmolLM2, ~55 ms a call on CPU). Executables are compiled ahead of
time (`lower().compile()`, timed apart) and kept on the decoder in a small LRU cache (each
XLA:CPU executable maps its code into the process: vm.max_map_count), keyed by the function,
its statics and the argument shapes; they die with the decoder (and those `replace` made).

Shared prefix (`shared_prefix=True`, the default): when every prompt of a static batch (of a
continuous queue) starts with the same >= SHARED_PREFIX_MIN tokens (few-shot prompts: the
instruction and shots), those are prefilled once at batch 1 (`loop.prefill_shared_prefix`) and
kept on the decoder keyed by their tokens (MAX_PREFIXES, least recently used dropped; decoders
made by `replace` share them), so the next batch with that prefix runs none of it; its cache is
broadcast into the batch's and only each row's suffix is prefilled (loop.prefill_state). A held
prefix that every prompt starts with is reused (batch 1 included) unless the prompts share
SHARED_PREFIX_MIN more tokens than it; `add_shared_prefix` registers one explicitly. Tokens,
hidden states and logits equal the whole prompts' prefill to float32 rounding, and the drafter
consumes the whole prompt as before. The suffixes are right-padded whatever `padding` says
(padding never changes the tokens). Results record `prompt_tokens`, `prefill_tokens` (run
through the trunk) and `shared_prefix_tokens`.

Letters: B batch (slots), Q queued prompts, R rows refilled at once, P padded prompt length,
W tokens per verify step (1: greedy), M max new tokens (K: kv heads).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import numpy as np

from gptk_jax.decoding.checks import (DecodingError, check_drafter,  # noqa: F401
                                      check_request, check_width, resolve_matmul)
from gptk_jax.decoding.cost import (VerifyCost, as_verify_cost, device_name,
                                    measure_step_seconds)
from gptk_jax.decoding.inputs import (DEFAULT_BUCKET, bucket_length, pad_prompts, pad_suffixes,
                                     refill_rows, stop_id_array)
from gptk_jax.decoding.loop import (Drafter, NoDrafter, SharedPrefix, cache_slots,
                                    prefill_shared_prefix, prefill_state, refill, run)
from gptk_jax.decoding.results import (ContinuousResult, GenerationResult, MTPResult,
                                       RowRecord, build_result, harvest, prefill_counts)
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding.executables import MAX_COMPILED, Executables
from gptk_jax.decoding.nonfinite import check_nonfinite, explain_nonfinite  # noqa: F401
from gptk_jax.decoding.rate_gate import RateGate
from gptk_jax.decoding.width import (AutoWidth, add_width_stats, after_rest, harvest_widths,
                                     modelled_loop_cost, rested_stats, resume_width_stats,
                                     summarize_fixed_width)
from gptk_jax.llama.model import params_for_model
from gptk_jax.llama.prefix import common_prefix_length


SHARED_PREFIX_MIN = 16   # fewer shared tokens: every row prefills its whole prompt
MAX_PREFIXES = 4         # shared prefixes (batch-1 KV caches) kept per decoder


class Decoder:
    """Greedy (no drafter) or draft-and-verify decoding of one trunk; see the module doc.

    model_config, params: the trunk (stacked or per-layer params; converted and put on the device
    here). stop_ids: a row ends after emitting one of these; pad_id fills the padding.
    drafter, drafter_vars: a `Drafter` and its variables (None: greedy); tokens_per_step W:
    default 1 without a drafter, else the drafter's max_drafts + 1; "auto" (or an
    `AutoWidth`): chosen per step by expected tokens per second (decoding/width.py), from
    `verify_cost` (a `VerifyCost`, a {batch: {W: cost}} dict or a saved table's path; None:
    measured with `calibrate` at the first call of each batch size, kept in `measured_cost`).
    `tokens_per_step` is then W_max (the buffers' width) and `width_policy` the AutoWidth.
    gate_batches: static batches run with the drafter only while measured faster than greedy's
    loop (decoding/rate_gate.py; None: on with auto W, off with a fixed W).
    Auto W: the next static batch of a size starts from the last one's statistics
    (`width_memory`, decoding/width.py); whether it runs with the drafter is measured
    (`rate_gate`, decoding/rate_gate.py).
    max_compiled: executables kept on this decoder. shared_prefix: prefill a prefix that every
    prompt shares once and reuse it (module doc); False: every row prefills its whole prompt.
    matmul: how the trunk's products run ("auto": the few-row kernels of
    gptk_jax/kernels/few_rows.py where they build, on CPU; "xla"; "few_rows"): a step multiplies
    only B x W rows, which XLA:CPU runs slowly from 2 rows on. Each decodes exactly (tests).
    fuse_projections: q|k|v and w1|w3 each as one product over weights concatenated here
    (llama/model.fuse_projections: fewer, larger products; the decoder then holds its own copy
    of those weights beside the caller's).
    """

    def __init__(self, model_config: LlamaConfig, params: dict, *, stop_ids: Iterable[int],
                 pad_id: int, drafter: Optional[Drafter] = None, drafter_vars: Any = (),
                 tokens_per_step: Union[int, str, AutoWidth, None] = None,
                 verify_cost: Any = None, max_compiled: int = MAX_COMPILED,
                 shared_prefix: bool = True, matmul: str = "auto",
                 gate_batches: Optional[bool] = None, fuse_projections: bool = True):
        self.config = model_config.replace(matmul=resolve_matmul(matmul),
                                           fuse_projections=bool(fuse_projections))
        self.params = jax.device_put(params_for_model(params, self.config))
        self.executables = Executables(max_compiled)
        # greedy's loop (a greedy decoder's own, a drafter's resting batches): shared by every
        # decoder replace() makes, so a rested batch runs greedy's warm executable
        self.greedy_executables = self.executables if drafter is None else \
            Executables(max_compiled)
        self.measured_cost = VerifyCost({}, source="Decoder.calibrate")
        self.prefixes: collections.OrderedDict = collections.OrderedDict()  # tokens -> prefix
        self._configure(stop_ids, pad_id, drafter, drafter_vars, tokens_per_step, verify_cost,
                        shared_prefix, gate_batches)

    def _configure(self, stop_ids, pad_id, drafter, drafter_vars, tokens_per_step,
                   verify_cost=None, shared_prefix=True, gate_batches=None):
        self.shared_prefix = bool(shared_prefix)
        self.width_policy = check_width(drafter, tokens_per_step)
        if self.width_policy is not None:
            self.tokens_per_step = self.width_policy.max_width
        else:
            auto = isinstance(tokens_per_step, AutoWidth) or tokens_per_step == "auto"
            self.tokens_per_step = check_drafter(drafter, None if auto else tokens_per_step)
        self.verify_cost = as_verify_cost(verify_cost)
        self.drafter = drafter
        self.drafter_vars = jax.device_put(drafter_vars)
        self.width_memory = {}   # auto W: batch size -> the last static batch's WidthStats
        self.rate_gate = RateGate(idle_batches=getattr(self.width_policy, "idle_batches", 24))
        self._gate_batches = gate_batches        # None: on with auto W (rate_gate.py)
        self.gate_batches = drafter is not None and (
            self.width_policy is not None if gate_batches is None else bool(gate_batches))
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self.pad_id = int(pad_id)
        self._stops = stop_id_array(self.stop_ids)
        self._pad = np.array(self.pad_id, np.int32)
        self._statics = (self.config, drafter or NoDrafter(),
                         self.width_policy or self.tokens_per_step)
        self._greedy_statics = (self.config, NoDrafter(), 1)   # greedy's loop (and a rest's)

    def replace(self, **changes) -> "Decoder":
        """A decoder with other stop_ids / pad_id / drafter / drafter_vars / tokens_per_step /
        verify_cost / shared_prefix / gate_batches that shares this one's device params and
        held prefixes, and its executables while drafter and W stay the same (other stop ids
        or drafter variables of the same shapes reuse them). A new drafter starts with
        drafter_vars () and its default (fixed) W and gate_batches None unless those are given
        too."""
        settings = dict(stop_ids=self.stop_ids, pad_id=self.pad_id, drafter=self.drafter,
                        drafter_vars=self.drafter_vars,
                        tokens_per_step=self.width_policy or self.tokens_per_step,
                        verify_cost=self.verify_cost, shared_prefix=self.shared_prefix,
                        gate_batches=self._gate_batches)
        unknown = sorted(set(changes) - set(settings))
        if unknown:
            raise TypeError(f"Decoder.replace: cannot change {unknown} (a new trunk needs a new "
                            f"Decoder); changeable: {sorted(settings)}")
        if "drafter" in changes:
            settings.update(drafter_vars=(), tokens_per_step=None, gate_batches=None)
        settings.update(changes)
        new = copy.copy(self)
        new._configure(**settings)
        if new._statics != self._statics:    # executables of another loop: not worth sharing
            new.executables = new.greedy_executables if new.drafter is None else \
                Executables(self.executables.capacity)
            new.measured_cost = VerifyCost({}, source="Decoder.calibrate")   # another step
        return new

    # --- auto W: step costs ---------------------------------------------------------------------
    def calibrate(self, batch_sizes: Iterable[int], *, context: int = 64, steps: int = 8,
                  reps: int = 5) -> VerifyCost:
        """Measures this decoder's step (draft + verify + accept) at each batch size and W =
        1..tokens_per_step, and greedy's step (no drafting; `VerifyCost.greedy`: under auto W
        a step at W = 1 drafts only where the next step may verify drafts, decoding/width.py;
        timed in the same rounds as the W's) (cost.py `measure_step_seconds`; one compile per
        W and greedy's) -> a VerifyCost, merged into
        `measured_cost` (`.save(path)` it and pass it as `verify_cost` to skip this)."""
        seconds, greedy = {}, {}
        for b in (int(b) for b in batch_sizes):
            seconds[b] = measure_step_seconds(
                self.config, self.drafter, self.params, self.drafter_vars, b,
                range(1, self.tokens_per_step + 1), context=context, steps=steps, reps=reps,
                greedy=True)
            greedy[b] = seconds[b].pop("greedy")
        table = VerifyCost(seconds, greedy=greedy, source="Decoder.calibrate", context=context,
                           device=device_name())
        self.measured_cost = self.measured_cost.merged(table)
        return table

    def step_costs(self, batch_size: int, context: int = 64) -> tuple:
        """(cost(W) / cost(1) for W = 1..W_max at this batch, where they come from, seconds
        spent measuring now, greedy's step / cost(1) (None where the table has none: the
        loop then takes it as cost(1) and the rate gate prices no batch)):
        `verify_cost` when given, else `measured_cost`, measured first at a batch size it
        lacks, at `context` cached positions (the first batch's prompt width)."""
        start = time.perf_counter()
        if self.verify_cost is not None:
            table, source = self.verify_cost, self.verify_cost.source or "given"
        else:
            if batch_size not in self.measured_cost:
                self.calibrate([batch_size], context=context)
            table, source = self.measured_cost, "measured"
        return (table.relative(batch_size, self.tokens_per_step), source,
                time.perf_counter() - start, table.greedy_relative(batch_size, missing=None))

    def _loop_statics(self, batch_size: int, context: int = 64) -> tuple[tuple, dict]:
        """The statics of this batch's executables and, for auto W, what the result records."""
        if self.width_policy is None:
            return self._statics, {}
        costs, source, seconds, greedy = self.step_costs(batch_size, context)
        policy = dataclasses.replace(self.width_policy, costs=costs,
                                     greedy_cost=1.0 if greedy is None else greedy)
        return self._statics[:2] + (policy,), {"step_cost": list(costs),
                                               "greedy_step_cost": greedy,
                                               "step_cost_source": source,
                                               "calibration_seconds": seconds}

    def _run(self, statics: tuple, state, stop_at_first: bool, drafter_vars: Any = None):
        """`run` until every row is done (stop_at_first: some row); auto W: one executable per W,
        run again at the chosen W each time the choice changes (each W's executable looked up
        once per call; one device-to-host copy per change). -> (state, wall seconds
        (compilation excluded), compile seconds)."""
        policy, start, compile_seconds = statics[2], time.perf_counter(), 0.0
        flag = np.array(stop_at_first)
        drafter_vars = self.drafter_vars if drafter_vars is None else drafter_vars
        args = lambda s: (self.params, drafter_vars, s, self._stops, flag)
        if not isinstance(policy, AutoWidth):
            state, _, compile_seconds = self._call(run, (), args(state), donate=(2,),
                                                   statics=statics)
            return state, time.perf_counter() - start - compile_seconds, compile_seconds
        exes = {}
        width = int(jax.device_get(state.width_stats.next_width))
        while True:
            if width not in exes:
                run_statics = statics[:2] + (dataclasses.replace(policy, width=width),)
                exes[width], seconds = self.executables.get(run, run_statics, args(state),
                                                            donate=(2,))
                compile_seconds += seconds
            state = exes[width](*args(state))
            width, done = jax.device_get((state.width_stats.next_width, state.done))
            width = int(width)
            if done.any() if stop_at_first else done.all():
                break
        return state, time.perf_counter() - start - compile_seconds, compile_seconds

    # --- shared prefix ----------------------------------------------------------------------------
    def add_shared_prefix(self, prefix_ids: Sequence[int]) -> SharedPrefix:
        """Prefills `prefix_ids` (>= 1 token) once and holds it, so that later prompts starting
        with it (batch 1 included) reuse it."""
        prefix, _, _ = self._prefill_prefix(tuple(int(t) for t in prefix_ids))
        return prefix

    def _prefill_prefix(self, key: tuple) -> tuple[SharedPrefix, float, float]:
        if not key:
            raise DecodingError("a shared prefix needs at least one token")
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            return self.prefixes[key], 0.0, 0.0
        tokens = np.asarray(key, np.int32)[None]                               # [1,P]
        prefix, seconds, compile_seconds = self._call(
            prefill_shared_prefix, (), (self.params, tokens), statics=(self.config,))
        self.prefixes[key] = prefix
        while len(self.prefixes) > MAX_PREFIXES:
            self.prefixes.popitem(last=False)
        return prefix, seconds, compile_seconds

    def _shared_prefix_for(self, prompt_ids: Sequence[Sequence[int]]
                           ) -> tuple[Optional[SharedPrefix], int, float, float]:
        """The prefix these prompts share -> (prefix or None, tokens run through the trunk
        for it now (0: held already), seconds, compile seconds); see the module doc."""
        if not self.shared_prefix:
            return None, 0, 0.0, 0.0
        shortest = min(len(p) for p in prompt_ids)
        held = None
        for key in self.prefixes:         # the longest held prefix every prompt starts with
            n = len(key)
            if n < shortest and (held is None or n > len(held)) and all(
                    tuple(int(t) for t in p[:n]) == key for p in prompt_ids):
                held = key
        common = common_prefix_length(prompt_ids) if len(prompt_ids) > 1 else 0
        if held is not None and common - len(held) < SHARED_PREFIX_MIN:
            self.prefixes.move_to_end(held)
            return self.prefixes[held], 0, 0.0, 0.0
        if common < SHARED_PREFIX_MIN:
            return None, 0, 0.0, 0.0
        prefix, seconds, compile_seconds = self._prefill_prefix(
            tuple(int(t) for t in prompt_ids[0][:common]))
        return prefix, common, seconds, compile_seconds

    def _padded(self, prompt_ids, prefix: Optional[SharedPrefix], padding: str, bucket: int,
             batch_size: Optional[int]):
        """-> (PromptBatch, padded prompt width: the prefix's P + the suffixes' when shared)."""
        if prefix is None:
            prompts = pad_prompts(prompt_ids, self.pad_id, padding=padding, bucket=bucket,
                                  batch_size=batch_size)
            return prompts, prompts.padded_length
        prompts = pad_suffixes(prompt_ids, prefix.length, self.pad_id, bucket=bucket,
                               batch_size=batch_size)
        return prompts, prefix.length + prompts.padded_length

    # --- checks and executables -----------------------------------------------------------------
    def _explainer(self, prompt_ids) -> Callable[[list[int]], str]:
        """The cause of non-finite logits of these prompts (decoding/nonfinite.py)."""
        return lambda bad: explain_nonfinite(self.config, self.params, self.pad_id, prompt_ids,
                                             bad)

    def _call(self, fn: Callable, extra_statics: tuple, args: tuple, donate: tuple = (),
              statics: Optional[tuple] = None) -> tuple[Any, float, float]:
        """fn's executable run on args -> (output, run seconds, compile seconds). statics:
        the loop's (config, drafter, W or AutoWidth); default this decoder's."""
        statics = self._statics if statics is None else statics
        store = self.greedy_executables if statics == self._greedy_statics else self.executables
        exe, compile_seconds = store.get(fn, statics + extra_statics, args, donate)
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
        check_request(self.config, self.tokens_per_step, prompt_ids, max_new_tokens)
        prefix, prefix_run, prefix_seconds, prefix_compile = self._shared_prefix_for(prompt_ids)
        prompts, width = self._padded(prompt_ids, prefix, padding, bucket, batch_size)
        batch = prompts.tokens.shape[0]
        statics, auto_info = self._loop_statics(batch, width)
        rest, memory = self._drafter_rests(batch, statics)
        # resting: greedy's loop, shapes and executables exactly (greedy_executables)
        run_statics = self._greedy_statics if rest else statics
        slots = cache_slots(width, max_new_tokens, 1 if rest else self.tokens_per_step)
        drafter_vars = () if rest else self.drafter_vars
        state, prefill_seconds, compile_a = self._call(
            prefill_state, (max_new_tokens, slots),
            (self.params, drafter_vars, prompts, self._stops, self._pad, prefix),
            statics=run_statics)
        if memory is not None and not rest:      # auto W: carry the last batch's estimates on
            state = state.replace(width_stats=resume_width_stats(
                statics[2], memory, state.width_stats, state.draft_scores, ~state.done))
        state, decode_seconds, compile_b = self._run(run_statics, state, stop_at_first=False,
                                                     drafter_vars=drafter_vars)
        check_nonfinite(jax.device_get(state.nonfinite), range(len(prompt_ids)),
                        self._explainer(prompt_ids))
        records = harvest(state, range(len(prompt_ids)))
        result = build_result(GenerationResult if self.drafter is None else MTPResult,
                              records, self._stops, self.tokens_per_step,
                              num_steps=1 + int(state.step),
                              prefill_seconds=prefill_seconds + prefix_seconds,
                              decode_seconds=decode_seconds,
                              compile_seconds=compile_a + compile_b + prefix_compile,
                              padded_shape=(prompts.tokens.shape[0], width),
                              **prefill_counts(prompt_ids, prefix, prefix_run))
        if self.width_policy is not None:
            if not rest:
                self.width_memory[batch] = state.width_stats
            add_width_stats(result, harvest_widths(state, range(len(prompt_ids))),
                            rested_stats(memory, state.step) if rest else state.width_stats,
                            auto_info)
        if self.gate_batches:
            greedy_steps = max(len(r.tokens) for r in records) - 1
            priced = (None if rest or auto_info.get("greedy_step_cost") is None   # no price
                      else modelled_loop_cost(statics[2], state.width_stats, greedy_steps))
            self.rate_gate.record(batch, rest, prefill_seconds, decode_seconds, greedy_steps,
                                  prompts.tokens.size, fresh=compile_a + compile_b > 0,
                                  priced=priced)
            if self.width_policy is None:        # a fixed W: a rested batch's steps at W = 1
                summarize_fixed_width(result, 1 if rest else self.tokens_per_step,
                                      [len(r.accepted) for r in records])
            result.stats.update(drafter_rested=rest, **self.rate_gate.summary(batch))
        return result

    def _drafter_rests(self, batch: int, statics: tuple):
        """Before a static batch -> (greedy's loop, the drafter resting? auto W's kept
        statistics, None where none are): decoding/rate_gate.py decides by measured time."""
        if not self.gate_batches:
            return False, self.width_memory.get(batch)
        rest, rested = self.rate_gate.rests(batch)
        memory = self.width_memory.get(batch)
        return rest, memory if rest or memory is None else after_rest(statics[2], memory, rested)

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
        check_request(self.config, self.tokens_per_step, prompt_ids, max_new_tokens)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DecodingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        m, batch = max_new_tokens, batch_size
        prefix, prefix_run, prefix_seconds, prefix_compile = self._shared_prefix_for(prompt_ids)
        p = 0 if prefix is None else prefix.length
        width = p + bucket_length(int(max(len(q) for q in prompt_ids)) - p, bucket)  # widest
        rest = self.gate_batches and self.rate_gate.resting(batch)   # greedy's loop exactly
        sizes = (m, cache_slots(width, m, 1 if rest else self.tokens_per_step))
        shared = (self.params, () if rest else self.drafter_vars)
        clock = {"prefill": prefix_seconds, "loop": 0.0, "compile": prefix_compile}
        loop_statics, auto_info = self._loop_statics(batch, width)
        loop_statics = self._greedy_statics if rest else loop_statics

        def timed(fn, fn_statics, args, part):   # refill updates the state in place
            out, seconds, compile_seconds = self._call(
                fn, fn_statics, args, donate=() if fn is prefill_state else (2,),
                statics=loop_statics)
            clock[part] += seconds
            clock["compile"] += compile_seconds
            return out

        start = time.perf_counter()
        queue = collections.deque(range(len(prompt_ids)))
        slot_prompt = [-1] * batch          # prompt index each slot serves, -1: free
        records = {}                        # prompt index -> RowRecord
        widths = {}                         # prompt index -> W per step (auto W)
        # The first B prompts: one prefill, as a static batch would (filler rows start done).
        first = [queue.popleft() for _ in range(min(batch, len(queue)))]
        prompts, _ = self._padded([prompt_ids[i] for i in first], prefix, padding, bucket, batch)
        state = timed(prefill_state, sizes, shared + (prompts, self._stops, self._pad, prefix),
                      "prefill")
        slot_prompt[:len(first)] = first
        prefill_calls = 1
        while True:
            # Decode until a slot frees (or, with the queue empty, until all rows are done).
            state, seconds, compile_seconds = self._run(loop_statics, state, bool(queue), shared[1])
            clock["loop"] += seconds
            clock["compile"] += compile_seconds
            done, nonfinite = jax.device_get((state.done, state.nonfinite))
            check_nonfinite(nonfinite, slot_prompt, self._explainer(prompt_ids))
            finished = [b for b in range(batch) if done[b] and slot_prompt[b] >= 0]
            if self.width_policy is not None and finished and not rest:
                widths.update(zip((slot_prompt[b] for b in finished),
                                  harvest_widths(state, finished)))
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
            rows_n = refill_rows(len(take), batch)
            prompts, _ = self._padded([prompt_ids[i] for i in take], prefix, padding, bucket,
                                   rows_n)
            rows = np.array(free[:len(take)] + [batch] * (rows_n - len(take)), np.int32)
            state = timed(refill, sizes, shared + (state, prompts, rows, self._stops,
                                                   self._pad, prefix), "prefill")
            prefill_calls += 1
            for b, i in zip(free, take):
                slot_prompt[b] = i
        wall = time.perf_counter() - start - clock["compile"]
        iterations = int(state.step)
        result = build_result(
            ContinuousResult, [records[i] for i in range(len(prompt_ids))], self._stops,
            self.tokens_per_step, num_steps=iterations + prefill_calls,
            prefill_seconds=clock["prefill"], decode_seconds=wall - clock["prefill"],
            compile_seconds=clock["compile"], padded_shape=(batch, width),
            loop_iterations=iterations, prefill_calls=prefill_calls, batch_size=batch,
            loop_seconds=clock["loop"], **prefill_counts(prompt_ids, prefix, prefix_run))
        if self.width_policy is not None:     # resting: every step at W = 1
            add_width_stats(result, [widths.get(i, [1] * len(records[i].accepted))
                                     for i in range(len(prompt_ids))],
                            rested_stats(self.width_memory[batch], iterations) if rest
                            else state.width_stats, auto_info)
        if self.gate_batches:
            if self.width_policy is None and rest:
                summarize_fixed_width(result, 1, [len(records[i].accepted)
                                                  for i in range(len(prompt_ids))])
            result.stats["drafter_rested"] = rest
        return result
