"""Trunk-feature cache: the frozen trunk's outputs for every training row, computed once and
memory-mapped, so every epoch after the build runs only the heads.

    CACHE_DIR/<fingerprint>/meta.json        what was cached and from what
    CACHE_DIR/<fingerprint>/spans.npy        [R,3] int64 per row: flat offset, first position, length
    CACHE_DIR/<fingerprint>/pair_index.npy   [R] int64: the row's index among the input pairs
                                             (what batches carry as `example_index`)
    CACHE_DIR/<fingerprint>/<field>.bin      flat [P,D] (hidden, hidden_normed) or [P] (trunk_argmax)

Positions: a row's span is [0, L) for the LSTM (it reads the whole sequence in order) and
[max(0, prompt - max offset), L) for PoMa / linear: every position that can be supervised and
every argmax its targets read. Fields: `hidden` (PoMa) or `hidden_normed` (LSTM, linear), and
`trunk_argmax` (int32, always: self-distillation targets and evaluation read it). Positions
outside the span come back as zeros: no head reads them. The fingerprint covers the trunk
(config, conversion record, path), every row's tokens and prompt length, the spans, the fields
and the dtype; a change gives a new folder. A build writes a temporary folder and renames it
when complete, so an interrupted build is never read.

Build order: rows sorted by length and run `build_batch_size` at a time, each trunk call padded
to its longest row rounded up to BUCKET_LENGTH_MULTIPLE (`gptk_jax.data.pipeline.
length_sorted_batches`), so the trunk runs on about the tokens the rows hold (SmolLM2 on News
Commentary: 1.33x instead of 2x in input order) and compiles once per bucket length. The
stored values do not depend on the order: causal attention never reads right padding, and
tests/test_feature_cache.py checks both orders against each other and against the trunk on
each row alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np

from gptk_jax.data.pipeline import length_sorted_batches
from gptk_jax.heads.config import HeadConfig
from gptk_jax.llama.model import Llama
from gptk_jax.training.step import chunked_argmax

FORMAT = 1
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
BUILD_LENGTH_MULTIPLE = 32   # input-order build batches are padded to a multiple of this
BUCKET_LENGTH_MULTIPLE = 64  # length-sorted ones to a multiple of this: the unrolled 30-layer
                             # SmolLM2 compiles for each length, so 4 lengths up to 256 (1.33x the
                             # rows' tokens on News Commentary) beat 8 (1.17x)


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


def trunk_fn(trunk_config, argmax_chunk: int) -> Callable:
    """jit (trunk_params, tokens, positions, token_mask [B,T]) -> {hidden, hidden_normed
    [B,T,D], trunk_argmax [B,T]}: the frozen trunk pass the cache stores."""
    def run(trunk_params, tokens, positions, token_mask):
        out = Llama(trunk_config).apply({"params": trunk_params}, tokens, positions,
                                        token_mask=token_mask, compute_logits=False)
        argmax = chunked_argmax(trunk_config, trunk_params, out.hidden_normed, argmax_chunk)
        return {"hidden": out.hidden, "hidden_normed": out.hidden_normed,
                "trunk_argmax": argmax}
    return jax.jit(run)


class FeatureCache:
    """Read side: `attach(batch)` adds the cached fields for the batch's rows."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.spans = np.load(self.folder / "spans.npy")
        pair_index = np.load(self.folder / "pair_index.npy")
        self.row_of_pair = np.full(int(pair_index.max()) + 1, -1, np.int64)  # example_index -> row
        self.row_of_pair[pair_index] = np.arange(len(pair_index))
        total, dim = self.meta["num_positions"], self.meta["dim"]
        dtype = _DTYPES[self.meta["dtype"]]
        self.arrays = {}
        for field in self.meta["fields"]:
            shape, dt = ((total,), np.int32) if field == "trunk_argmax" else ((total, dim), dtype)
            self.arrays[field] = np.memmap(self.folder / f"{field}.bin", dtype=dt, mode="r",
                                           shape=shape)

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
                      bucketed: bool = True) -> "FeatureCache":
        """The cache of `rows` under cache_root (built unless there); bucketed=False builds in
        input order (same values, more padding: for benchmarks and tests)."""
        spans = row_spans(rows, head_config)
        fields = cached_fields(head_config)
        key = fingerprint(trunk.path, trunk.config, rows, spans, fields, dtype)
        folder = Path(cache_root) / key
        if (folder / "meta.json").is_file():
            log(f"feature cache: reusing {folder}")
            return cls(folder)
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_root) / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            groups = build_groups(rows, build_batch_size, bucketed)
            seconds = _build(tmp, trunk, rows, spans, fields, dtype, groups, build_batch_size,
                             argmax_chunk, progress)
            try:
                tmp.rename(folder)
            except OSError:       # another process finished the same cache first
                if not (folder / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        cache = cls(folder)
        build = cache.meta["build"]
        log(f"feature cache: built {folder} in {seconds:.1f}s ({len(rows)} rows, "
            f"{cache.meta['num_positions']} positions, {cache.nbytes / 2**20:.1f} MiB; the trunk "
            f"ran on {build['trunk_tokens']} tokens for {build['row_tokens']} in the rows, "
            f"{len(build['lengths'])} lengths)")
        return cache


def _build(folder: Path, trunk, rows, spans: np.ndarray, fields, dtype: str, groups,
           batch_size: int, argmax_chunk: int, progress: bool) -> float:
    """Runs the trunk over `groups` ([(T, row indices)], see `build_groups`) and writes the
    folder's files; returns the seconds it took."""
    from tqdm import tqdm

    start_time = time.perf_counter()
    total, dim = int(spans[:, 2].sum()), trunk.config.dim
    flat = {}
    for field in fields:
        shape, dt = ((total,), np.int32) if field == "trunk_argmax" else ((total, dim),
                                                                          _DTYPES[dtype])
        flat[field] = np.memmap(folder / f"{field}.bin", dtype=dt, mode="w+", shape=shape)
    run = trunk_fn(trunk.config, argmax_chunk)
    params = trunk.params
    pad_id = int(trunk.tokenizer.pad_id)
    for length, index in tqdm(groups, desc="trunk features", unit="batch",
                              disable=not progress, leave=False):
        # [B,T]: batch_size rows always (filler rows are all padding): one shape per length
        tokens = np.full((batch_size, length), pad_id, np.int32)
        token_mask = np.zeros((batch_size, length), bool)
        for i, row in enumerate(index):
            tokens[i, :len(rows[row].tokens)] = rows[row].tokens
            token_mask[i, :len(rows[row].tokens)] = True
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        outputs = jax.device_get(run(params, tokens, positions, token_mask))
        for i, row in enumerate(index):
            offset, start, n = spans[row]
            for field in fields:
                flat[field][offset:offset + n] = outputs[field][i, start:start + n]
    for array in flat.values():
        array.flush()
    np.save(folder / "spans.npy", spans)
    np.save(folder / "pair_index.npy", np.asarray([r.index for r in rows], np.int64))
    build = {"trunk_tokens": int(sum(batch_size * length for length, _ in groups)),
             "row_tokens": int(sum(len(r.tokens) for r in rows)),
             "lengths": sorted({int(length) for length, _ in groups})}  # one compile each
    (folder / "meta.json").write_text(json.dumps(
        {"format": FORMAT, "num_rows": len(rows), "num_positions": total, "dim": dim,
         "fields": list(fields), "dtype": dtype, "trunk": str(trunk.path), "build": build},
        indent=2))
    return time.perf_counter() - start_time
