"""Trunk-feature cache: the frozen trunk's outputs for every training row, computed once and
memory-mapped, so every epoch after the build runs only the heads.

    CACHE_DIR/<fingerprint>/meta.json        what was cached and from what, the share count N;
                                             written last: the cache is complete
    CACHE_DIR/<fingerprint>/spans.npy        [R,3] int64 per row: flat offset, first position,
                                             length
    CACHE_DIR/<fingerprint>/pair_index.npy   [R] int64: the row's index among the input pairs
                                             (what batches carry as `example_index`)
    CACHE_DIR/<fingerprint>/shares/<i>-of-<N>/<field>.bin   flat [P_i,D] (hidden, hidden_normed)
                                             or [P_i] (trunk_argmax): share i's positions of the
                                             flat layout (features/shares.py)

Shares: a job of N processes (jax.distributed) splits the rows into N contiguous shares; process
i runs the trunk over share i only (its batches split over its local devices, data parallel),
then every process memory-maps every share, so training's batch assembly reads any row as
before. CACHE_DIR must then be on storage every process sees; a share that a process does not
see after the others finished is built there too. One process: one share. The fingerprint does
not depend on N, and neither do the values beyond float32 rounding (a share's rows may run in
calls of other lengths): a 2-process cache is the 1-process cache split in two
(tests/test_feature_shares.py), and a later run with another process count reuses it.

Positions: a row's span is [0, L) for the LSTM (it reads the whole sequence in order) and
[max(0, prompt - max offset), L) for PoMa / linear: every position that can be supervised and
every argmax its targets read. Fields: `hidden` (PoMa) or `hidden_normed` (LSTM, linear), and
`trunk_argmax` (int32, always: self-distillation targets and evaluation read it). Positions
outside the span come back as zeros: no head reads them. The fingerprint covers the trunk
(config, conversion record, path), every row's tokens and prompt length, the spans, the fields
and the dtype; a change gives a new folder. A share is written in a temporary folder and renamed
when complete, meta.json once every share is there, so an interrupted build is never read (and
a restart keeps the shares that were complete).

Build order: a share's rows sorted by length and run `build_batch_size` at a time (rounded up to
a multiple of the local devices), each trunk call padded to its longest row rounded up to
BUCKET_LENGTH_MULTIPLE (`gptk_jax.data.pipeline.length_sorted_batches`), so the trunk runs on
about the tokens the rows hold and compiles once per bucket length. Few-shot rows start with the
same instruction and shots: on one local device the longest prefix every row of the share holds
(up to the first cached position, at least MIN_SHARED_PREFIX tokens) is prefilled once and its
KV cache broadcast over each call, which then runs only the rows' own tokens after it
(llama/prefix.py; 2-shot WMT rows: about half of each row); meta.json's build record says how
long it was (`shared_prefix`).
Each call attends over the prefix and its own T slots only, and returns hidden states: the
trunk's argmax (a [*,V] unembedding, a fifth of a SmolLM2 position's products) is taken apart
(`_SpanArgmax`) at the cached positions only, not at the prompts' source tokens or the padding
(800 2-shot rows: 1.23x faster, the same values; docs/benchmarks.md). The stored values do not
depend on the order beyond float32 rounding (attention over a longer padded call accumulates in
other blocks; ~1e-6): causal attention never reads right padding, and
tests/test_feature_cache.py checks both orders against each other and against the trunk on
each row alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptk_jax.data.pipeline import length_sorted_batches
from gptk_jax.heads.config import HeadConfig
from gptk_jax.llama.model import Llama
from gptk_jax.llama.prefix import broadcast_cache, common_prefix_length, prefill_prefix
from gptk_jax.features.shares import (
    SHARE_RECORD, SHARE_WAIT_SECONDS, CacheError, ConcatenatedRows, all_processes, building,
    built_by, log_on_every_process, positions_of, read_share_records, remove_other_counts,
    replace_atomically, share_complete, share_folder, share_rows, wait_for_shares)
from gptk_jax.features.trunk_argmax import chunked_argmax
from gptk_jax.heads import trunk_unembed
from gptk_jax.kernels.argmax import first_argmax
from gptk_jax.llama.kv_cache import KVCache

FORMAT = 2                    # 2: field files in shares/<i>-of-<N>/ (1: in the folder itself)
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
MIN_SHARED_PREFIX = 16      # a shorter prefix common to every row is not run apart
BUILD_LENGTH_MULTIPLE = 32   # input-order build batches are padded to a multiple of this
BUCKET_LENGTH_MULTIPLE = 16  # length-sorted ones to a multiple of this. Each length compiles
                             # once (the unrolled 30-layer SmolLM2 at [16,128]: ~3 s here); the
                             # results rows' suffixes after the 157-token prefix (652,895 tokens)
                             # run as 854,016 tokens at 64 (6 lengths), 707,584 at 16 (18)


def build_groups(rows, batch_size: int, bucketed: bool = True) -> list[tuple[int, np.ndarray]]:
    """[(T, row indices)]: the trunk calls of a build. bucketed: by length
    (`length_sorted_batches`); else in input order, each padded to its longest row rounded up
    to BUILD_LENGTH_MULTIPLE (the order before bucketing, kept for comparison)."""
    lengths = [len(r.tokens) for r in rows]
    if bucketed:
        return length_sorted_batches(lengths, batch_size, BUCKET_LENGTH_MULTIPLE)
    groups = []
    for first in range(0, len(rows), batch_size):
        index = np.arange(first, min(first + batch_size, len(rows)))
        longest = max(lengths[i] for i in index)
        groups.append((-(-longest // BUILD_LENGTH_MULTIPLE) * BUILD_LENGTH_MULTIPLE, index))
    return groups


def cached_fields(head_config: HeadConfig) -> tuple[str, ...]:
    """The trunk output the head reads ('hidden' before the final norm: PoMa; else
    'hidden_normed') and the trunk's argmax (the targets)."""
    return (head_config.trunk_field, "trunk_argmax")


