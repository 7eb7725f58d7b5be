"""Teacher-forced drafting accuracy along a row: per-offset acceptance, chain acceptance and the
tau estimate, the validation figures of MTP heads on the trunk's own output.

On rows whose targets are the trunk's own greedy translation (self-distillation: `python -m
gptk_jax.distill`), teacher forcing walks the path greedy decoding takes, so at a position t
the drafts the heads make are exactly those decoding would verify there:

    draft position  t from the last prompt token on (t+1 is a target token) at which every
                    draft offset o (2..K) has a target (t+o inside the row)
    target of o     the trunk's own argmax at t+o-1 (what verification compares draft o with)
    accept(o)       share of draft positions where draft o equals its target
    chain(o)        share of draft positions where drafts 2..o all equal theirs (decoding keeps
                    draft o only when every earlier draft was kept)
    tau estimate    1 + sum_o chain(o): tokens per verify step, the trunk's own token included
    tau walked      the same drafts, counted only where decoding verifies: walking each row
                    from its first draft position, a step at t keeps its a accepted drafts and
                    the trunk's bonus token (a + 1 tokens) and the next step sits at t + a + 1.
                    This is what greedy draft-and-verify at fixed W does on these rows; the
                    estimate counts every position, and overweights easy spans, which decoding
                    crosses in few steps (the rows' last steps, cut by the row's end, are left
                    out)

(bench/probe_heads.py's figures; docs/benchmarks.md "probe_heads"). The trainer's evaluation
(step.eval_step) sums `draft_sums` over batches and `summarize_drafts` divides; on reference
text the same figures are only a proxy (the trunk does not produce that text).

Functions take numpy or jax arrays ([..., J] over the trained offsets, in the head's order) and
work under jit.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


DRAFT_KEYS = ("draft_count", "draft_top1", "draft_chain",   # what draft_sums returns
              "walk_steps", "walk_tokens")


def draft_columns(offsets: Sequence[int]) -> list[int]:
    """Indices into `offsets` of the draft offsets (>= 2), in increasing offset order."""
    return sorted((j for j, o in enumerate(offsets) if o >= 2), key=lambda j: offsets[j])


def draft_positions(target_mask, offsets: Sequence[int]):
    """target_mask [..., W] (offsets 1..W: position t+o holds a target token,
    prompts.shift_targets) -> [...] bool: the draft positions (offset 1 has a target, i.e. t is
    the last prompt token or later, and so does every draft offset)."""
    drafts = [o - 1 for o in offsets if o >= 2]
    mask = target_mask[..., 0]
    for column in drafts:
        mask = mask & target_mask[..., column]
    return mask


def chain_lengths(hit, offsets: Sequence[int]):
    """hit [..., J] bool (draft == target per trained offset) -> [...] int32: the drafts a verify
    step there keeps, i.e. how many in a row from offset 2 hit."""
    xp = np if isinstance(hit, np.ndarray) else jnp
    running = xp.ones(hit.shape[:-1], bool)
    kept = xp.zeros(hit.shape[:-1], xp.int32)
    for column in draft_columns(offsets):
        running = running & hit[..., column]
        kept = kept + running.astype(xp.int32)
    return kept


def walk(kept, positions, skip=None):
    """kept [R,N] int32 (chain_lengths), positions [R,N] bool (draft positions): R sequences of
    entries, each one or more rows' positions in order, one row after another -> (steps [R],
    tokens [R], skip [R]): the verify steps greedy draft-and-verify makes walking them (module
    doc: a step at a draft position when no earlier step's span covers it; it passes its `kept`
    next entries). skip [R]: entries still covered when the sequence continues from an earlier
    call (None: 0); returned for the next. A span never crosses into the next row: a draft
    position has every draft offset inside its row."""
    if isinstance(kept, np.ndarray) and isinstance(positions, np.ndarray):
        skip = np.zeros(kept.shape[0], np.int64) if skip is None else np.array(skip)
        steps, tokens = np.zeros_like(skip), np.zeros_like(skip)
        for n in range(kept.shape[1]):
            step = positions[:, n] & (skip == 0)
            steps += step
            tokens += np.where(step, kept[:, n] + 1, 0)
            skip = np.where(step, kept[:, n], np.maximum(skip - 1, 0))
        return steps, tokens, skip

    def body(skip, xs):
        a, at = xs
        step = at & (skip == 0)
        return (jnp.where(step, a, jnp.maximum(skip - 1, 0)),
                (step.astype(jnp.int32), jnp.where(step, a + 1, 0)))
    skip = jnp.zeros(kept.shape[:1], jnp.int32) if skip is None else skip
    skip, (steps, tokens) = jax.lax.scan(body, skip, (jnp.asarray(kept).T,
                                                      jnp.asarray(positions).T))
    return steps.sum(0), tokens.sum(0), skip


def draft_sums(predictions, targets, positions, offsets: Sequence[int], skip=None,
               return_skip: bool = False):
    """predictions / targets [..., N, J] token ids (the heads' top-1 and the trunk's argmax per
    trained offset), positions [..., N] bool (draft_positions) -> sums over the positions:
    {"draft_count": [J] (the same count in every column), "draft_top1": [J] hits of each draft
    offset, "draft_chain": [J] positions where that draft and every earlier one hit,
    "walk_steps" / "walk_tokens": [J] (the same in every column) the steps and tokens of
    `walk` along N}; columns of offsets < 2 are 0. skip / return_skip: `walk`'s carry, for
    entries split over several calls (the packed evaluation's chunks)."""
    xp = np if all(isinstance(a, np.ndarray) for a in (predictions, targets, positions)) \
        else jnp
    j = len(offsets)
    pos = xp.reshape(xp.asarray(positions), (-1,))
    hit = xp.reshape(xp.asarray(predictions) == xp.asarray(targets), (-1, j)) & pos[:, None]
    count = xp.sum(pos).astype(xp.float32)
    n = xp.asarray(positions).shape[-1] if xp.asarray(positions).ndim else 1
    kept = chain_lengths(xp.reshape(hit, (-1, n, j)), offsets)               # [R,N]
    top1 = [xp.zeros((), xp.float32)] * j
    chain = [xp.zeros((), xp.float32)] * j
    for rank, column in enumerate(draft_columns(offsets)):   # chain: this draft and every
        top1[column] = xp.sum(hit[:, column]).astype(xp.float32)   # earlier one kept
        chain[column] = xp.sum(kept > rank).astype(xp.float32)
    steps, tokens, skip = walk(kept, xp.reshape(pos, (-1, n)), skip)
    out = {"draft_count": xp.full((j,), count, xp.float32),
           "draft_top1": xp.stack(top1), "draft_chain": xp.stack(chain),
           "walk_steps": xp.full((j,), xp.sum(steps), xp.float32),
           "walk_tokens": xp.full((j,), xp.sum(tokens), xp.float32)}
    return (out, skip) if return_skip else out


def summarize_drafts(sums: dict, offsets: Sequence[int]) -> dict:
    """Summed draft_sums -> {"draft_positions", "accept_o{o}", "chain_o{o}" per draft offset,
    "tau_est", "walk_steps", "tau_walked"} (NaN rates and tau when no position counted)."""
    count = float(np.ravel(sums["draft_count"])[0]) if len(offsets) else 0.0
    out = {"draft_positions": count}
    tau = 1.0
    for column in draft_columns(offsets):
        o = offsets[column]
        rate = lambda key: float(np.ravel(sums[key])[column]) / count if count > 0 \
            else float("nan")
        out[f"accept_o{o}"] = rate("draft_top1")
        out[f"chain_o{o}"] = rate("draft_chain")
        tau += out[f"chain_o{o}"]
    out["tau_est"] = tau
    if "walk_steps" in sums:
        steps = float(np.ravel(sums["walk_steps"])[0]) if len(offsets) else 0.0
        out["walk_steps"] = steps
        out["tau_walked"] = float(np.ravel(sums["walk_tokens"])[0]) / steps if steps > 0 \
            else float("nan")
    return out
