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

(bench/probe_heads.py's figures; docs/benchmarks.md "probe_heads"). The trainer's evaluation
(step.eval_step) sums `draft_sums` over batches and `summarize_drafts` divides; on reference
text the same figures are only a proxy (the trunk does not produce that text).

Functions take numpy or jax arrays ([..., J] over the trained offsets, in the head's order) and
work under jit.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


DRAFT_KEYS = ("draft_count", "draft_top1", "draft_chain")   # what draft_sums returns


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


def draft_sums(predictions, targets, positions, offsets: Sequence[int]) -> dict:
    """predictions / targets [..., J] token ids (the heads' top-1 and the trunk's argmax per
    trained offset), positions [...] bool (draft_positions) -> sums over the positions:
    {"draft_count": [J] (the same count in every column), "draft_top1": [J] hits of each draft
    offset, "draft_chain": [J] positions where that draft and every earlier one hit}; columns
    of offsets < 2 are 0."""
    xp = np if all(isinstance(a, np.ndarray) for a in (predictions, targets, positions)) \
        else jnp
    j = len(offsets)
    pos = xp.reshape(xp.asarray(positions), (-1,))
    hit = xp.reshape(xp.asarray(predictions) == xp.asarray(targets), (-1, j)) & pos[:, None]
    count = xp.sum(pos).astype(xp.float32)
    top1 = [xp.zeros((), xp.float32)] * j
    chain = [xp.zeros((), xp.float32)] * j
    running = pos
    for column in draft_columns(offsets):
        running = running & hit[:, column]
        top1[column] = xp.sum(hit[:, column]).astype(xp.float32)
        chain[column] = xp.sum(running).astype(xp.float32)
    return {"draft_count": xp.full((j,), count, xp.float32),
            "draft_top1": xp.stack(top1), "draft_chain": xp.stack(chain)}


def summarize_drafts(sums: dict, offsets: Sequence[int]) -> dict:
    """Summed draft_sums -> {"draft_positions", "accept_o{o}", "chain_o{o}" per draft offset,
    "tau_est"} (NaN rates and tau when no position counted)."""
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
    return out