def row_spans(rows, head_config: HeadConfig) -> np.ndarray:
    """[R,3] int64: (flat offset, first position, number of positions) of each row."""
    whole = head_config.reads_sequence          # a context LSTM reads every position
    hi = max(head_config.offsets)
    starts = np.asarray([0 if whole else max(0, r.prompt_len - hi) for r in rows], np.int64)
    lengths = np.asarray([len(r.tokens) for r in rows], np.int64) - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.stack([offsets, starts, lengths], axis=1)


def fingerprint(trunk_path: Path, trunk_config, rows, spans: np.ndarray, fields, dtype: str) -> str:
    """The cache's folder name (not the process count: any count builds the same cache)."""
    h = hashlib.sha256()
    conversion = Path(trunk_path) / "conversion.json"
    h.update(json.dumps([FORMAT, str(Path(trunk_path).absolute()), trunk_config.to_dict(),
                         conversion.read_text() if conversion.is_file() else "", list(fields),
                         dtype], sort_keys=True, default=str).encode())
    for r in rows:
        h.update(r.tokens.tobytes())
        h.update(int(r.prompt_len).to_bytes(4, "little"))
        h.update(int(r.index).to_bytes(8, "little"))
    h.update(spans.tobytes())
    return h.hexdigest()[:20]


def _fields(trunk_config, trunk_params, out, argmax_chunk: Optional[int]) -> dict:
    """A trunk call's outputs as the cache reads them: hidden and hidden_normed [B,T,D], and
    the argmax [B,T] at every position when argmax_chunk is given."""
    fields = {"hidden": out.hidden, "hidden_normed": out.hidden_normed}
    if argmax_chunk is not None:
        fields["trunk_argmax"] = chunked_argmax(trunk_config, trunk_params, out.hidden_normed,
                                                argmax_chunk)
    return fields


def _trunk_pass(trunk_config, argmax_chunk: Optional[int]) -> Callable:
    def run(trunk_params, tokens, positions, token_mask):
        out = Llama(trunk_config).apply({"params": trunk_params}, tokens, positions,
                                        token_mask=token_mask, compute_logits=False)
        return _fields(trunk_config, trunk_params, out, argmax_chunk)
    return run


