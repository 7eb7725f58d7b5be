"""Self-speculative (blockwise parallel) decoding as one call: `mtp_generate`.

A drafter proposes W-1 tokens (offsets 2..W), one trunk call verifies them with the trunk's own
next token, and the longest agreeing prefix plus the trunk's bonus token is emitted: greedy
decoding's tokens, in fewer trunk calls. The step and the loop are decoding/loop.py's (shared
with greedy, W = 1); drafters: `HeadDrafter` (decoding/heads.py), `LookupDrafter`
(decoding/lookup.py), the bounds in decoding/oracle.py. This function builds a fresh `Decoder`
per call, so it compiles every call: to decode many batches, hold one `Decoder` (with
`drafter=`) and call its `generate`.

Letters: B batch, W tokens per verify step (the trunk's token + W-1 drafts), M max new tokens.
(K is kept for kv heads.)
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

from gptk_jax.decoding.engine import Decoder
from gptk_jax.decoding.inputs import DEFAULT_BUCKET
from gptk_jax.decoding.loop import Drafter
from gptk_jax.decoding.results import MTPResult
from gptk_jax.decoding.width import AutoWidth
from gptk_jax.llama.config import LlamaConfig


def mtp_generate(model_config: LlamaConfig, params: dict, drafter: Drafter, drafter_vars: Any,
                 prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Iterable[int], pad_id: int, *,
                 tokens_per_step: Union[int, str, AutoWidth], padding: str = "left",
                 bucket: int = DEFAULT_BUCKET, batch_size: Optional[int] = None,
                 verify_cost: Any = None) -> MTPResult:
    """Greedy continuation of each prompt (one batch) by draft-and-verify, W tokens per step
    (2 <= W <= drafter.max_drafts + 1; "auto": chosen per step by cost, decoding/width.py, from
    `verify_cost` or a measurement). Same tokens as `greedy.greedy_generate` with the same
    arguments; the result adds acceptance statistics (τ, per-row logs)."""
    decoder = Decoder(model_config, params, stop_ids=stop_ids, pad_id=pad_id, drafter=drafter,
                      drafter_vars=drafter_vars, tokens_per_step=tokens_per_step,
                      verify_cost=verify_cost)
    return decoder.generate(prompt_ids, max_new_tokens, padding=padding, bucket=bucket,
                            batch_size=batch_size)
