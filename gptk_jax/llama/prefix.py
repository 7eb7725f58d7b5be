"""Shared-prefix prefill: the tokens every prompt starts with run through the trunk once.

Few-shot prompts repeat the same instruction and shots in every row (2-shot WMT prompts: ~155 of
~290 tokens). Instead of prefilling B whole prompts, the prefix is prefilled once at batch 1,
its KV cache broadcast over the batch, and only each row's own suffix is run:

    P = common_prefix_length(rows)               # tokens all rows share (capped, see below)
    shared = prefill_prefix(config, params, rows[0][:P], max_len=S)      # KVCache [1,K,S,H]
    out = extend_rows(config, params, shared, [r[P:] for r in rows])   # TrunkOutput [B,T,...]

`extend_rows` lays the suffixes out right-padded after the prefix (row b's suffix at slots
P .. P+n_b-1, RoPE positions P .. P+n_b-1, padding invalid) and returns the cache with
`lengths = P + n_b`, so decoding continues at each row's own next slot (slots past a row's length
are overwritten before they are ever attended, llama/kv_cache.py). Every query sees exactly the
keys it would see in a whole-prompt prefill at the same positions, so logits, hidden states and
argmax tokens equal a whole-prompt prefill up to float32 rounding (the products are blocked
differently); tests/test_shared_prefix.py checks this against prefilling each prompt whole.

Each row's suffix must hold at least one token (the last prompt token's logits are the first
prediction), so the prefix is capped at the shortest row's length - 1.

Letters: B batch, P prefix tokens, T longest suffix, S cache slots, K kv heads, H head dim,
D width, V vocab.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama, TrunkOutput


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, capped so each row keeps >= 1 token of its own."""
    if not rows:
        return 0
    first = list(rows[0])
    n = min(len(r) for r in rows) - 1
    for row in rows[1:]:
        row = list(row)
        m = 0
        while m < n and row[m] == first[m]:
            m += 1
        n = m
    return max(n, 0)


@partial(jax.jit, static_argnames=("config", "max_len"))
def _prefill(config: LlamaConfig, params, prefix, max_len: int) -> KVCache:
    cache = KVCache.init(config, 1, max_len)
    positions = jnp.arange(prefix.shape[1], dtype=jnp.int32)[None]         # [1,P]
    out = Llama(config).apply({"params": params}, prefix, positions, cache,
                              compute_logits=False)
    return out.cache


def prefill_prefix(config: LlamaConfig, params, prefix_ids: Sequence[int], *,
                   max_len: int) -> KVCache:
    """The KV cache [1,K,S,H] (S = max_len) after the prefix tokens; params in the layout of
    `Llama(config)` (llama.model.params_for_model)."""
    if len(prefix_ids) == 0:
        return KVCache.init(config, 1, max_len)
    if len(prefix_ids) >= max_len:
        raise ValueError(f"a prefix of {len(prefix_ids)} tokens does not fit {max_len} cache slots")
    prefix = jnp.asarray(np.asarray(prefix_ids, np.int32)[None])            # [1,P]
    return _prefill(config, params, prefix, max_len)


def broadcast_cache(cache: KVCache, batch: int) -> KVCache:
    """A batch-1 cache repeated over `batch` rows (each row gets its own buffers when written)."""
    rep = lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:])
    return KVCache(k=tuple(rep(k) for k in cache.k), v=tuple(rep(v) for v in cache.v),
                   valid=rep(cache.valid), lengths=rep(cache.lengths))


@partial(jax.jit, static_argnames=("config", "compute_logits"))
def _extend(config: LlamaConfig, params, cache: KVCache, suffix, suffix_lengths,
            compute_logits: bool = True) -> TrunkOutput:
    b, t = suffix.shape
    cache = broadcast_cache(cache, b)
    start = cache.lengths                                                    # [B] = P
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]       # [B,T]
    token_mask = jnp.arange(t)[None] < suffix_lengths[:, None]               # [B,T]
    out = Llama(config).apply({"params": params}, suffix, positions, cache, token_mask,
                              compute_logits=compute_logits)
    return out.replace(cache=out.cache.replace(lengths=start + suffix_lengths))


def pad_suffixes(suffixes: Sequence[Sequence[int]], pad_id: int, bucket: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded suffixes [B,T] (T rounded up to a multiple of bucket) and their lengths [B]."""
    lengths = np.array([len(s) for s in suffixes], np.int32)
    if lengths.size == 0 or lengths.min() < 1:
        raise ValueError("every row needs at least one token after the shared prefix")
    t = -(-int(lengths.max()) // bucket) * bucket
    out = np.full((len(suffixes), t), pad_id, np.int32)
    for i, s in enumerate(suffixes):
        out[i, :len(s)] = s
    return out, lengths


def extend_rows(config: LlamaConfig, params, prefix_cache: KVCache,
                suffixes: Sequence[Sequence[int]], *, pad_id: int = 0, bucket: int = 1,
                compute_logits: bool = True) -> TrunkOutput:
    """Runs each row's suffix after the shared prefix -> TrunkOutput with logits / hidden
    [B,T,...] (row b's real positions are 0 .. n_b-1, the rest padding) and the cache [B,...]
    with lengths P + n_b. The prefix cache needs room for P + T (+ what decoding adds)."""
    tokens, lengths = pad_suffixes(suffixes, pad_id, bucket)
    p = int(np.asarray(prefix_cache.lengths)[0])
    if p + tokens.shape[1] > prefix_cache.max_len:
        raise ValueError(f"prefix {p} + suffix {tokens.shape[1]} tokens exceed the cache's "
                         f"{prefix_cache.max_len} slots")
    return _extend(config, params, prefix_cache, jnp.asarray(tokens), jnp.asarray(lengths),
                   compute_logits)
