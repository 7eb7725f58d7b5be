"""Self-distillation in shards: N independent runs (hosts, or one per device) each translate
every N-th source line, and a merge interleaves their files into the line-aligned FILE a
one-process run writes (distillation/record.py, generate.py).

    FILE.shardI-of-N        line j = the translation of source line I + j*N (of the first S)
    FILE.shardI-of-N.json   its record (the one-process format) plus "shard": {"index": I,
                            "count": N} (a resume must match it) and "all_sources": S
    FILE, FILE.json         the merge: line i = line i // N of shard i % N; the record has the
                            shards' identity, S lines of S sources, their tokens and seconds
                            summed, their sessions (each naming its shard) and "merged_from"

Every shard resumes on its own; a shard's run merges as soon as it finds all N complete (the
last one to finish writes FILE), `--merge` does it by hand. Greedy decoding does not depend on
which prompts share a batch, so the merged FILE equals a one-process distillation's, line for
line (tests/test_distill_shards.py). The shard files stay: a merge can be redone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from gptk_jax.files import atomic_write_text, read_json_object
from gptk_jax.distillation.record import (HASH_CHARS, IDENTITY_KEYS, RECORD_FORMAT,
                                          DistillError, line_hashes, output_lock, read_record,
                                          record_path)


def check_shard_arguments(num_shards: int, shard_index: Optional[int]) -> None:
    if num_shards < 1:
        raise DistillError(f"--num-shards must be >= 1, got {num_shards}")
    if num_shards == 1 and shard_index not in (None, 0):
        raise DistillError(f"--shard-index {shard_index} needs --num-shards > {shard_index}")
    if num_shards > 1 and shard_index is None:
        raise DistillError(f"--num-shards {num_shards} needs --shard-index 0..{num_shards - 1} "
                           f"(or --merge)")
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise DistillError(f"--shard-index {shard_index} is out of range for --num-shards "
                           f"{num_shards} (0..{num_shards - 1})")


def shard_path(output: Path, index: int, count: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.shard{index}-of-{count}")


def shard_sources(sources: Sequence[str], index: int, count: int) -> list[str]:
    """The source lines of shard `index` of `count`: lines index, index + count, ..."""
    return list(sources[index::count])


def shard_lines(all_sources: int, index: int, count: int) -> int:
    """How many lines shard `index` of `count` of S sources has when complete."""
    return len(range(index, all_sources, count))


@dataclasses.dataclass
class Shard:
    index: int
    path: Path
    record: Optional[dict]        # None: no record (not started, or not a shard's file)

    def lines_written(self) -> int:
        return int((self.record or {}).get("lines_written", 0))

    def expected(self, count: int) -> Optional[int]:
        s = (self.record or {}).get("all_sources")
        return None if s is None else shard_lines(int(s), self.index, count)


def read_shards(output: Path, count: int) -> list[Shard]:
    shards = []
    for index in range(count):
        path = shard_path(output, index, count)
        rec = record_path(path)
        shards.append(Shard(index, path, read_json_object(rec, DistillError)
                            if rec.is_file() else None))
    return shards


def all_complete(output: Path, count: int) -> bool:
    """Every shard's record says it wrote all its lines of the same S sources."""
    shards = read_shards(output, count)
    sources = {(s.record or {}).get("all_sources") for s in shards}
    return len(sources) == 1 and None not in sources and all(
        s.record is not None and s.lines_written() == s.expected(count) for s in shards)


def _count_lines(path: Path) -> int:
    """Complete lines in `path`, read only (a running shard may be appending to it)."""
    data = path.read_bytes() if path.is_file() else b""
    return data.count(b"\n")