def trunk_fn(trunk_config, argmax_chunk: int) -> Callable:
    """jit (trunk_params, tokens, positions, token_mask [B,T]) -> {hidden, hidden_normed
    [B,T,D], trunk_argmax [B,T]}: the frozen trunk pass the cache stores."""
    return jax.jit(_trunk_pass(trunk_config, argmax_chunk))


def local_trunk_fn(trunk_config, argmax_chunk: int, trunk_params,
                   with_argmax: bool = True) -> tuple[Callable, dict, int]:
    """(run, params, L): `trunk_fn` data parallel over this process's L local devices (the
    batch's rows split over them, the trunk replicated on each); `params` placed so.
    with_argmax=False: hidden and hidden_normed only (the build takes the argmax apart)."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("rows",))
    rows, replicated = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
    run = jax.jit(_trunk_pass(trunk_config, argmax_chunk if with_argmax else None),
                  in_shardings=(replicated, rows, rows, rows), out_shardings=rows)
    return run, jax.device_put(trunk_params, replicated), len(devices)


class FeatureCache:
    """Read side: `attach(batch)` adds the cached fields for the batch's rows."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise CacheError(f"{self.folder}: cache format {self.meta.get('format')}, this "
                             f"version reads {FORMAT} (delete the folder to rebuild it)")
        self.spans = np.load(self.folder / "spans.npy")
        pair_index = np.load(self.folder / "pair_index.npy")
        self.row_of_pair = np.full(int(pair_index.max()) + 1, -1, np.int64)  # example_index -> row
        self.row_of_pair[pair_index] = np.arange(len(pair_index))
        count, dim = self.meta["shares"], self.meta["dim"]
        self.shares = read_share_records(self.folder, count, len(self.spans), self.spans)
        dtype = _DTYPES[self.meta["dtype"]]
        self.arrays = {}            # field -> flat [P, D] or [P] over the shares' memory-maps
        for field in self.meta["fields"]:
            parts = []
            for index, share in enumerate(self.shares):
                p0, p1 = share["positions"]
                shape, dt = ((p1 - p0,), np.int32) if field == "trunk_argmax" else \
                    ((p1 - p0, dim), dtype)
                path = share_folder(self.folder, index, count) / f"{field}.bin"
                parts.append(np.memmap(path, dtype=dt, mode="r", shape=shape) if p1 > p0
                             else np.zeros(shape, dt))      # a share of no rows has no file
            self.arrays[field] = ConcatenatedRows(parts, [s["positions"][0] for s in self.shares])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def attach(self, batch: dict) -> dict:
        """batch with `example_index` [B] -> + hidden / hidden_normed [B,T,D] float32 and
        trunk_argmax [B,T] int32 (zeros outside each row's span and for filler rows)."""
        b, t = batch["tokens"].shape
        out = dict(batch)
        for field, flat in self.arrays.items():
            shape, dt = ((b, t), np.int32) if field == "trunk_argmax" else \
                ((b, t, self.meta["dim"]), np.float32)
            dense = np.zeros(shape, dt)
            for row, index in enumerate(batch["example_index"]):
                if index < 0:
                    continue
                offset, start, length = self.spans[self.row_of_pair[index]]
                dense[row, start:start + length] = flat[offset:offset + length]
            out[field] = dense
        return out

    @classmethod
    def open_or_build(cls, cache_root: Path, trunk, rows, head_config: HeadConfig, dtype: str,
                      build_batch_size: int, argmax_chunk: int,
                      log: Callable[[str], None] = print, progress: bool = True,
                      bucketed: bool = True, argmax_apart: bool = True) -> "FeatureCache":
        """The cache of `rows` under cache_root (built unless there); bucketed=False builds in
        input order (same values, more padding: for benchmarks and tests); argmax_apart=False
        takes the argmax in the trunk call at every position and attends over the whole prefix
        cache (the build before `_SpanArgmax`: same values, for the benchmark). Under
        jax.distributed every process must call it (collective): each builds its own share."""
        spans = row_spans(rows, head_config)
        fields = cached_fields(head_config)
        key = fingerprint(trunk.path, trunk.config, rows, spans, fields, dtype)
        folder = Path(cache_root) / key
        if all_processes((folder / "meta.json").is_file()):
            log(f"feature cache: reusing {folder}")
            return cls(folder)
        start_time = time.perf_counter()
        index, count = jax.process_index(), jax.process_count()
        args = (folder, trunk, rows, spans, fields, dtype, build_batch_size, argmax_chunk,
                bucketed)
        own = build_share(*args, index, count, progress=progress, argmax_apart=argmax_apart)
        all_processes(True)          # barrier: every process has its share (built or found)
        for other in wait_for_shares(folder, count, SHARE_WAIT_SECONDS if count > 1 else 0.0):
            log_on_every_process(
                f"feature cache: share {other}-of-{count} is not in {folder} after the other "
                f"processes built it: building it here too (put features.cache_dir on storage "
                f"every process sees, so each process builds only its own share)", log)
            build_share(*args, other, count, progress=False, argmax_apart=argmax_apart)
        write_meta(folder, trunk, rows, spans, fields, dtype, count)
        if index == 0:
            remove_other_counts(folder, count)
        cache = cls(folder)
        build, mine = cache.meta["build"], cache.shares[index]
        log(f"feature cache: built {folder} in {time.perf_counter() - start_time:.1f}s "
            f"({len(rows)} rows, {cache.meta['num_positions']} positions, "
            f"{cache.nbytes / 2**20:.1f} MiB; the trunk ran on {build['trunk_tokens']} tokens "
            f"for {build['row_tokens']} in the rows, {len(build['lengths'])} lengths; "
            f"{count} share(s), this process's rows [{mine['rows'][0]}, {mine['rows'][1]}) "
            f"{'built' if own else 'found complete'})")
        return cache


