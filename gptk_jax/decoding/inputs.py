"""What the decoder's executables take from the host: padded prompt batches and stop ids.

    prompt ids (lists) --pad_prompts--> PromptBatch [B,P]      host, numpy
    stop ids (a set)   --stop_id_array--> [n] int32            host, numpy
    is_stop(tokens, stop_ids)                                  inside jit: the one stop check

Padding. LEFT: pads first, RoPE positions = cumsum(mask)-1, pad slots stay invalid in the cache;
every row's next slot is P. RIGHT: pads last, positions = arange; after prefill the cache
`lengths` are set to each row's real prompt length, so the first decode step overwrites the first
pad slot (a query never sees slots past its own, see llama/kv_cache.py). Both give the tokens a
row gets alone.

Shared prefix. `pad_suffixes` pads what follows a prefix every row shares (prefilled once,
loop.SharedPrefix) RIGHT, at positions P.., cache lengths P + n_b: the right padding above with
the prefix's P slots in front.

Compilation. Prompt lengths are rounded up to a multiple of `bucket`, a short last batch is
filled with inactive rows (`batch_size`), and stop-id arrays are padded with -1 to a multiple of
STOP_IDS_MULTIPLE, so one executable serves many calls.

Letters: B batch, P padded prompt length.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PADDING_MODES = ("left", "right")
DEFAULT_BUCKET = 32
STOP_IDS_MULTIPLE = 8  # stop-id arrays are padded (with -1) to this multiple: fewer recompiles


@flax.struct.dataclass
class PromptBatch:
    """Padded prompts, ready for the prefill (numpy on the host, traced inside jit)."""
    tokens: Any          # [B,P] int32, pad_id at padding
    token_mask: Any      # [B,P] bool, False at padding
    positions: Any       # [B,P] int32 RoPE positions (left: cumsum(mask)-1; right: arange)
    prompt_lengths: Any  # [B] int32 real prompt lengths
    last_index: Any      # [B] int32 index in P of each row's last real token
    cache_lengths: Any   # [B] int32 cache `lengths` after prefill (left: P; right: prompt length)
    active: Any          # [B] bool, False for filler rows added to reach `batch_size`

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def padded_length(self) -> int:
        return self.tokens.shape[1]


def bucket_length(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket` (bucket <= 1: unchanged)."""
    if bucket <= 1:
        return length
    return -(-length // bucket) * bucket


def refill_rows(n: int, cap: int) -> int:
    """Rows a refill of n prompts prefills: the next power of two, at most cap (few shapes)."""
    r = 1
    while r < n:
        r *= 2
    return min(r, cap)


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int, *, padding: str = "left",
                bucket: int = DEFAULT_BUCKET, batch_size: Optional[int] = None) -> PromptBatch:
    """Pads ragged prompts to [B, bucket_length(max len)], B = batch_size or len(prompt_ids).

    Rows beyond len(prompt_ids) are inactive fillers (one pad token) whose output is discarded.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if not prompt_ids:
        raise ValueError("no prompts given")
    lengths = [len(p) for p in prompt_ids]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one "
                         "token (encode with bos=True)")
    rows = batch_size or len(prompt_ids)
    if rows < len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts do not fit in batch_size {rows}")
    width = bucket_length(max(lengths), bucket)
    lengths = np.array(lengths + [1] * (rows - len(prompt_ids)), np.int32)
    tokens = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), bool)
    for b in range(rows):
        ids = prompt_ids[b] if b < len(prompt_ids) else [pad_id]
        if padding == "left":
            tokens[b, width - len(ids):] = ids
            mask[b, width - len(ids):] = True
        else:
            tokens[b, :len(ids)] = ids
            mask[b, :len(ids)] = True
    if padding == "left":
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        last_index = np.full((rows,), width - 1, np.int32)
        cache_lengths = np.full((rows,), width, np.int32)
    else:
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy()
        last_index = lengths - 1
        cache_lengths = lengths.copy()
    active = np.arange(rows) < len(prompt_ids)
    return PromptBatch(tokens=tokens, token_mask=mask, positions=positions,
                       prompt_lengths=lengths, last_index=last_index.astype(np.int32),
                       cache_lengths=cache_lengths, active=active)


def pad_suffixes(prompt_ids: Sequence[Sequence[int]], prefix_length: int, pad_id: int, *,
                 bucket: int = DEFAULT_BUCKET, batch_size: Optional[int] = None) -> PromptBatch:
    """The prompts less their first `prefix_length` tokens (each keeps >= 1), right-padded to
    [B, bucket_length(longest suffix)]: positions, prompt lengths and cache lengths count the
    prefix (P + ...); last_index indexes the suffix. Filler rows: one pad token after it."""
    p = int(prefix_length)
    if any(len(ids) <= p for ids in prompt_ids):
        raise ValueError(f"every prompt needs at least one token after the {p}-token prefix")
    batch = pad_prompts([list(ids)[p:] for ids in prompt_ids], pad_id, padding="right",
                        bucket=bucket, batch_size=batch_size)
    return batch.replace(positions=batch.positions + np.int32(p),
                         prompt_lengths=batch.prompt_lengths + np.int32(p),
                         cache_lengths=batch.cache_lengths + np.int32(p))


def stop_id_array(stop_ids: Iterable[int]) -> np.ndarray:
    """Stop ids as an int32 array padded with -1 to a multiple of STOP_IDS_MULTIPLE."""
    ids = sorted({int(i) for i in stop_ids})
    size = max(STOP_IDS_MULTIPLE, bucket_length(len(ids), STOP_IDS_MULTIPLE))
    return np.array(ids + [-1] * (size - len(ids)), np.int32)


def is_stop(tokens: jax.Array, stop_ids) -> jax.Array:
    """tokens [...] -> [...] bool: tokens that are one of stop_ids (a sequence or an int32 array;
    -1 entries, `stop_id_array`'s padding, match nothing)."""
    stop = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    return (tokens[..., None] == stop).any(axis=-1)
