"""Decoding: strategies (logits -> token), jitted loops over a small state pytree, and facades.

`greedy` holds the shared pieces other decoders reuse: `pad_prompts` / `PromptBatch` (left or
right padding, bucketed lengths), `prefill`, `stop_id_array` / `stop_mask`.
"""

from gptk_jax.decoding.greedy import (
    DecodeState, GenerationResult, Prefilled, PromptBatch, bucket_length, cache_slots,
    decode_loop, decode_step, greedy_generate, greedy_pick, init_state, pad_prompts, prefill,
    stop_id_array, stop_mask)

__all__ = [
    "DecodeState", "GenerationResult", "Prefilled", "PromptBatch", "bucket_length", "cache_slots",
    "decode_loop", "decode_step", "greedy_generate", "greedy_pick", "init_state", "pad_prompts",
    "prefill", "stop_id_array", "stop_mask",
]