def build_share(folder: Path, trunk, rows, spans: np.ndarray, fields, dtype: str,
                build_batch_size: int, argmax_chunk: int, bucketed: bool, index: int,
                count: int, progress: bool = False, argmax_apart: bool = True) -> bool:
    """Builds share `index` of `count` of the cache `folder` (rows `share_rows`, spans [R,3] of
    all rows) unless it is complete there; True when this call built it."""
    final = share_folder(folder, index, count)
    if share_complete(final):
        return False
    first, last = share_rows(len(rows), index, count)
    p0, p1 = positions_of(spans, first, last)
    local = spans[first:last].copy()
    local[:, 0] -= p0                                   # offsets within the share's files
    with building(final) as tmp:
        stats = _build(tmp, trunk, rows[first:last], local, fields, dtype, build_batch_size,
                       argmax_chunk, bucketed, argmax_apart, progress)
        (tmp / SHARE_RECORD).write_text(json.dumps(
            {"index": index, "count": count, "rows": [first, last], "positions": [p0, p1],
             "built_by": built_by(), **stats}, indent=2))
    return True


def write_meta(folder: Path, trunk, rows, spans: np.ndarray, fields, dtype: str,
               count: int) -> None:
    """spans.npy, pair_index.npy, then meta.json (each replaced atomically: every process of a
    job may write them, with the same content) once the `count` shares are complete."""
    shares = read_share_records(folder, count, len(rows), spans)
    build = {"trunk_tokens": sum(s["build"]["trunk_tokens"] for s in shares),
             "row_tokens": sum(s["build"]["row_tokens"] for s in shares),
             "lengths": sorted({t for s in shares for t in s["build"]["lengths"]}),
             "shared_prefix": max(s["build"].get("shared_prefix", 0) for s in shares)}
    pair_index = np.asarray([r.index for r in rows], np.int64)
    replace_atomically(folder / "spans.npy", lambda f: np.save(f, spans))
    replace_atomically(folder / "pair_index.npy", lambda f: np.save(f, pair_index))
    meta = {"format": FORMAT, "num_rows": len(rows), "num_positions": int(spans[:, 2].sum()),
            "dim": trunk.config.dim, "fields": list(fields), "dtype": dtype,
            "trunk": str(trunk.path), "shares": count, "build": build}
    replace_atomically(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=2)
                                                               .encode()))


