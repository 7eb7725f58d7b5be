"""Checks of a converted model's weights (llama/checkpoint.py runs them): per-tensor digests
recorded at conversion and verified on load (CRC-32 by default; see checkpoint.py's module doc
for why), and non-finite values named by tensor and row.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import zlib
from pathlib import Path

import jax
import numpy as np

DIGEST_ALGORITHM = "crc32"
_ROWS_SHOWN = 8


PROVENANCE_FILE = "conversion.json"
DIGESTS_KEY = "tensor_digests"          # in conversion.json: {"algorithm", "tensors"}


def _error(message: str) -> Exception:
    """llama/checkpoint.py's CheckpointError (imported late: checkpoint.py imports this)."""
    from gptk_jax.llama.checkpoint import CheckpointError
    return CheckpointError(message)


def tensor_name(key_path) -> str:
    """The name of a stacked-layout tensor as its folder under params/ is named:
    ('layers', 'attention', 'wq', 'kernel') -> 'layers.attention.wq.kernel'."""
    return ".".join(str(getattr(k, "key", k)) for k in key_path)


def tensor_digest(array, algorithm: str = DIGEST_ALGORITHM) -> str:
    """The digest of an array's bytes (C order, its own dtype) as conversion.json records it."""
    data = np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8)  # bfloat16 too
    if algorithm == "crc32":
        return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise _error(f"unknown tensor digest algorithm {algorithm!r} (crc32 or sha256)")


def tensor_digests(params: dict, algorithm: str = DIGEST_ALGORITHM) -> dict:
    """{"algorithm", "tensors": {name: digest}} of a stacked-layout tree (conversion.json's)."""
    return {"algorithm": algorithm,
            "tensors": {tensor_name(k): tensor_digest(v, algorithm)
                        for k, v in jax.tree_util.tree_leaves_with_path(params)}}


class DigestChecker:
    """Checks tensors against conversion.json's digests in one worker thread (zlib and hashlib
    release the GIL), so that a tensor is checked while the next one is read."""

    def __init__(self, directory: Path, digests: dict):
        self.directory = directory
        self.algorithm = digests.get("algorithm")
        self.recorded = digests.get("tensors")
        if self.algorithm not in ("crc32", "sha256") or not isinstance(self.recorded, dict):
            raise _error(f"{directory.parent / PROVENANCE_FILE}: malformed "
                                  f"{DIGESTS_KEY!r} (expected {{\"algorithm\": \"crc32\" or "
                                  f"\"sha256\", \"tensors\": {{name: digest}}}}); the "
                                  "folder is damaged")
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="digests")
        self.pending: list = []

    def submit(self, name: str, value) -> None:
        self.pending.append((name, self.pool.submit(tensor_digest, value, self.algorithm)))

    def finish(self, names: list[str]) -> None:
        for name, future in self.pending:
            got, want = future.result(), self.recorded.get(name)
            where = self.directory / name
            if want is None:
                raise _error(
                    f"{where}: tensor {name} has no digest in "
                    f"{self.directory.parent / PROVENANCE_FILE}: the folder was changed "
                    "after conversion; convert the model again")
            if got != want:
                raise _error(
                    f"{where}: tensor {name} differs from what was converted ({self.algorithm} "
                    f"{got}, {PROVENANCE_FILE} records {want}): its files under {where} are "
                    "damaged or were modified; convert the model again (or restore the "
                    "folder from a good copy)")
        missing = sorted(set(self.recorded) - set(names))
        if missing:
            raise _error(f"{self.directory}: tensors {missing} recorded in "
                                  f"{PROVENANCE_FILE} are not in the checkpoint")


def _bad_rows(array: np.ndarray, chunk: int) -> list[int]:
    """Indices along axis 0 of the rows holding a non-finite value (a few rows at a time)."""
    rows = array.reshape(array.shape[0], -1)
    step = max(1, chunk // max(1, rows.shape[1]))
    return [start + int(i) for start in range(0, rows.shape[0], step)
            for i in np.flatnonzero(~np.isfinite(rows[start:start + step]).all(axis=1))]


def _rows_what(name: str) -> str:
    """What axis 0 of a stacked-layout tensor counts."""
    if name.startswith("tok_embeddings."):
        return "token ids (embedding rows)"
    return "layers" if name.startswith("layers.") else "rows"


def check_finite(params: dict, *, source: str, chunk: int = 1 << 22,
                 blame: str = "the source file is corrupt or was written wrong") -> None:
    """Raises CheckpointError naming every tensor holding NaN or infinity, with the rows along
    its first axis that hold them (token ids of the embedding, layers of a stacked tensor); read
    in chunks of `chunk` elements: no second copy of a tensor in memory."""
    problems = []
    for key, leaf in jax.tree_util.tree_leaves_with_path(params):
        array = np.asarray(leaf)
        flat = array.reshape(-1)
        for start in range(0, flat.size, chunk):
            if not np.isfinite(flat[start:start + chunk]).all():
                bad = sum(int((~np.isfinite(flat[i:i + chunk])).sum())
                          for i in range(start, flat.size, chunk))
                first = start + int(np.argmin(np.isfinite(flat[start:start + chunk])))
                name = tensor_name(key)
                where = f"first at flat index {first}"
                if array.ndim >= 2:
                    rows = _bad_rows(array, chunk)
                    shown = ", ".join(map(str, rows[:_ROWS_SHOWN]))
                    more = f" and {len(rows) - _ROWS_SHOWN} more" if len(rows) > _ROWS_SHOWN \
                        else ""
                    where = f"in {_rows_what(name)} {shown}{more} of axis 0"
                problems.append(f"tensor {jax.tree_util.keystr(key)} has {bad} non-finite "
                                f"value(s) (NaN or inf; {where})")
                break
    if problems:
        raise _error(f"{source}: " + "; ".join(problems) + f" -- {blame}")
