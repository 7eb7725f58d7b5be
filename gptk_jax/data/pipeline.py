"""Training batches for MTP heads: pairs -> prompts + tokens -> length filter -> grain shuffle/epochs
-> padded, per-process sharded numpy batches with a JSON-able, restorable iterator state.

    pipe = TranslationPipeline(pairs, tokenizer, fmt, PipelineConfig(global_batch_size=32,
                               max_len=256, max_offset=4, seed=0))
    it = pipe.iterator()
    batch = next(it)                     # dict of numpy arrays, this process's rows
    state = it.get_state()               # JSON-able; it.set_state(state) resumes exactly

Formatting, tokenizing and the length filter run once, eagerly, when the pipeline is built, so
every drop is counted up front (`pipe.stats`) and an empty result fails at once. grain then
shuffles the kept examples (a new permutation each epoch, seeded), repeats, and groups them into
global batches; every process builds the same global batch and keeps rows
[process_index * B : (process_index + 1) * B], B = global_batch_size / process_count. The row
length T is `max_len`, or with `bucket_lengths` the smallest bucket holding the longest row of
the *global* batch, so all processes agree on shapes.

Batch arrays (B rows of this process, T row length, J = max_offset, offsets 1..J):
    tokens [B,T] int32 (right-padded with pad_id), positions [B,T] int32, token_mask [B,T] bool,
    loss_mask [B,T] bool (target tokens incl. EOS), targets [B,T,J] int32, target_mask [B,T,J] bool
    (see `prompts.shift_targets`), example_index [B] int32 (index into `pairs`; -1 for the
    all-masked rows that fill a final partial batch when drop_remainder=False).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional, Sequence

import grain
import numpy as np

from gptk_jax.data.prompts import (TRUNCATE_POLICIES, PromptFormat, TokenizerLike,
                                   encode_examples, fit_length, shift_targets)
from gptk_jax.data.wmt import DataError, Pair, ReadResult

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    global_batch_size: int                 # rows per step over all processes
    max_len: int                           # longest row in tokens (prompt + target)
    max_offset: int = 4                    # J: targets for offsets 1..J
    seed: int = 0                          # shuffle seed (each epoch reseeded from it)
    shuffle: bool = True
    num_epochs: Optional[int] = None       # None: repeat forever
    drop_remainder: bool = True            # False: a final partial batch is padded with empty rows
    truncate: str = "drop"                 # 'drop' | 'truncate_target' | 'error' (prompts.fit_length)
    bucket_lengths: tuple = ()             # () -> every batch has T = max_len

    def __post_init__(self):
        object.__setattr__(self, "bucket_lengths", tuple(int(b) for b in self.bucket_lengths))
        if self.global_batch_size < 1 or self.max_len < 2 or self.max_offset < 1:
            raise DataError(f"need global_batch_size >= 1, max_len >= 2, max_offset >= 1: {self}")
        if self.truncate not in TRUNCATE_POLICIES:
            raise DataError(f"truncate must be one of {TRUNCATE_POLICIES}, got {self.truncate!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        buckets = self.bucket_lengths
        if list(buckets) != sorted(set(buckets)) or (buckets and not 0 < buckets[0]):
            raise DataError(f"bucket_lengths must be positive and strictly increasing: {buckets}")
        if buckets and buckets[-1] > self.max_len:
            raise DataError(f"bucket {buckets[-1]} exceeds max_len={self.max_len}")

    @property
    def row_lengths(self) -> tuple:
        """The lengths T a batch can have."""
        buckets = self.bucket_lengths
        return buckets if buckets and buckets[-1] == self.max_len else buckets + (self.max_len,)


@dataclasses.dataclass
class FilterStats:
    """What became of the input pairs: kept, truncated (kept), dropped per reason."""
    num_pairs: int
    kept: int
    truncated: int
    dropped: dict
    reader: Optional[str] = None           # the reader's own summary, when given a ReadResult

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        text = (f"{self.kept} of {self.num_pairs} pairs kept ({self.truncated} with a truncated "
                f"target); dropped by the length filter: {reasons}")
        return f"{text}; reader: {self.reader}" if self.reader else text


@dataclasses.dataclass(frozen=True)
class _Row:
    tokens: np.ndarray       # [L] int32, prompt + (maybe truncated) target, unpadded
    prompt_len: int
    index: int               # position in the input pairs


def prepare_rows(pairs: Sequence[Pair], tokenizer: TokenizerLike, fmt: PromptFormat,
                 max_len: int, truncate: str) -> tuple[list[_Row], FilterStats]:
    """Formats, tokenizes and length-filters every pair; counts each reason for a drop."""
    rows: list[_Row] = []
    dropped = {"too_long": 0, "prompt_too_long": 0}
    truncated = 0
    for index, example in enumerate(encode_examples(fmt, tokenizer, pairs)):
        prompt_len = len(example.prompt_ids)
        decision = fit_length(prompt_len, len(example.target_ids), max_len, truncate)
        if decision.status in dropped:
            dropped[decision.status] += 1
            continue
        truncated += decision.status == "truncated"
        ids = example.prompt_ids + example.target_ids[:decision.target_len]
        rows.append(_Row(np.asarray(ids, np.int32), prompt_len, index))
    stats = FilterStats(len(pairs), len(rows), truncated, {k: v for k, v in dropped.items() if v})
    return rows, stats


def length_sorted_batches(lengths: Sequence[int], batch_size: int,
                          multiple: int) -> list[tuple[int, np.ndarray]]:
    """Groups rows for one pass of the frozen trunk over them (the feature cache): rows sorted
    by length (ties in input order) and taken `batch_size` at a time, each group padded to its
    longest row rounded up to `multiple`, so the trunk runs on about the tokens the rows hold and
    compiles once per bucket length. Returns [(T, row indices)] in that order; every row once.
    Training batches keep their own shapes (the pipeline's `bucket_lengths`)."""
    if batch_size < 1 or multiple < 1:
        raise ValueError(f"need batch_size >= 1 and multiple >= 1, got {batch_size}, {multiple}")
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(lengths, kind="stable")
    groups = []
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        longest = int(lengths[rows].max())
        groups.append((-(-longest // multiple) * multiple, rows))
    return groups


def _resolve_process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


class TranslationPipeline:
    """The kept examples of `pairs` and the grain dataset that batches them (see module doc)."""

    def __init__(self, pairs: Sequence[Pair] | ReadResult, tokenizer: TokenizerLike,
                 fmt: PromptFormat, config: PipelineConfig, *,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        reader = None
        if isinstance(pairs, ReadResult):
            reader, pairs = pairs.summary(), pairs.pairs
        self.config = config
        self.pad_id = int(tokenizer.pad_id)
        self.process_index, self.process_count = _resolve_process(process_index, process_count)
        if config.global_batch_size % self.process_count:
            raise DataError(f"global_batch_size {config.global_batch_size} is not divisible by "
                            f"process_count {self.process_count}")
        self.local_batch_size = config.global_batch_size // self.process_count
        self.rows, self.stats = prepare_rows(pairs, tokenizer, fmt, config.max_len,
                                             config.truncate)
        self.stats.reader = reader
        if not self.rows:
            raise DataError(f"no examples left after filtering (max_len={config.max_len}, "
                            f"truncate={config.truncate!r}): {self.stats.summary()}")
        if config.drop_remainder and len(self.rows) * (config.num_epochs or 1) < config.global_batch_size:
            raise DataError(f"{len(self.rows)} examples x {config.num_epochs or 1} epochs cannot "
                            f"fill one global batch of {config.global_batch_size} with "
                            f"drop_remainder=True: {self.stats.summary()}")
        self.dataset = self._build_dataset()
        self._fingerprint = self._make_fingerprint(fmt)

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per epoch (batches may straddle epochs when it is not a whole number)."""
        return len(self.rows) / self.config.global_batch_size

    def __len__(self) -> int:
        """Batches in total (very large when num_epochs is None)."""
        return len(self.dataset)

    def _build_dataset(self) -> grain.MapDataset:
        config = self.config
        ds = grain.MapDataset.source(self.rows)
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)        # repeat() reseeds it for every epoch
        ds = ds.repeat(config.num_epochs)
        return ds.batch(config.global_batch_size, drop_remainder=config.drop_remainder,
                        batch_fn=self._collate)

    def _row_length(self, rows: Sequence[_Row]) -> int:
        longest = max(len(r.tokens) for r in rows)
        return next(t for t in self.config.row_lengths if t >= longest)

    def _collate(self, global_rows: Sequence[_Row]) -> dict:
        """One global batch's rows -> this process's padded arrays."""
        config = self.config
        length = self._row_length(global_rows)              # T, shared by all processes
        start = self.process_index * self.local_batch_size
        local_rows = list(global_rows[start:start + self.local_batch_size])
        batch = self.local_batch_size
        tokens = np.full((batch, length), self.pad_id, np.int32)
        loss_mask = np.zeros((batch, length), bool)
        token_mask = np.zeros((batch, length), bool)
        example_index = np.full((batch,), -1, np.int32)
        for b, row in enumerate(local_rows):
            n = len(row.tokens)
            tokens[b, :n] = row.tokens
            token_mask[b, :n] = True
            loss_mask[b, row.prompt_len:n] = True
            example_index[b] = row.index
        targets, target_mask = shift_targets(tokens, loss_mask, config.max_offset,
                                             fill_id=self.pad_id)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
        return {"tokens": tokens, "positions": positions, "token_mask": token_mask,
                "loss_mask": loss_mask, "targets": targets, "target_mask": target_mask,
                "example_index": example_index}

    def _make_fingerprint(self, fmt: PromptFormat) -> str:
        """Identifies what the iterator state indexes into: restoring across a different
        dataset, format, config or process layout would silently give other batches."""
        h = hashlib.sha256()
        h.update(json.dumps([dataclasses.asdict(self.config), self.process_index,
                             self.process_count, repr(fmt), len(self.rows)]).encode())
        for row in self.rows:
            h.update(row.tokens.tobytes())
            h.update(row.prompt_len.to_bytes(4, "little"))
        return h.hexdigest()[:16]

    def iterator(self) -> "BatchIterator":
        return BatchIterator(self)

    def __iter__(self):
        return self.iterator()


class BatchIterator:
    """Iterates the pipeline's batches; `get_state()` / `set_state()` checkpoint the position."""

    def __init__(self, pipeline: TranslationPipeline):
        self._pipeline = pipeline
        # Rows live in memory: reading threads would only fight over the GIL.
        self._it = pipeline.dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self._pipeline._fingerprint,
                "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"iterator state version {state.get('version')!r}, "
                            f"expected {STATE_VERSION}")
        if state.get("fingerprint") != self._pipeline._fingerprint:
            raise DataError("iterator state was saved from a different pipeline (data, prompt "
                            "format, config or process layout differ); refusing to restore")
        self._it.set_state(state["grain"])