def shared_prefix_length(rows, spans: np.ndarray) -> int:
    """Tokens every row starts with (few-shot prompts: instruction + shots), capped at the first
    cached position of every row: what the shared-prefix build runs once."""
    if not rows:
        return 0
    return min(common_prefix_length([r.tokens for r in rows]), int(spans[:, 1].min()))


def _suffix_pass(trunk_config, prefix: int, argmax_chunk: Optional[int] = None) -> Callable:
    """jit (params, prefix cache [1,K,S,H], suffix tokens, token_mask [B,T]) -> hidden and
    hidden_normed [B,T,D] at the suffix positions (RoPE positions P .. P+T-1 after the
    P = `prefix`-token prefix), attending over the cache's first P + T slots only (the rest hold
    nothing). With argmax_chunk: the argmax at every position too, over the whole cache (the
    build before `_SpanArgmax`, kept for bench/bench_train.py --compare-build argmax)."""
    def run(trunk_params, prefix_cache, tokens, token_mask):
        b, t = tokens.shape
        if argmax_chunk is None:
            prefix_cache = _cut_cache(prefix_cache, prefix + t)
        cache = broadcast_cache(prefix_cache, b)
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]   # [B,T]
        out = Llama(trunk_config).apply({"params": trunk_params}, tokens, positions, cache,
                                        token_mask, compute_logits=False)
        return _fields(trunk_config, trunk_params, out, argmax_chunk)
    return jax.jit(run)


def _cut_cache(cache: KVCache, slots: int) -> KVCache:
    """The cache's first `slots` slots."""
    return KVCache(k=tuple(k[:, :, :slots] for k in cache.k),
                   v=tuple(v[:, :, :slots] for v in cache.v),
                   valid=cache.valid[:, :slots], lengths=cache.lengths)


class _SpanArgmax:
    """The trunk's next-token argmax at the cached positions only (not at the prompt's source
    tokens or the padding the trunk calls hold: 2-shot WMT rows cache about a third of the
    positions a build runs): their hidden_normed rows (the trunk's dtype, as the call returned
    them) gathered on the host and unembedded CHUNK at a time (one compile), written to `out`
    [P] at their flat offsets. With several local devices the params are replicated and each
    device unembeds the whole chunk (correct, not split; single-device hosts are the case
    this build is tuned for)."""

    CHUNK = 512       # positions per unembedding: [512,V] float32 logits (V 49,152: ~100 MB;
                      # 128,256: ~260 MB); loss.argmax_chunk sizes training's chunks only

    def __init__(self, trunk_config, trunk_params, out: np.ndarray):
        self.params, self.out = trunk_params, out
        self.fn = jax.jit(lambda p, h: first_argmax(trunk_unembed(trunk_config, p, h)))
        self.rows, self.offsets, self.count = [], [], 0

    def add(self, offset: int, hidden_normed: np.ndarray) -> None:
        """hidden_normed [n,D] of the positions at flat offsets offset .. offset+n-1."""
        self.rows.append(np.asarray(hidden_normed))
        self.offsets.append(offset + np.arange(len(hidden_normed)))
        self.count += len(hidden_normed)
        if self.count >= self.CHUNK:
            self._run(final=False)

    def finish(self) -> None:
        if self.count:
            self._run(final=True)

    def _run(self, final: bool) -> None:
        h, where = np.concatenate(self.rows), np.concatenate(self.offsets)
        n = len(h) if final else len(h) // self.CHUNK * self.CHUNK
        for first in range(0, n, self.CHUNK):
            part = h[first:first + self.CHUNK]
            padded = np.zeros((self.CHUNK, h.shape[1]), h.dtype)
            padded[:len(part)] = part
            best = np.asarray(jax.device_get(self.fn(self.params, padded)))
            self.out[where[first:first + len(part)]] = best[:len(part)]
        self.rows, self.offsets = [h[n:]], [where[n:]]
        self.count = len(h) - n


