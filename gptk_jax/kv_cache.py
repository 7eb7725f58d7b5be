"""The explicit KV cache: an argument and a result of every trunk call, never hidden state.

Slots are per row: row b's T new keys go to slots `lengths[b] .. lengths[b]+T-1`. `valid` marks
slots that hold a real token (left padding stays invalid forever). Rolling back after a rejected
draft is `cache.replace(lengths=…)`: stale slots past `lengths` are overwritten by the next write
and never seen before that, because a query at slot q only sees slots <= q.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from gptk_jax.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array        # [L,B,S,K,H]
    v: jax.Array        # [L,B,S,K,H]
    valid: jax.Array    # [B,S] bool
    lengths: jax.Array  # [B] int32, slots filled so far

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or config.dtype
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def write_rows(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new [B,T,...] into buffer [B,S,...] at per-row slot offsets start [B]."""
    def one(buf, upd, s):
        return jax.lax.dynamic_update_slice_in_dim(buf, upd, s, axis=0)
    return jax.vmap(one)(buffer, new.astype(buffer.dtype), start)
