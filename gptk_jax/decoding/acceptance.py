"""Acceptance for self-speculative decoding: which drafts the trunk confirms and what a step emits.

Letters: B batch, W tokens per verify step (the trunk's next token + W-1 drafts; W = 1: greedy,
no drafts), R verify steps. (K is kept for kv heads.)

A verify step feeds the trunk `[next_token, d_2, …, d_W]` and takes its argmax at each of the W
positions: `trunk_tokens[:, i]` is the trunk's own token after input i. Draft `d_{i+2}` is
accepted iff it equals `trunk_tokens[:, i]` and every earlier draft was accepted. The step emits
`trunk_tokens[:, :accepted + 1]`: the accepted drafts (equal to the trunk's tokens by definition)
plus the trunk's token after them (the bonus), so an active row emits at least one token per step
and the output is the greedy output exactly. Emission then stops after the first stop id and at
the token limit.

`accept_step` is pure jnp (runs inside the decode loop); `summarize` is numpy (host, after the
loop) and turns the per-step logs into τ, histograms and per-offset acceptance.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.decoding.inputs import is_stop


@flax.struct.dataclass
class StepAcceptance:
    accepted: jax.Array  # [B] int32, drafts accepted (0..W-1), before the stop-id / limit cut
    emitted: jax.Array   # [B] int32, tokens emitted this step (0 for inactive rows)
    finished: jax.Array  # [B] bool, the row emitted a stop id or reached the limit this step


def accepted_length(draft_tokens: jax.Array, trunk_tokens: jax.Array) -> jax.Array:
    """Longest prefix of draft_tokens [B,W-1] equal to trunk_tokens[:, :W-1] -> [B] int32."""
    matches = draft_tokens == trunk_tokens[:, :draft_tokens.shape[1]]      # [B,W-1]
    return jnp.cumprod(matches.astype(jnp.int32), axis=1).sum(axis=1).astype(jnp.int32)


def accept_step(draft_tokens: jax.Array, trunk_tokens: jax.Array, num_emitted: jax.Array,
                active: jax.Array, *, max_new_tokens: int, stop_ids) -> StepAcceptance:
    """draft_tokens [B,W-1]; trunk_tokens [B,W] (the trunk's argmax after each verify input);
    num_emitted [B] tokens already emitted per row; active [B] bool (False: finished row)."""
    w = trunk_tokens.shape[1]
    accepted = accepted_length(draft_tokens, trunk_tokens)                 # [B]
    emitted = accepted + 1                                                 # + bonus
    in_block = jnp.arange(w)[None, :] < emitted[:, None]                   # [B,W]
    stops = is_stop(trunk_tokens, stop_ids) & in_block                     # [B,W]
    hit_stop = stops.any(axis=1)
    emitted = jnp.where(hit_stop, jnp.argmax(stops, axis=1) + 1, emitted)  # keep the stop id
    room = max_new_tokens - num_emitted
    emitted = jnp.where(active, jnp.minimum(emitted, room), 0).astype(jnp.int32)
    finished = active & (hit_stop | (emitted >= room))
    # hit_stop after the cut (stop id beyond the limit) still means the row is finished: room == 0
    return StepAcceptance(accepted=accepted, emitted=emitted, finished=finished)


# --- host-side statistics -------------------------------------------------------------------------

def acceptance_stats(accepted, emitted, num_drafts: int, widths=None) -> dict:
    """Statistics over verify steps (any set of rows and runs pooled).

    accepted, emitted: [N] int per verify step (drafts accepted, tokens emitted). τ
    (`tau`) = tokens emitted by verify steps / verify steps, the bonus token included
    (τ >= 1; τ = W when every draft is accepted). It leaves out the one token the prefill emits
    and a step's tokens past a stop id or the limit; the histogram and the per-offset rates use
    the acceptance before that cut (they describe the drafter). widths: [N] the W of each step
    where it varies (auto W, decoding/width.py; None: every step drafted num_drafts): an offset
    counts as reached only in steps that drafted it, and `width_histogram` (index W: steps at
    that W) is added.
    """
    accepted = np.asarray(accepted, np.int64).reshape(-1)
    emitted = np.asarray(emitted, np.int64).reshape(-1)
    drafted = (np.full_like(accepted, num_drafts + 1) if widths is None
               else np.asarray(widths, np.int64).reshape(-1)) - 1     # drafts each step verified
    steps = int(accepted.size)
    histogram = np.bincount(accepted, minlength=num_drafts + 1)[: num_drafts + 1]
    # offset j = 2..W is reached when it was drafted and the j-2 drafts before it were accepted
    reached = [int(((accepted >= j) & (drafted > j)).sum()) for j in range(num_drafts)]
    passed = [int((accepted >= j + 1).sum()) for j in range(num_drafts)]
    stats = {
        "verify_steps": steps,
        "tokens_from_verify_steps": int(emitted.sum()),
        "tau": float(emitted.sum() / steps) if steps else None,
        "mean_accepted_drafts": float(accepted.mean()) if steps else None,
        "accepted_histogram": histogram.tolist(),  # index a: steps that accepted a drafts
        # P(offset j accepted | offsets 2..j-1 accepted), keyed by offset j
        "per_offset_acceptance": {str(j + 2): (passed[j] / reached[j] if reached[j] else None)
                                  for j in range(num_drafts)},
    }
    if widths is not None:
        stats["width_histogram"] = np.bincount(drafted + 1,
                                               minlength=num_drafts + 2).tolist()
    return stats


def summarize(accepted_log: np.ndarray, emitted_log: np.ndarray, num_drafts: int,
              width_log: Optional[np.ndarray] = None) -> dict:
    """`acceptance_stats` of one run plus per-row logs (for JSON lines).

    accepted_log, emitted_log [R,B] int32: row i of column b is row b's i-th verify step, -1
    past its last one (loop.DecodeState's logs); width_log [R,B] the W of each step (auto W:
    per-row `widths_per_row` added; None: every step at W = num_drafts + 1).
    """
    accepted_log, emitted_log = np.asarray(accepted_log), np.asarray(emitted_log)
    ran = accepted_log >= 0                                                # [R,B]
    widths = None if width_log is None else np.asarray(width_log)[ran]
    stats = acceptance_stats(accepted_log[ran], emitted_log[ran], num_drafts, widths)
    rows = range(accepted_log.shape[1])
    stats.update(
        steps_per_row=ran.sum(axis=0).tolist(),
        accepted_per_row=[accepted_log[ran[:, b], b].tolist() for b in rows],
        emitted_per_row=[emitted_log[ran[:, b], b].tolist() for b in rows])
    if width_log is not None:
        stats["widths_per_row"] = [np.asarray(width_log)[ran[:, b], b].tolist() for b in rows]
    return stats