def _call_inputs(rows, index, prefix: int, batch_size: int, length: int,
                 pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens, token_mask [B,T] of one trunk call: the rows' tokens after the shared prefix,
    right-padded; batch_size rows always (filler rows all padding): one shape per length."""
    tokens = np.full((batch_size, length), pad_id, np.int32)
    token_mask = np.zeros((batch_size, length), bool)
    for i, row in enumerate(index):
        own = rows[row].tokens[prefix:]
        tokens[i, :len(own)] = own
        token_mask[i, :len(own)] = True
    return tokens, token_mask


@dataclasses.dataclass(frozen=True)
class _Suffix:            # what build_groups reads of a row: its tokens after the prefix
    tokens: np.ndarray


def _build(folder: Path, trunk, rows, spans: np.ndarray, fields, dtype: str, batch_size: int,
           argmax_chunk: int, bucketed: bool, argmax_apart: bool, progress: bool,
           shared_prefix: bool = True) -> dict:
    """Runs the trunk over `rows` (spans [R_i,3], offsets from 0) and writes folder/<field>.bin;
    returns {"seconds", "local_devices", "build": trunk / row tokens, trunk-call lengths}."""
    from tqdm import tqdm

    start_time = time.perf_counter()
    total, dim = int(spans[:, 2].sum()), trunk.config.dim
    run, params, devices = local_trunk_fn(trunk.config, argmax_chunk, trunk.params,
                                          with_argmax=not argmax_apart)
    batch_size = -(-batch_size // devices) * devices     # rows per trunk call, split evenly
    # the prefix every row shares runs once (one device: its cache is broadcast over the batch)
    prefix = shared_prefix_length(rows, spans) if shared_prefix and devices == 1 else 0
    if prefix < MIN_SHARED_PREFIX:
        prefix = 0
    groups = build_groups([_Suffix(r.tokens[prefix:]) for r in rows] if prefix else rows,
                          batch_size, bucketed) if rows else []
    if prefix:
        prefix_cache = prefill_prefix(trunk.config, params, rows[0].tokens[:prefix],
                                      max_len=prefix + max(length for length, _ in groups))
        run_suffix = _suffix_pass(trunk.config, prefix, None if argmax_apart else argmax_chunk)
    flat = {}
    for field in fields:
        shape, dt = ((total,), np.int32) if field == "trunk_argmax" else ((total, dim),
                                                                          _DTYPES[dtype])
        if total:
            flat[field] = np.memmap(folder / f"{field}.bin", dtype=dt, mode="w+", shape=shape)
    argmax = _SpanArgmax(trunk.config, params, flat["trunk_argmax"]) \
        if "trunk_argmax" in flat and argmax_apart else None
    stored = [f for f in flat if argmax is None or f != "trunk_argmax"]
    pad_id = int(trunk.tokenizer.pad_id)
    for length, index in tqdm(groups, desc="trunk features", unit="batch",
                              disable=not progress, leave=False):
        tokens, token_mask = _call_inputs(rows, index, prefix, batch_size, length, pad_id)
        if prefix:
            outputs = jax.device_get(run_suffix(params, prefix_cache, tokens, token_mask))
        else:
            positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
            outputs = jax.device_get(run(params, tokens, positions, token_mask))
        for i, row in enumerate(index):
            offset, start, n = spans[row]
            start -= prefix                             # position in the call's tokens
            for field in stored:
                flat[field][offset:offset + n] = outputs[field][i, start:start + n]
            if argmax is not None:
                argmax.add(offset, outputs["hidden_normed"][i, start:start + n])
    if argmax is not None:
        argmax.finish()
    for array in flat.values():
        array.flush()
    return {"seconds": time.perf_counter() - start_time, "local_devices": devices,
            "build": {"trunk_tokens": int(prefix + sum(batch_size * length
                                                       for length, _ in groups)),
                      "shared_prefix": int(prefix),
                      "row_tokens": int(sum(len(r.tokens) for r in rows)),
                      "lengths": sorted({int(length) for length, _ in groups})}}  # a compile each
