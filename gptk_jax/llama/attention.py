"""Grouped-query attention over the explicit KV cache (one path for training, prefill, decode).

Letters: B batch, T new tokens, S cache slots, D width, N query heads, K kv heads, G = N // K,
H head dim.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.kv_cache import write_layer, write_merged
from gptk_jax.llama.rope import apply_rope

NEG_INF = float(np.finfo(np.float32).min)


def attention_mask(valid: jax.Array, write_start: jax.Array, num_new: int) -> jax.Array:
    """[B,T,S] bool: query t of row b (at slot write_start[b]+t) sees valid slots at or before it."""
    slots = jnp.arange(valid.shape[1])[None, None, :]                     # [1,1,S]
    query_slots = write_start[:, None, None] + jnp.arange(num_new)[None, :, None]  # [B,T,1]
    return valid[:, None, :] & (slots <= query_slots)


class Attention(nn.Module):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dot_general: Callable = jax.lax.dot_general   # of the projections (kernels/few_rows.py)
    fused: bool = False      # q, k, v as one product (param "wqkv" [D,N+2K,H]: model.py)

    @nn.compact
    def __call__(self, x, positions, inv_freq, mask, cache_k, cache_v, write_start):
        """x [B,T,D]; positions [B,T]; mask [B,T,S]; write_start [B]; cache_k/v this layer's
        [B,K,S,H].

        Returns (out [B,T,D], cache_k, cache_v) with the T new keys/values written.
        """
        dense = lambda feats, name: nn.DenseGeneral(
            feats, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            dot_general=self.dot_general)
        n, kv_heads = self.n_heads, self.n_kv_heads
        if self.fused:
            qkv = dense((n + 2 * kv_heads, self.head_dim), "wqkv")(x)      # [B,T,N+2K,H]
            q, k, v = jnp.split(qkv, (n, n + kv_heads), axis=-2)
        else:
            q = dense((n, self.head_dim), "wq")(x)              # [B,T,N,H]
            k = dense((kv_heads, self.head_dim), "wk")(x)       # [B,T,K,H]
            v = dense((kv_heads, self.head_dim), "wv")(x)       # [B,T,K,H]
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        # Both products as one batched matmul over B*K (kv head) batches with the G query heads
        # of a group and the T tokens merged into the rows: XLA:CPU runs a dot with one leading
        # batch dimension as a batched GEMM, while the equivalent einsum over (b, k) batches
        # was 2.5-3x slower at B=8 decode (docs/benchmarks.md, bench/bench_attention.py).
        b, t = x.shape[:2]
        kv, groups, hd = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        s = cache_k.shape[2]
        if b == 1:
            # Written in the [K,S,H] view the products read: at batch 1 that view of [1,K,S,H]
            # is a bitcast, and a write in the 4-d layout came out as two fusions (one per
            # reader), each copying the whole buffer first: 4 copies of every layer's cache a
            # step (docs/benchmarks.md, session 26). At batch 8 the 4-d write stays in place.
            keys = write_merged(cache_k.reshape(kv, s, hd), k, write_start)      # [K,S,H]
            values = write_merged(cache_v.reshape(kv, s, hd), v, write_start)    # [K,S,H]
            cache_k, cache_v = keys.reshape(b, kv, s, hd), values.reshape(b, kv, s, hd)
        else:
            cache_k = write_layer(cache_k, k, write_start)                       # [B,K,S,H]
            cache_v = write_layer(cache_v, v, write_start)
            keys, values = cache_k.reshape(b * kv, s, hd), cache_v.reshape(b * kv, s, hd)
        q = q.reshape(b, t, kv, groups, hd).transpose(0, 2, 3, 1, 4)   # [B,K,G,T,H]
        q = q.reshape(b * kv, groups * t, hd)                          # [BK,GT,H]
        keys, values = keys.astype(self.dtype), values.astype(self.dtype)
        scores = jax.lax.dot_general(q, keys, (((2,), (2,)), ((0,), (0,))),
                                     preferred_element_type=jnp.float32)  # [BK,GT,S]
        scores = scores.reshape(b, kv, groups, t, s) / np.sqrt(hd).astype(np.float32)
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)    # [B,K,G,T,S]
        probs = probs.reshape(b * kv, groups * t, s)                   # [BK,GT,S]
        attended = jax.lax.dot_general(probs, values, (((2,), (1,)), ((0,), (0,))))  # [BK,GT,H]
        attended = attended.reshape(b, kv, groups, t, hd).transpose(0, 3, 1, 2, 4)
        attended = attended.reshape(b, t, self.n_heads, hd)           # [B,T,N,H]
        out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="wo",
                              dot_general=self.dot_general)(attended)
        return out, cache_k, cache_v
