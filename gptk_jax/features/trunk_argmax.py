"""The frozen trunk's own next-token argmax, a chunk of positions at a time: the
self-distillation targets and evaluation (training/step.py) read it, and `trunk_fn`
(features/cache.py, bench/probe_heads.py); the cache's build takes its own apart
(`_SpanArgmax`).

Letters: B batch, T positions, C chunk, D width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptk_jax.kernels.argmax import first_argmax
from gptk_jax.heads import trunk_unembed
from gptk_jax.llama.config import LlamaConfig


def chunked_argmax(trunk_config: LlamaConfig, trunk_params: dict, hidden_normed: jax.Array,
                   chunk: int) -> jax.Array:
    """hidden_normed [B,T,D] -> the trunk's next-token argmax [B,T] int32, unembedding `chunk`
    positions at a time so only [B,C,V] logits exist at once."""
    b, t, d = hidden_normed.shape
    n = -(-t // chunk)
    h = jnp.pad(hidden_normed, ((0, 0), (0, n * chunk - t), (0, 0)))
    h = jnp.moveaxis(h.reshape(b, n, chunk, d), 1, 0)                    # [n,B,C,D]
    best = jax.lax.map(lambda x: first_argmax(trunk_unembed(trunk_config, trunk_params, x)),
                       h)                                                  # [n,B,C]
    return jnp.moveaxis(best, 0, 1).reshape(b, n * chunk)[:, :t]
