"""What a decoder returns, built in one place from per-row records (host side, numpy).

    DecodeState (device) --harvest: rows' tokens and step logs--> RowRecord per prompt
      --build_result--> GenerationResult / MTPResult / ContinuousResult (lists per prompt,
                        stop reasons, acceptance statistics, timing)

Static batches harvest every row once after the loop; continuous batching harvests rows as they
finish. Letters: B batch (slots), M max new tokens, W tokens per verify step (K: kv heads).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from gptk_jax.decoding.acceptance import summarize


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]     # generated ids per prompt, the stop token excluded
    stop_reasons: list[str]     # "stop" (a stop id) or "length" (max_new_tokens) per prompt
    num_generated: list[int]    # tokens produced per prompt (a stop token included)
    num_steps: int              # trunk calls: the prefill(s) plus decode (verify) steps
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float      # spent compiling in this call (0 when executables were cached)
    padded_shape: tuple         # (B, P): batch rows (fillers included) and bucketed prompt length
    tokens_per_step: int = 1    # W: the trunk's token + W-1 drafts (1: greedy)
    # `acceptance.summarize` of the verify steps (τ = tokens per verify step, bonus included;
    # greedy: τ = 1, nothing drafted) plus per-row logs
    stats: dict = dataclasses.field(default_factory=dict)
    stop_tokens: list = dataclasses.field(default_factory=list)  # stop id per row, None: length
    # Prefill work (real tokens, padding not counted): the prompts' tokens, those run through
    # the trunk (a shared prefix once, when not already held by the decoder, plus each row's
    # suffix), and the shared prefix's length (0: none used).
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    shared_prefix_tokens: int = 0

    @property
    def prefill_tokens_saved(self) -> float:
        """Share of the prompts' tokens the prefill did not run (the shared prefix's reuse)."""
        return 1.0 - self.prefill_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def total_generated(self) -> int:
        return int(sum(self.num_generated))

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over prefill + decode time (compilation excluded)."""
        seconds = self.prefill_seconds + self.decode_seconds
        return self.total_generated / seconds if seconds > 0 else float("nan")

    def row_records(self) -> list[dict]:
        """One JSON-able dict per prompt: its tokens, stop reason, verify steps, drafts accepted
        and tokens emitted at each of its steps."""
        s = self.stats
        return [{"tokens": t, "stop_reason": r, "num_generated": n, "verify_steps": steps,
                 "accepted_per_step": acc, "emitted_per_step": emitted}
                for t, r, n, steps, acc, emitted in zip(
                    self.tokens, self.stop_reasons, self.num_generated, s["steps_per_row"],
                    s["accepted_per_row"], s["emitted_per_row"])]


@dataclasses.dataclass
class MTPResult(GenerationResult):
    """A draft-and-verify result (num_steps = 1 prefill + verify steps): the same fields."""


@dataclasses.dataclass
class ContinuousResult(MTPResult):
    """A result over the whole queue (per prompt, input order). num_steps = loop iterations
    (trunk calls of the decode loop) + prefill calls; decode_seconds includes the host's
    bookkeeping between loop runs."""
    loop_iterations: int = 0
    prefill_calls: int = 0
    batch_size: int = 0
    loop_seconds: float = 0.0   # in the jitted decode loop (decode_seconds less the host's share)


@dataclasses.dataclass(frozen=True)
class RowRecord:
    """One prompt's output: its emitted tokens (a stop token included) and, per verify step it
    took part in, the drafts accepted and the tokens emitted."""
    tokens: list
    accepted: list
    emitted: list


def harvest(state, rows: Sequence[int]) -> list[RowRecord]:
    """RowRecords of slots `rows` of a DecodeState (one device-to-host copy)."""
    tokens, counts, row_steps, accepted_log, emitted_log = jax.device_get(
        (state.tokens, state.num_generated, state.row_steps, state.accepted_log,
         state.emitted_log))
    return [RowRecord(tokens=tokens[b, :counts[b]].tolist(),
                      accepted=accepted_log[:row_steps[b], b].tolist(),
                      emitted=emitted_log[:row_steps[b], b].tolist()) for b in rows]


def split_stop(tokens: Sequence[int], stop_set: set) -> tuple[list[int], str, Optional[int]]:
    """A row's emitted tokens -> (tokens without a final stop token, "stop" or "length", the
    stop token or None)."""
    row = [int(t) for t in tokens]
    if row and row[-1] in stop_set:
        return row[:-1], "stop", row[-1]
    return row, "length", None


def build_result(result_type: type, records: Sequence[RowRecord], stop_ids: np.ndarray,
                 tokens_per_step: int, **fields) -> GenerationResult:
    """result_type(...) from one RowRecord per prompt; `fields`: the timing, step counts and
    shape fields, as the result type names them. stop_ids: `inputs.stop_id_array` (-1 padded)."""
    stop_set = {int(i) for i in stop_ids if i >= 0}
    out_tokens, reasons, stop_tokens = [], [], []
    longest = max([len(r.accepted) for r in records] + [1])
    accepted_log = np.full((longest, len(records)), -1, np.int64)              # [steps, N]
    emitted_log = np.full((longest, len(records)), -1, np.int64)
    for i, record in enumerate(records):
        tokens, reason, stop_token = split_stop(record.tokens, stop_set)
        out_tokens.append(tokens)
        reasons.append(reason)
        stop_tokens.append(stop_token)
        accepted_log[:len(record.accepted), i] = record.accepted
        emitted_log[:len(record.emitted), i] = record.emitted
    stats = summarize(accepted_log, emitted_log, num_drafts=tokens_per_step - 1)
    return result_type(tokens=out_tokens, stop_reasons=reasons,
                       num_generated=[len(r.tokens) for r in records],
                       tokens_per_step=tokens_per_step, stats=stats,
                       stop_tokens=stop_tokens, **fields)


def prefill_counts(prompt_ids, prefix, prefix_run: int) -> dict:
    """The result's prompt_tokens, prefill_tokens and shared_prefix_tokens (prefix: the
    decoding/loop.py SharedPrefix the prompts start with, or None; prefix_run: its tokens run
    through the trunk now, 0 where held already)."""
    total = int(sum(len(p) for p in prompt_ids))
    p = 0 if prefix is None else prefix.length
    return {"prompt_tokens": total, "prefill_tokens": total - p * len(prompt_ids) + prefix_run,
            "shared_prefix_tokens": p}