def _checked(output: Path, count: int) -> tuple[list[Shard], int]:
    """The shards and S, or a DistillError naming the file that is missing, another
    distillation's, or incomplete (with its counts)."""
    shards = read_shards(output, count)
    for s in shards:
        if s.record is None:
            what = "has no record " + str(record_path(s.path)) if s.path.exists() else \
                "is missing"
            raise DistillError(f"shard {s.index} of {count}: {s.path} {what}; run python -m "
                               f"gptk_jax.distill ... --num-shards {count} --shard-index "
                               f"{s.index} first")
        if s.record.get("format") != RECORD_FORMAT or \
                s.record.get("shard") != {"index": s.index, "count": count}:
            raise DistillError(f"{record_path(s.path)} is not the record of shard {s.index} "
                               f"of {count} (it says shard {s.record.get('shard')!r})")
    first = shards[0].record
    for s in shards[1:]:
        differ = [k for k in IDENTITY_KEYS + ("all_sources",)
                  if s.record.get(k) != first.get(k)]
        if differ:
            raise DistillError(f"{s.path} and {shards[0].path} are shards of different "
                               f"distillations: they differ in {', '.join(differ)} ("
                               + "; ".join(f"{k}: {s.record.get(k)!r} vs {first.get(k)!r}"
                                           for k in differ) + ")")
    total = int(first["all_sources"])
    for s in shards:
        want, lines = s.expected(count), _count_lines(s.path)
        if s.lines_written() != want or lines != want:
            raise DistillError(f"shard {s.index} of {count} is incomplete: {s.path} has "
                               f"{lines} lines (its record says {s.lines_written()}) of the "
                               f"{want} it needs (source lines {s.index}, {s.index + count}, "
                               f"... of the first {total}); rerun that shard to finish it")
    return shards, total


def merge_shards(output: Path, count: int, input_path: Optional[str] = None) -> dict:
    """Writes FILE (line i = line i // N of shard i % N) and FILE.json from the `count`
    complete shards of FILE; returns the record. `input_path`: the source file the shards must
    have translated (None: whatever they recorded). Refuses a FILE that is not an earlier merge
    of the same distillation."""
    if count < 2:
        raise DistillError(f"--merge needs --num-shards >= 2, got {count}")
    output = Path(output)
    with output_lock(output):
        return _merge_locked(output, count, input_path)


def _merged_chunk(shards: list[Shard], total: int, lines: list[str]) -> Optional[dict]:
    """The merged FILE's one chunk: the shards' source fingerprints interleaved (None when a
    shard's record has none)."""
    count = len(shards)
    hashes = []
    for s in shards:
        chunks = s.record.get("chunks")
        if chunks is None:
            return None
        joined = "".join(c["sources"] for c in chunks)
        hashes.append([joined[j:j + HASH_CHARS] for j in range(0, len(joined), HASH_CHARS)])
        if len(hashes[-1]) != s.lines_written():
            return None
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
    return {"first": 0, "lines": total, "bytes": len(data),
            "sources": "".join(hashes[i % count][i // count] for i in range(total)),
            "output": line_hashes(lines)}


def _merge_locked(output: Path, count: int, input_path: Optional[str]) -> dict:
    shards, total = _checked(output, count)
    first = shards[0].record
    identity = {k: first[k] for k in IDENTITY_KEYS}
    if input_path is not None and str(Path(input_path).resolve()) != identity["input"]:
        raise DistillError(f"the shards of {output} translated {identity['input']}, not "
                           f"{Path(input_path).resolve()}")
    existing = read_record(output)
    if output.exists() or existing is not None:
        if existing is None or "merged_from" not in existing or \
                any(existing.get(k) != v for k, v in identity.items()):
            raise DistillError(f"{output} exists and is not a merge of these {count} shards: "
                               f"remove it and {record_path(output)} (or choose another "
                               f"--output)")
    per_shard = [_read_lines(s.path) for s in shards]
    lines = [per_shard[i % count][i // count] for i in range(total)]
    record = {"format": RECORD_FORMAT, **identity, "sources": total, "lines_written": total,
              "generated_tokens": sum(s.record["generated_tokens"] for s in shards),
              "seconds": sum(s.record["seconds"] for s in shards),
              "sessions": [dict(session, shard=s.index) for s in shards
                           for session in s.record["sessions"]],
              "decoding": first.get("decoding"),
              "merged_from": [s.path.name for s in shards]}
    chunk = _merged_chunk(shards, total, lines)
    if chunk is not None:
        record.update(output_bytes=chunk["bytes"], chunks=[chunk] if total else [])
    # the record first: a crash between the two leaves a FILE whose line count its record
    # refuses (training's target_lines_check), never an unrecorded one
    atomic_write_text(record_path(output), json.dumps(record, indent=1) + "\n")
    atomic_write_text(output, "".join(line + "\n" for line in lines))
    return record


def _read_lines(path: Path) -> list[str]:
    if not path.exists():                 # a shard of no lines (more shards than sources)
        return []
    text = path.read_bytes().decode("utf-8")
    return text.split("\n")[:-1]


__all__ = ["Shard", "all_complete", "check_shard_arguments", "merge_shards", "read_shards",
           "shard_lines", "shard_path", "shard_sources"]
