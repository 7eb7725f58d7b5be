"""Checks of a converted model's weights (llama/checkpoint.py runs them): per-tensor digests
recorded at conversion and verified on load (see checkpoint.py's module doc for why), and
non-finite values named by tensor and row.

The digest is xxHash's 128-bit XXH3 of a tensor's bytes ("xxh3_128", the `xxhash` package): a
non-cryptographic hash made for checking data, ~16 ms over SmolLM2-135M's 538 MB here against
~44 ms for the "sums64" digest it replaced and ~130-230 ms for CRC-32 (docs/benchmarks.md).
Any damage (flipped bits, a zeroed block, a cut or swapped file) changes it except with
probability about 2**-128. Folders converted with the earlier digests verify as before:

"sums64": the bytes read as little-endian 64-bit words laid out row by row in a grid of
SUM_COLUMNS (4096) columns, the wrapping (mod 2**64) sum of every column and of every row, hashed
with sha256 together with the byte length and the words past the last full row; it detects
with certainty every change confined to one, two or three 64-bit words and every change
confined to 4096 consecutive words, and anything else unless every column and row sum comes out
unchanged. "crc32" (zlib) and "sha256" (hashlib) are what their names say.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import zlib
from pathlib import Path

import jax
import numpy as np

DIGEST_ALGORITHM = "xxh3_128"
ALGORITHMS = ("xxh3_128", "sums64", "crc32", "sha256")   # what a conversion.json may record
SUM_COLUMNS = 4096
_SUM_ROWS = 64                               # grid rows summed at a time (2 MiB: in cache)
_ROWS_SHOWN = 8


PROVENANCE_FILE = "conversion.json"
DIGESTS_KEY = "tensor_digests"          # in conversion.json: {"algorithm", "tensors"}


VERIFY_WEIGHTS_HELP = (
    "skip the per-tensor digest check of the converted weights (each tensor read is hashed and "
    "compared with the digest conversion.json records; a damaged tensor is refused, named). It "
    "costs ~0.02 s of CPU over SmolLM2-135M's 538 MB, about 2 %% of a load (docs/benchmarks.md); "
    "skipped, damaged weights load unnoticed. Same as GPTK_SKIP_WEIGHT_DIGESTS=1")


def add_verify_weights_argument(parser) -> None:
    """`--no-verify-weights` (args.verify_weights False; default True) for a CLI that loads a
    converted model: pass `verify_digests=verify_digests_arg(args.verify_weights)` on."""
    parser.add_argument("--no-verify-weights", dest="verify_weights", action="store_false",
                        help=VERIFY_WEIGHTS_HELP)


def verify_digests_arg(verify_weights: bool):
    """load_converted's `verify_digests` for a CLI's --no-verify-weights: False when given,
    else None (load_converted's default: verify unless GPTK_SKIP_WEIGHT_DIGESTS=1)."""
    return None if verify_weights else False


def _error(message: str) -> Exception:
    """llama/checkpoint.py's CheckpointError (imported late: checkpoint.py imports this)."""
    from gptk_jax.llama.checkpoint import CheckpointError
    return CheckpointError(message)


def tensor_name(key_path) -> str:
    """The name of a stacked-layout tensor as its folder under params/ is named:
    ('layers', 'attention', 'wq', 'kernel') -> 'layers.attention.wq.kernel'."""
    return ".".join(str(getattr(k, "key", k)) for k in key_path)


def sums64(data: np.ndarray) -> str:
    """The "sums64" digest (module doc) of a 1-D uint8 array."""
    words = data[:data.size // 8 * 8].view("<u8")
    full = words.size // SUM_COLUMNS * SUM_COLUMNS
    grid = words[:full].reshape(-1, SUM_COLUMNS)
    columns = np.zeros(SUM_COLUMNS, np.uint64)
    rows = np.empty(grid.shape[0], np.uint64)
    for start in range(0, grid.shape[0], _SUM_ROWS):   # each block read once from memory
        block = grid[start:start + _SUM_ROWS]
        columns += block.sum(axis=0, dtype=np.uint64)
        block.sum(axis=1, dtype=np.uint64, out=rows[start:start + _SUM_ROWS])
    digest = hashlib.sha256(np.array([data.size, SUM_COLUMNS], "<u8").tobytes())
    for part in (columns.astype("<u8"), rows.astype("<u8"), data[full * 8:]):
        digest.update(part.tobytes())
    return digest.hexdigest()


def tensor_digest(array, algorithm: str = DIGEST_ALGORITHM) -> str:
    """The digest of an array's bytes (C order, its own dtype) as conversion.json records it."""
    data = np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8)  # bfloat16 too
    if algorithm == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128_hexdigest(data)
    if algorithm == "sums64":
        return sums64(data)
    if algorithm == "crc32":
        return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise _error(f"unknown tensor digest algorithm {algorithm!r} ({', '.join(ALGORITHMS)})")


def tensor_digests(params: dict, algorithm: str = DIGEST_ALGORITHM) -> dict:
    """{"algorithm", "tensors": {name: digest}} of a stacked-layout tree (conversion.json's)."""
    return {"algorithm": algorithm,
            "tensors": {tensor_name(k): tensor_digest(v, algorithm)
                        for k, v in jax.tree_util.tree_leaves_with_path(params)}}


class DigestChecker:
    """Checks tensors against conversion.json's digests in one worker thread (numpy's sums,
    zlib and hashlib release the GIL), so that a tensor is checked while the next one is read."""

    def __init__(self, directory: Path, digests: dict):
        self.directory = directory
        self.algorithm = digests.get("algorithm")
        self.recorded = digests.get("tensors")
        if self.algorithm not in ALGORITHMS or not isinstance(self.recorded, dict):
            raise _error(f"{directory.parent / PROVENANCE_FILE}: malformed {DIGESTS_KEY!r} "
                         f"(expected {{\"algorithm\": one of {', '.join(ALGORITHMS)}, "
                         f"\"tensors\": {{name: digest}}}}, got algorithm "
                         f"{self.algorithm!r}): the folder is damaged, or was converted by a "
                         "newer version; convert the model again")
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
