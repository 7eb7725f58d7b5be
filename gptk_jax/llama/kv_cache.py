"""The explicit KV cache: an argument and a result of every trunk call, never hidden state.

Slots are per row: row b's T new keys go to slots `lengths[b] .. lengths[b]+T-1`. `valid` marks
slots that hold a real token (left padding stays invalid forever). Rolling back after a rejected
draft is `cache.replace(lengths=…)`: stale slots past `lengths` are overwritten by the next write
and never seen before that, because a query at slot q only sees slots <= q.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from gptk_jax.llama.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
    """One key and one value buffer per layer (kv heads before slots: attention reads [B,K,S,H]
    as is). Separate buffers, not one stacked [L,B,K,S,H] array: each layer's attention reads its
    own buffer in place, where a layer sliced out of a stacked array is copied first (at batch 8
    those copies were ~10 % of a decode step, docs/benchmarks.md)."""
    k: tuple            # L x [B,K,S,H]
    v: tuple            # L x [B,K,S,H]
    valid: jax.Array    # [B,S] bool
    lengths: jax.Array  # [B] int32, slots filled so far

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or config.dtype
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
        return cls(k=zeros(), v=zeros(), valid=jnp.zeros((batch, max_len), bool),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def write_rows(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new [B,T,...] into buffer [B,S,...] at per-row slot offsets start [B]."""
    def one(buf, upd, s):
        return jax.lax.dynamic_update_slice_in_dim(buf, upd, s, axis=0)
    return jax.vmap(one)(buffer, new.astype(buffer.dtype), start)


def write_layer(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes new keys or values [B,T,K,H] at per-row slots start[b] .. start[b]+T-1 into a
    layer's cache [B,K,S,H].

    One scatter of B*T slots straight into the (loop-carried) buffer, which XLA updates in place.
    A vmap of dynamic_update_slice over the batch axis transposes the buffer instead (measured,
    docs/benchmarks.md).
    """
    batch, t = new.shape[:2]
    rows = jnp.arange(batch)[:, None]                              # [B,1]
    slots = start[:, None] + jnp.arange(t)[None, :]                # [B,T]
    new = new.astype(buffer.dtype)     # [B,T,K,H]: the advanced indices' dims come first
    return buffer.at[rows, :, slots].set(new, mode="drop", unique_indices=True)


def write_merged(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """write_layer into a layer's cache viewed as [B*K,S,H] (batch and kv heads merged, as
    attention's products read it): new [B,T,K,H] goes to rows b*K+k, slots start[b] ..
    start[b]+T-1; returns the [B*K,S,H] view."""
    batch, t, heads = new.shape[:3]
    rows = jnp.arange(batch)[:, None, None] * heads + jnp.arange(heads)[None, None, :]  # [B,1,K]
    slots = jnp.broadcast_to(start[:, None, None] + jnp.arange(t)[None, :, None],
                             (batch, t, heads))                                         # [B,T,K]
    return buffer.at[rows, slots].set(new.astype(buffer.dtype), mode="drop",
                                      unique_indices=True)
