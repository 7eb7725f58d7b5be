"""What a decoding request must satisfy before anything compiles: the drafter against W (tokens
per verify step, fixed or chosen by cost), and the one error every decoding refusal raises.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from gptk_jax.decoding.loop import Drafter
from gptk_jax.decoding.width import AutoWidth
from gptk_jax.errors import GptkError
from gptk_jax.llama.config import MATMULS


class DecodingError(GptkError, ValueError):
    """A request the trunk cannot decode (bad settings, no or empty prompts, token ids outside
    its vocabulary, too long for max_seq_len) or a trunk that gave non-finite logits; the
    message names the prompts (and, for non-finite logits, the cause: decoding/nonfinite.py)."""


def check_drafter(drafter: Optional[Drafter], tokens_per_step: Optional[int]) -> int:
    """W for this drafter: 1 without one (greedy); with one 2 .. max_drafts + 1 (default the
    most it supports)."""
    if drafter is None:
        if tokens_per_step not in (None, 1):
            raise DecodingError(f"without a drafter W must be 1 (greedy), got {tokens_per_step}")
        return 1
    w = drafter.max_drafts + 1 if tokens_per_step is None else tokens_per_step
    if not isinstance(w, int) or isinstance(w, bool) or w < 2:
        raise DecodingError(f"tokens per step W must be an integer >= 2 (1 trunk token + W-1 "
                            f"drafts), got {w!r}")
    if w - 1 > drafter.max_drafts:
        raise DecodingError(f"W={w} needs {w - 1} drafts per step but the drafter supports at "
                            f"most {drafter.max_drafts} (W <= {drafter.max_drafts + 1})")
    return w


def check_width(drafter: Optional[Drafter], tokens_per_step: Any) -> Optional[AutoWidth]:
    """The AutoWidth (max_width resolved) when W is chosen by cost ("auto" or an AutoWidth)
    and there is a drafter; None otherwise (a fixed W, or greedy)."""
    if isinstance(tokens_per_step, str) and tokens_per_step == "auto":
        tokens_per_step = AutoWidth()
    if not isinstance(tokens_per_step, AutoWidth) or drafter is None:
        if isinstance(tokens_per_step, str):
            raise DecodingError(f"tokens per step must be an integer or 'auto', got "
                                f"{tokens_per_step!r}")
        return None
    if drafter.branches > 1:
        raise DecodingError("auto W chooses among chains of one drafter; a tree drafter "
                            "(decoding/tree.py) verifies a fixed W per branch: give an integer")
    p = tokens_per_step
    w = drafter.max_drafts + 1 if p.max_width is None else p.max_width
    if not isinstance(w, int) or isinstance(w, bool) or not 2 <= w <= drafter.max_drafts + 1:
        raise DecodingError(f"auto W: max_width must be an integer in 2..{drafter.max_drafts + 1}"
                            f" (the drafter drafts at most {drafter.max_drafts}), got {w!r}")
    if not isinstance(p.probe_every, int) or p.probe_every < 1:
        raise DecodingError(f"auto W: probe_every must be an integer >= 1, got {p.probe_every!r}")
    if not isinstance(p.idle_batches, int) or p.idle_batches < 0:
        raise DecodingError(f"auto W: idle_batches must be an integer >= 0, got "
                            f"{p.idle_batches!r}")
    if not isinstance(p.idle_probe_every, int) or p.idle_probe_every < p.probe_every:
        raise DecodingError(f"auto W: idle_probe_every must be an integer >= probe_every "
                            f"({p.probe_every}), got {p.idle_probe_every!r}")
    if not isinstance(p.score_bins, int) or isinstance(p.score_bins, bool) or p.score_bins < 1:
        raise DecodingError(f"auto W: score_bins must be an integer >= 1, got {p.score_bins!r}")
    if not 0 <= p.min_gain < 1:
        raise DecodingError(f"auto W: min_gain must be in [0, 1), got {p.min_gain!r}")
    if not 0 <= p.close_margin < 1:
        raise DecodingError(f"auto W: close_margin must be in [0, 1), got {p.close_margin!r}")
    if not (0 < p.decay <= 1 and 0 < p.gate_decay <= 1 and 0 <= p.prior <= 1
            and p.prior_weight > 0):
        raise DecodingError(f"auto W: need 0 < decay <= 1, 0 < gate_decay <= 1, 0 <= prior <= 1, "
                            f"prior_weight > 0; got {p.decay}, {p.gate_decay}, {p.prior}, "
                            f"{p.prior_weight}")
    return dataclasses.replace(p, max_width=w, costs=(), width=0)


def check_request(config, tokens_per_step: int, prompt_ids, max_new_tokens: int) -> None:
    """A decoding call's prompts (token ids in the vocabulary, none empty) and length (room
    for max_new_tokens and the W - 1 drafts in max_seq_len); DecodingError naming what is
    wrong."""
    if max_new_tokens < 1:
        raise DecodingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise DecodingError("no prompts given")
    vocab = config.vocab_size
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise DecodingError(f"prompt {i} has no tokens")
        low, high = int(min(ids)), int(max(ids))
        if low < 0 or high >= vocab:
            raise DecodingError(f"prompt {i} holds token id {high if high >= vocab else low}, "
                                f"outside the model's vocabulary 0..{vocab - 1} (is the "
                                f"tokenizer the model's own?)")
    longest, w = int(max(len(p) for p in prompt_ids)), tokens_per_step
    if longest + max_new_tokens + w - 1 > config.max_seq_len:
        drafts = f" + {w - 1} drafts" if w > 1 else ""
        raise DecodingError(f"prompt of {longest} tokens + {max_new_tokens} new tokens"
                            f"{drafts} exceeds the model's max_seq_len "
                            f"{config.max_seq_len}")


def resolve_matmul(matmul: str) -> str:
    """"auto" -> "few_rows" where the kernels are available (CPU, built), else "xla"."""
    if matmul == "auto":
        from gptk_jax.kernels import few_rows
        return "few_rows" if few_rows.available() else "xla"
    if matmul not in MATMULS:
        raise DecodingError(f"Decoder matmul must be {' or '.join(map(repr, ('auto',) + MATMULS))}"
                            f", got {matmul!r}")
    return matmul
