"""Greedy decoding as one call: token ids in, token ids out (`greedy_generate`).

Greedy is the no-drafter case of the one decoding loop (decoding/loop.py: W = 1, `NoDrafter`;
each step feeds the trunk the last token and emits its argmax), run by a `Decoder`
(decoding/engine.py). This function builds a fresh Decoder per call, so it compiles every call:
to decode many batches, hold one `Decoder` and call its `generate`.

Letters: B batch, P padded prompt length, M max new tokens (K is kept for kv heads).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from gptk_jax.decoding.engine import Decoder
from gptk_jax.decoding.inputs import DEFAULT_BUCKET
from gptk_jax.decoding.results import GenerationResult
from gptk_jax.llama.config import LlamaConfig


def greedy_generate(model_config: LlamaConfig, params: dict, prompt_ids: Sequence[Sequence[int]],
                    max_new_tokens: int, stop_ids: Iterable[int], pad_id: int, *,
                    padding: str = "left", bucket: int = DEFAULT_BUCKET,
                    batch_size: Optional[int] = None) -> GenerationResult:
    """Greedy continuation of each prompt (one batch), up to max_new_tokens or a stop id.

    `params` stacked or in the layout `Llama(model_config)` expects; `batch_size` pads the batch
    with inactive rows. See `Decoder.generate`.
    """
    decoder = Decoder(model_config, params, stop_ids=stop_ids, pad_id=pad_id)
    return decoder.generate(prompt_ids, max_new_tokens, padding=padding, bucket=bucket,
                            batch_size=batch_size)
