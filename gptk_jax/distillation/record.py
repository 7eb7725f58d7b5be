"""Self-distillation's output file and its record (the generation is generate.py): the trunk's
own greedy translations of the training sources, the target side heads train on (what
verification will accept), made with the product's own exact decoding.

    FILE          line i = the trunk's translation of source line i (first output line,
                  stripped); empty for empty sources and for the few-shot pairs' own sources
                  (the prompt shows them with their reference: they are excluded from training)
    FILE.json     the record: input, prompt format (template, shots, BOS, stop rule), model
                  fingerprint, max new tokens, decoding, command; how far it got (lines,
                  generated tokens, seconds) and one entry per session

Resumable: lines are appended per chunk (flushed, fsync-ed) and the record replaced atomically
after each chunk, with the chunk's fingerprints (HASH_CHARS of sha256 per source line and per
written line, and its bytes). The record is written before FILE is created, so FILE is ours
only when its record is there: an existing FILE without one is refused, never touched. A rerun
checks that its settings match the record (a different prompt format, model, input or max new
tokens is refused, naming the keys), that the sources of the recorded lines are unchanged and
that the recorded lines are intact (either refused naming the first line that differs;
--redo-damaged translates a damaged chunk and those after it again), cuts what follows the
recorded lines (a run stopped inside a chunk) and translates only the rest. One writer per
FILE: `output_lock` (FILE.lock, gptk_jax/locks.py) refuses a second run, naming the first.
Greedy decoding does not depend on the batch a prompt shares, so a resumed run writes the lines
an uninterrupted one writes.

Shards (distillation/shards.py): N runs on other hosts or devices, run I writing every N-th
source's line from I into FILE.shardI-of-N (the same format; its record also names the shard),
merged into the FILE a one-process run writes.

Letters: N sources asked for, C chunk of sources decoded by one continuous run, B slots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from gptk_jax.errors import GptkError
from gptk_jax.files import atomic_write_text, read_json_object

RECORD_FORMAT = "gptk-distill-1"
# a change in any of these makes earlier lines another distillation's: refused on resume
IDENTITY_KEYS = ("input", "prompt_format", "model", "max_new_tokens", "stop_ids_sha256")
HASH_CHARS = 8      # hex characters of sha256 kept per source and output line


class DistillError(GptkError, ValueError):
    """Bad input or a rerun that does not match the record; the message names what differs."""


def record_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def one_line(text: str) -> str:
    """The first line of a generation, stripped (and free of characters that split lines)."""
    first = text.split("\n")[0]
    for sep in ("\r", "\x85", "\u2028", "\u2029"):
        first = first.replace(sep, " ")
    return first.strip()


def model_fingerprint(checkpoint: Path) -> dict:
    """The converted model: its folder name and the sha256 of its config.json and
    conversion.json (what it was converted from, and how)."""
    h = hashlib.sha256()
    for name in ("config.json", "conversion.json"):
        path = checkpoint / name
        h.update(path.read_bytes() if path.is_file() else b"")
    return {"name": checkpoint.name, "sha256": h.hexdigest()[:16]}


@dataclasses.dataclass
class DistillPlan:
    """What one distillation is (the identity a resume must match) and how it decodes."""
    input: str                       # the source file PREFIX.src
    sources: int                     # N source lines distilled (the first N)
    prompt_format: dict              # prompt_record(...)
    model: dict                      # model_fingerprint(...)
    max_new_tokens: int
    stop_ids_sha256: str
    decoding: dict                   # batch size, drafter, "k" (W), chunk (free to change on
                                     # resume)
    shard: Optional[dict] = None     # {"index": I, "count": N}: every N-th source from I only
                                     # (distillation/shards.py); None: every source
    all_sources: Optional[int] = None  # a shard's: the S source lines all N shards share

    def identity(self) -> dict:
        """What a resume must match (a shard's index and count too)."""
        keys = IDENTITY_KEYS + (("shard",) if self.shard is not None else ())
        return {k: getattr(self, k) for k in keys}


def lock_path(output: Path) -> Path:
    """The lock file of one writer of `output` (gptk_jax/locks.py)."""
    return output.with_name(output.name + ".lock")


def output_lock(output: Path, log: Optional[Callable[[str], None]] = print):
    """Held for a run that writes `output` (and its record): a second one is refused naming
    the first's PID and start time."""
    from gptk_jax.locks import exclusive_lock
    return exclusive_lock(lock_path(Path(output)), f"--output {output}", log=log)


def line_hashes(lines: Sequence[str]) -> str:
    """HASH_CHARS hex characters of sha256 per line, concatenated: what a resume compares."""
    return "".join(hashlib.sha256(line.encode("utf-8", "surrogateescape")).hexdigest()
                   [:HASH_CHARS] for line in lines)


def chunk_entry(first: int, sources: Sequence[str], texts: Sequence[str]) -> dict:
    """The record of one written chunk: output lines [first, first + len(texts)), the bytes
    they take and the fingerprints of their sources and of the lines written."""
    return {"first": first, "lines": len(texts),
            "bytes": len("".join(t + "\n" for t in texts).encode("utf-8", "surrogateescape")),
            "sources": line_hashes(sources), "output": line_hashes(texts)}


def _first_difference(recorded: str, now: str) -> Optional[int]:
    """The index of the first line whose fingerprint differs (a missing line differs)."""
    for j in range(0, max(len(recorded), len(now)), HASH_CHARS):
        if recorded[j:j + HASH_CHARS] != now[j:j + HASH_CHARS]:
            return j // HASH_CHARS
    return None


def _source_line(plan: DistillPlan, j: int) -> int:
    """1-based line number in the source file of distilled line j (a shard's every N-th)."""
    if plan.shard is None:
        return j + 1
    return plan.shard["index"] + j * plan.shard["count"] + 1


def fresh_record(plan: DistillPlan) -> dict:
    record = {"format": RECORD_FORMAT, **plan.identity(), "sources": plan.sources,
              "lines_written": 0, "output_bytes": 0, "chunks": [],
              "generated_tokens": 0, "seconds": 0.0, "sessions": []}
    if plan.all_sources is not None:
        record["all_sources"] = plan.all_sources
    return record


def check_resume(plan: DistillPlan, output: Path, sources: Sequence[str], *,
                 redo_damaged: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """The record to continue (a fresh one when there is no output). Writes only to a file
    this distillation's record says it wrote: refuses (changing nothing) an output without a
    record, a record of another distillation, sources that differ from those distilled and
    output lines that differ from those written (`redo_damaged`: cut the file back to the
    start of the first damaged chunk and translate from there). Lines past the recorded ones
    (a run stopped inside a chunk) are cut off."""
    path = record_path(output)
    if output.exists() and not output.is_file():
        raise DistillError(f"--output {output} is not a file: choose a file path for the "
                           f"translations")
    if not path.is_file():
        if output.exists():
            raise DistillError(f"{output} exists and has no record {path}: it was not written "
                               f"by a distillation, and distill writes only to a file it "
                               f"created (nothing was changed; remove it or choose another "
                               f"--output)")
        return fresh_record(plan)
    record = _same_distillation(plan, output, path)
    if not output.exists():
        if record.get("lines_written"):
            log(f"{output} is missing: distilling afresh (its record {path} is replaced)")
        return fresh_record(plan)
    done = int(record.get("lines_written", 0))
    chunks = record.get("chunks", None if done else [])
    if chunks is None or sum(c["lines"] for c in chunks) != done:
        raise DistillError(f"{path} has no fingerprints of the {done} lines of {output} (an "
                           f"older version wrote it): its lines cannot be checked; remove "
                           f"both files to distill afresh")
    if done > plan.sources:
        raise DistillError(f"{output} already has {done} lines, more than the {plan.sources} "
                           f"source lines asked for")
    _check_sources(plan, output, chunks, sources)
    _check_output(record, chunks, output, path, redo_damaged, log)
    record["sources"] = plan.sources         # the first N lines: N may grow on a rerun
    if plan.all_sources is not None:
        record["all_sources"] = plan.all_sources
    return record


def _same_distillation(plan: DistillPlan, output: Path, path: Path) -> dict:
    """The record at `path`, when it is this distillation's (same plan identity)."""
    record = read_json_object(path, DistillError)
    if record.get("format") != RECORD_FORMAT:
        raise DistillError(f"{path} is not a distillation record (format "
                           f"{record.get('format')!r}, not {RECORD_FORMAT!r}): nothing was "
                           f"changed; remove it or choose another --output")
    identity = {"shard": None, **plan.identity()}
    differ = [k for k in identity if record.get(k) != identity[k]]
    if differ:
        details = "; ".join(f"{k}: recorded {record.get(k)!r}, now {identity[k]!r}"
                            for k in differ)
        raise DistillError(f"{output} is another distillation ({path} differs in "
                           f"{', '.join(differ)}): {details}. Remove both files or choose "
                           f"another --output")
    return record


def _check_sources(plan: DistillPlan, output: Path, chunks: list, sources: Sequence[str]):
    """Every recorded chunk's sources are the ones given now (else DistillError)."""
    for c in chunks:
        first = c["first"]
        j = _first_difference(c["sources"], line_hashes(sources[first:first + c["lines"]]))
        if j is not None:
            raise DistillError(
                f"source line {_source_line(plan, first + j)} of {plan.input} differs from "
                f"the one distilled into line {first + j + 1} of {output}: the sources "
                f"changed since; distill them into another --output (nothing was changed)")


def _check_output(record: dict, chunks: list, output: Path, path: Path, redo_damaged: bool,
                  log: Callable[[str], None]) -> None:
    """The output's lines against the recorded fingerprints: a damaged chunk is an error, or
    (redo_damaged) cut back to its start; bytes past the last recorded line are cut off.
    Updates record's chunks / lines_written / output_bytes."""
    data = output.read_bytes()
    offset = 0
    for k, c in enumerate(chunks):
        part = data[offset:offset + c["bytes"]]
        lines = part.split(b"\n")
        now = line_hashes([line.decode("utf-8", "surrogateescape") for line in lines[:-1]])
        j = _first_difference(c["output"], now)
        if j is None and not part.endswith(b"\n"):
            j = c["lines"] - 1
        if j is not None:
            line = c["first"] + j + 1
            if not redo_damaged:
                raise DistillError(
                    f"line {line} of {output} differs from the line this distillation wrote "
                    f"there (its record {path}): the file is damaged; rerun with "
                    f"--redo-damaged to translate lines {c['first'] + 1}.. again (nothing "
                    f"was changed)")
            log(f"line {line} of {output} is damaged: translating lines {c['first'] + 1}.. "
                f"again")
            with open(output, "r+b") as f:
                f.truncate(offset)
            record["chunks"] = chunks[:k]
            record["lines_written"] = c["first"]
            record["output_bytes"] = offset
            break
        offset += c["bytes"]
    else:
        if len(data) > offset:
            log(f"{output}: dropped {len(data) - offset} bytes after the last recorded line "
                f"(a run stopped inside a chunk)")
            with open(output, "r+b") as f:
                f.truncate(offset)
        record["lines_written"] = sum(c["lines"] for c in chunks)
        record["output_bytes"] = offset


def save_record(output: Path, record: dict) -> None:
    atomic_write_text(record_path(output), json.dumps(record, indent=1) + "\n")


def read_record(output: Path) -> Optional[dict]:
    """FILE.json of a distillation, None when FILE has none."""
    path = record_path(Path(output))
    return read_json_object(path, DistillError) if path.is_file() else None


def distillation_status(target_file: Path) -> Optional[dict]:
    """How complete the distillation `target_file` is, as training records it (run.json
    "distilled_targets"): {"file", "lines_written", "sources", "complete"}; None for a file
    that is not a distillation (no record)."""
    rec = read_record(Path(target_file))
    if rec is None or rec.get("format") != RECORD_FORMAT:
        return None
    written, sources = int(rec.get("lines_written", 0)), int(rec.get("sources", 0))
    return {"file": str(Path(target_file).resolve()), "lines_written": written,
            "sources": sources, "complete": written >= sources}


def incomplete_warning(target_file: Path, status: dict) -> str:
    """The warning training prints for an incomplete distillation ("14 of 40 lines")."""
    return (f"warning: {target_file} is an incomplete distillation: {status['lines_written']} "
            f"of {status['sources']} lines (python -m gptk_jax.distill stopped before the end; "
            f"rerun it to finish): training uses only the pairs of those "
            f"{status['lines_written']} lines (recorded in the workdir's run.json)")


def target_lines_check(target_file: Path, source_path: str, target_lines: int,
                       source_lines: int, log: Optional[Callable[[str], None]] = print, *,
                       sources: Optional[Sequence[str]] = None,
                       targets: Optional[Sequence[str]] = None) -> None:
    """A training target file must be line-aligned with its sources: as many lines, or, for a
    distillation of the first N sources (its record says so), exactly the N it wrote. An
    incomplete distillation (fewer lines written than the sources it was asked for) is
    accepted with a warning through `log`. Given the lines themselves (`sources`, `targets`:
    the files' lines as read), a distillation's are checked against its record's
    fingerprints too (`target_content_check`): a source edited, inserted or removed since, or
    a target line changed, is refused naming the first line that differs."""
    record, rec = record_path(Path(target_file)), read_record(Path(target_file))
    if rec is not None and rec.get("shard"):
        shard = rec["shard"]
        raise DistillError(
            f"{target_file} is shard {shard.get('index')} of {shard.get('count')} of a "
            f"distillation (every {shard.get('count')}th line of {source_path}), not its "
            f"line-aligned target side: merge the shards (python -m gptk_jax.distill --output "
            f"FILE --num-shards {shard.get('count')} --merge) and train on FILE")
    if rec is not None:
        if rec.get("format") == RECORD_FORMAT and target_lines == rec.get("lines_written") \
                and target_lines <= source_lines:
            status = distillation_status(Path(target_file))
            if status is not None and not status["complete"] and log is not None:
                log(incomplete_warning(Path(target_file), status))
            if sources is not None and targets is not None:
                target_content_check(target_file, source_path, sources, targets, rec, log=log)
            return
        raise DistillError(
            f"{target_file} has {target_lines} lines, its record {record} says "
            f"{rec.get('lines_written')} of {rec.get('sources')} were written, and "
            f"{source_path} has {source_lines}: not a line-aligned target side")
    if target_lines != source_lines:
        raise DistillError(f"line counts differ: {target_file} has {target_lines} lines, "
                           f"{source_path} has {source_lines}: not its line-aligned target side")


def target_content_check(target_file: Path, source_path: str, sources: Sequence[str],
                         targets: Sequence[str], rec: dict,
                         log: Optional[Callable[[str], None]] = print) -> None:
    """The distillation `target_file` (its record `rec`, not a shard's) against the lines it
    is paired with now: each recorded chunk's source fingerprints against the same lines of
    `sources` (the source file's lines as read) and its output fingerprints against the
    same lines of `targets`. The first line that differs (a source line edited, inserted or
    removed since distilling; a target line edited) is refused, one line naming the file and
    the line. One sha256 per line read, no file read again. A record without fingerprints
    (an older distill) cannot be checked: said through `log`."""
    record = record_path(Path(target_file))
    chunks = rec.get("chunks")
    done = int(rec.get("lines_written", 0))
    if chunks is None or sum(int(c.get("lines", 0)) for c in chunks) != done or any(
            "sources" not in c or "output" not in c for c in chunks):
        if log is not None and done:
            log(f"warning: {record} has no fingerprints of the lines of {target_file} (an "
                f"older distill wrote it): their alignment with {source_path} is not checked")
        return
    for c in sorted(chunks, key=lambda c: c["first"]):
        first, n = int(c["first"]), int(c["lines"])
        j_src = _first_difference(c["sources"], line_hashes(sources[first:first + n]))
        j_out = _first_difference(c["output"], line_hashes(targets[first:first + n]))
        if j_src is not None and (j_out is None or j_src <= j_out):
            line = first + j_src + 1
            raise DistillError(
                f"line {line} of {source_path} differs from the source line distilled into "
                f"line {line} of {target_file} (its record {record}): the sources changed "
                f"since distilling, so the pairs are not aligned; restore {source_path} or "
                f"re-run python -m gptk_jax.distill into a new --output")
        if j_out is not None:
            line = first + j_out + 1
            raise DistillError(
                f"line {line} of {target_file} differs from the line distill wrote there (its "
                f"record {record}): the file was edited or damaged; restore it, or re-run "
                f"python -m gptk_jax.distill on it with --redo-damaged")


__all__ = ["DistillError", "DistillPlan", "check_resume", "chunk_entry", "distillation_status",
           "incomplete_warning", "line_hashes", "lock_path", "output_lock", "model_fingerprint",
           "one_line", "read_record", "record_path", "save_record", "target_content_check",
           "target_lines_check"]
