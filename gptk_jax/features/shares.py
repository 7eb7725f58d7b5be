"""The trunk-feature cache in shares (features/cache.py): with N processes, process i runs
the frozen trunk over share i of the rows only; every process then reads every share, so the
cache folder must be on storage all processes see (a process that does not see a share after
the others finished builds that share itself: correct, but no faster than one process).

    share i of N   rows [R*i//N, R*(i+1)//N) of the R rows: contiguous, so its positions are one
                   range [P0_i, P1_i) of the flat layout, and the shares' files concatenated are
                   the files of a one-process build (N = 1: one share)
    CACHE/<fingerprint>/shares/<i>-of-<N>/share.json    rows, positions, who built it (process
                                                        index and count, host, pid), build stats
    CACHE/<fingerprint>/shares/<i>-of-<N>/<field>.bin   flat [P1_i - P0_i, D] or [P1_i - P0_i]

A share is built in a hidden sibling `.<i>-of-<N>.building-<host>.<pid>` and renamed into place
when complete (share.json last), so an interrupted build is never read and a completed share is
kept for the next start: a restarted job builds only the shares that are missing. Collective
steps (`all_processes`) must be called by every process of the job in the same order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from gptk_jax.errors import GptkError

SHARES_DIR = "shares"
SHARE_RECORD = "share.json"
SHARE_WAIT_SECONDS = 60.0     # after the barrier: time for another host's share to show up on
                              # shared storage (NFS attribute caches) before building it here


class CacheError(GptkError, RuntimeError):
    """A cache folder that is not what its meta.json says (a share missing or inconsistent)."""


def share_rows(num_rows: int, index: int, count: int) -> tuple[int, int]:
    """[first, last): the rows of share `index` of `count`."""
    if not 0 <= index < count:
        raise ValueError(f"share index {index} is out of range for {count} shares")
    return num_rows * index // count, num_rows * (index + 1) // count


def share_folder(cache_folder: Path, index: int, count: int) -> Path:
    return Path(cache_folder) / SHARES_DIR / f"{index}-of-{count}"


def share_complete(folder: Path) -> bool:
    return (Path(folder) / SHARE_RECORD).is_file()


def built_by() -> dict:
    """Who builds a share: recorded in its share.json (tests check shares' builders differ)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "host": socket.gethostname(), "pid": os.getpid()}


def all_processes(flag: bool) -> bool:
    """True when `flag` is true on every process; a collective (every process calls it, in the
    same order), so it is also a barrier: it returns once every process has reached it."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `final` to write; renamed to `final` when the block completes
    (and dropped when another writer completed `final` first); removed on any exception."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.building-{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:              # another process finished the same share first
            if not share_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_atomically(path: Path, write: Callable[[object], None]) -> None:
    """`path` replaced by what `write(binary file)` writes, never seen half-written: written to
    a hidden sibling named by host and pid (processes on several hosts may write the same path
    at once; pids alone repeat across hosts and containers), fsync-ed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}.{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def wait_for_shares(cache_folder: Path, count: int, seconds: float = SHARE_WAIT_SECONDS,
                    poll: float = 0.5) -> list[int]:
    """The shares of `count` still not visible here after waiting up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        missing = [i for i in range(count)
                   if not share_complete(share_folder(cache_folder, i, count))]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(poll)


def read_share_records(cache_folder: Path, count: int, num_rows: int,
                       spans: np.ndarray) -> list[dict]:
    """The share.json of each of `count` shares, checked against the rows and spans [R,3]."""
    records = []
    for index in range(count):
        folder = share_folder(cache_folder, index, count)
        if not share_complete(folder):
            raise CacheError(f"{folder / SHARE_RECORD} is missing: the cache {cache_folder} "
                             f"needs all {count} shares (a share was removed, or this process "
                             f"does not see the storage the others wrote to)")
        record = json.loads((folder / SHARE_RECORD).read_text())
        first, last = share_rows(num_rows, index, count)
        p0, p1 = positions_of(spans, first, last)
        if record["rows"] != [first, last] or record["positions"] != [p0, p1]:
            raise CacheError(f"{folder / SHARE_RECORD}: rows {record['rows']} positions "
                             f"{record['positions']}, expected rows {[first, last]} positions "
                             f"{[p0, p1]} for share {index} of {count} of {num_rows} rows")
        records.append(record)
    return records


def positions_of(spans: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """[P0, P1): the flat positions of rows [first, last) (spans [R,3]: offset, start, length)."""
    if first == last:
        p = int(spans[first, 0]) if first < len(spans) else int(spans[:, 2].sum())
        return p, p
    return int(spans[first, 0]), int(spans[last - 1, 0] + spans[last - 1, 2])


def remove_other_counts(cache_folder: Path, count: int) -> list[Path]:
    """Removes complete shares of another share count (left by an interrupted build with
    another number of processes: never read once the cache is complete); returns them."""
    removed = []
    for path in sorted((Path(cache_folder) / SHARES_DIR).glob("*-of-*")):
        if not path.name.endswith(f"-of-{count}") and share_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class ConcatenatedRows:
    """The flat [P, ...] array of one field, read across the shares' memory-maps without
    copying them: `view[a:b]` (what batches read: one row's positions, inside one share),
    `np.asarray(view)` (the whole field, concatenated: tests and benchmarks), shape, dtype."""

    def __init__(self, parts: Sequence[np.ndarray], starts: Sequence[int]):
        self.parts = list(parts)                            # [P1_i - P0_i, ...] each
        self.starts = np.asarray(starts, np.int64)          # [N] P0_i
        self.total = int(self.starts[-1] + len(self.parts[-1])) if self.parts else 0
        self.dtype = self.parts[0].dtype
        self.shape = (self.total,) + tuple(self.parts[0].shape[1:])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ConcatenatedRows takes contiguous slices [a:b]")
        a, b, _ = index.indices(self.total)
        pieces = []
        share = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            part, start = self.parts[share], int(self.starts[share])
            take = min(b, start + len(part))
            if take > a:
                pieces.append(part[a - start:take - start])
                a = take
            share += 1
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.zeros((0,) + self.shape[1:], self.dtype)
        return np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([np.asarray(p) for p in self.parts]) if self.parts else \
            np.zeros(self.shape, self.dtype)
        return whole if dtype is None else whole.astype(dtype)


def log_on_every_process(message: str, log: Callable[[str], None]) -> None:
    """`log` on process 0 (the trainer's log is silent elsewhere); stderr on the others."""
    if jax.process_index() == 0:
        log(message)
    else:
        import sys
        print(f"[process {jax.process_index()}] {message}", file=sys.stderr, flush=True)
