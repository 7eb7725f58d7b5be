"""Grouped-query attention over the explicit KV cache (one path for training, prefill, decode).

Letters: B batch, T new tokens, S cache slots, D width, N query heads, K kv heads, G = N // K,
H head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.kv_cache import write_layer
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

    @nn.compact
    def __call__(self, x, positions, inv_freq, mask, cache_k, cache_v, write_start, layer=None):
        """x [B,T,D]; positions [B,T]; mask [B,T,S]; write_start [B]; cache_k/v either this
        layer's [B,K,S,H] (layer None) or the stacked [L,B,K,S,H] with `layer` the index to use.

        Returns (out [B,T,D], cache_k, cache_v) with the T new keys/values written (same form).
        """
        dense = lambda feats, name: nn.DenseGeneral(
            feats, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q = dense((self.n_heads, self.head_dim), "wq")(x)       # [B,T,N,H]
        k = dense((self.n_kv_heads, self.head_dim), "wk")(x)    # [B,T,K,H]
        v = dense((self.n_kv_heads, self.head_dim), "wv")(x)    # [B,T,K,H]
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        cache_k = write_layer(cache_k, k, write_start, layer)
        cache_v = write_layer(cache_v, v, write_start, layer)
        keys = cache_k if layer is None else cache_k[layer]     # [B,K,S,H]
        values = cache_v if layer is None else cache_v[layer]   # [B,K,S,H]

        b, t = x.shape[:2]
        groups = self.n_heads // self.n_kv_heads
        q = q.reshape(b, t, self.n_kv_heads, groups, self.head_dim)  # [B,T,K,G,H]
        scores = jnp.einsum("btkgh,bksh->bkgts", q, keys.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        scores = scores / np.sqrt(self.head_dim).astype(np.float32)
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B,K,G,T,S]
        attended = jnp.einsum("bkgts,bksh->btkgh", probs, values.astype(self.dtype))
        attended = attended.reshape(b, t, self.n_heads, self.head_dim)  # [B,T,N,H]
        out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="wo")(attended)
        return out, cache_k, cache_v
