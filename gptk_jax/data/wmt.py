"""Readers for WMT14 German-English: plain line-aligned files, official SGML, sacreBLEU, HF `wmt14`.

Every reader returns a `ReadResult`: `pairs` (a list of `Pair(src, tgt, doc_id)`) plus counts of
what it dropped, so callers can report them. Direction: German->English by default; each reader
can produce English->German pairs (`src_lang="en", tgt_lang="de"`, or `reverse=True` for SGML).
`max_pairs=N` keeps the first N pairs that survive the empty-side filter.

    r = read_parallel_text(DATA_ROOT / "wmt14-de-en" / "newstest2014")      # .de / .en
    r = read_file_pair("mine.de", "mine.en")          # any two line-aligned files
    r = read_sgml("newstest2014-deen-src.de.sgm", "newstest2014-deen-ref.en.sgm")
    r = read_sacrebleu("wmt14/full")                  # $SACREBLEU or ~/.sacrebleu, or cache_dir=
    r = read_hf_wmt14("train")                        # needs the optional `datasets` package

WMT text pitfalls handled here: files are split on '\\n' only (never `str.splitlines()`, which
also splits on U+0085, U+2028 and other separators found in real WMT text), files are read as
bytes so '\\r\\n' is not silently translated, a trailing '\\r' is stripped, and pairs with an empty
side (after `str.strip()`) are dropped and counted.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Union

from gptk_jax.errors import GptkError

PathLike = Union[str, "os.PathLike[str]"]


class DataError(GptkError, ValueError):
    """Input data that is malformed or inconsistent (mismatched files, unparsable SGML, ...)."""


class Pair(NamedTuple):
    """One translation pair; `doc_id` is the WMT document id where the source has one."""
    src: str
    tgt: str
    doc_id: Optional[str] = None


@dataclasses.dataclass
class ReadResult:
    """Pairs read from `source`, and what was dropped or cleaned on the way.

    `num_read`: candidate pairs looked at (lines / segments / rows) before `max_pairs` stopped
    the reader; `dropped_empty`: pairs with an empty side; `stripped_cr`: pairs where a trailing
    '\\r' was removed from either side.
    """
    pairs: list[Pair]
    source: str
    num_read: int = 0
    dropped_empty: int = 0
    stripped_cr: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        return (f"{self.source}: {len(self.pairs)} pairs kept of {self.num_read} read; "
                f"{self.dropped_empty} dropped with an empty side, "
                f"{self.stripped_cr} had a trailing CR stripped")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def read_text_lines(path: PathLike) -> list[str]:
    """Lines of a UTF-8 file split on '\\n' only; '\\r' is kept (see `_strip_cr`)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":      # the final newline ends the last line, it adds none
        lines.pop()
    return lines


def _strip_cr(line: str) -> tuple[str, bool]:
    return (line[:-1], True) if line.endswith("\r") else (line, False)


def _collect(candidates: Iterable[tuple[str, str, Optional[str]]], source: str,
             max_pairs: Optional[int], strip: bool) -> ReadResult:
    """Applies the CR strip, the empty-side filter and `max_pairs` to (src, tgt, doc_id)."""
    if max_pairs is not None and max_pairs < 0:
        raise DataError(f"max_pairs must be >= 0 or None, got {max_pairs}")
    result = ReadResult(pairs=[], source=source)
    if max_pairs == 0:
        return result
    for src, tgt, doc_id in candidates:
        result.num_read += 1
        src, cr_src = _strip_cr(src)
        tgt, cr_tgt = _strip_cr(tgt)
        result.stripped_cr += cr_src or cr_tgt
        if not src.strip() or not tgt.strip():
            result.dropped_empty += 1
            continue
        if strip:
            src, tgt = src.strip(), tgt.strip()
        result.pairs.append(Pair(src, tgt, doc_id))
        if max_pairs is not None and len(result.pairs) >= max_pairs:
            break
    return result


def _oriented(first: list[str], second: list[str], reverse: bool) -> tuple[list[str], list[str]]:
    return (second, first) if reverse else (first, second)


# --------------------------------------------------------------------------------------------
# (b) line-aligned plain text: PREFIX.de / PREFIX.en
# --------------------------------------------------------------------------------------------

def read_parallel_text(prefix: PathLike, src_lang: str = "de", tgt_lang: str = "en", *,
                       max_pairs: Optional[int] = None, strip: bool = True,
                       line_range: Optional[tuple] = None) -> ReadResult:
    """Reads `PREFIX.{src_lang}` and `PREFIX.{tgt_lang}`, line i of one aligned with line i of the other.

    `strip=True` also removes leading/trailing whitespace (incl. NBSP) from kept text; the trailing
    '\\r' is removed either way. Files with different line counts raise `DataError`.
    `line_range=(first, last)`: only those 1-based lines, inclusive (last None: to the end),
    before `max_pairs`; a range past the end of the files raises `DataError`.
    """
    return read_file_pair(f"{prefix}.{src_lang}", f"{prefix}.{tgt_lang}", max_pairs=max_pairs,
                          strip=strip, source=f"{prefix}.{{{src_lang},{tgt_lang}}}",
                          line_range=line_range)


def lines_in_range(lines: list, line_range: Optional[tuple], what: str) -> list:
    """lines[first-1:last] for line_range=(first, last) (1-based, inclusive, last None: to the
    end); None or (): every line. A range past the end raises `DataError` naming `what`."""
    if not line_range:
        return lines
    first, last = line_range
    end = len(lines) if last is None else int(last)
    if int(first) < 1 or end < int(first):
        raise DataError(f"{what}: bad line range {tuple(line_range)}")
    if end > len(lines):
        raise DataError(f"{what} has {len(lines)} lines; lines {first}-{last} were asked for")
    return lines[int(first) - 1:end]


def read_file_pair(src_path: PathLike, tgt_path: PathLike, *, max_pairs: Optional[int] = None,
                   strip: bool = True, source: Optional[str] = None,
                   line_range: Optional[tuple] = None) -> ReadResult:
    """Two line-aligned files of any names (a user's source and reference), as
    `read_parallel_text` reads PREFIX.src / PREFIX.tgt; `source` names them in the result."""
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src_lines, tgt_lines = read_text_lines(src_path), read_text_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(f"line counts differ: {src_path} has {len(src_lines)} lines, "
                        f"{tgt_path} has {len(tgt_lines)} lines")
    src_lines = lines_in_range(src_lines, line_range, str(src_path))
    tgt_lines = lines_in_range(tgt_lines, line_range, str(tgt_path))
    candidates = ((s, t, None) for s, t in zip(src_lines, tgt_lines))
    return _collect(candidates, source or f"{src_path}+{tgt_path}", max_pairs, strip)


# --------------------------------------------------------------------------------------------
# (c) official WMT SGML ("fake SGML": raw '&' and quotes appear unescaped, so no XML parser)
# --------------------------------------------------------------------------------------------

class SgmlSegment(NamedTuple):
    doc_id: Optional[str]
    seg_id: str
    text: str
    doc_attrs: dict


_DOC_RE = re.compile(r"<doc\b([^>]*)>(.*?)(?:</doc\s*>|(?=<doc\b)|\Z)", re.S | re.I)
_SEG_RE = re.compile(r"<seg\b([^>]*)>(.*?)</seg\s*>", re.S | re.I)
_ATTR_RE = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")
# Only well-formed entities (with the ';'): html.unescape alone would also turn "&amp" or
# "&copy" without ';' into characters, which bare text like "R&D &copy" must not become.
_ENTITY_RE = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def _attrs(text: str) -> dict:
    return {m.group(1).lower(): next(g for g in m.groups()[1:] if g is not None)
            for m in _ATTR_RE.finditer(text)}


def unescape_entities(text: str) -> str:
    return _ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text)


def read_sgml_segments(path: PathLike) -> list[SgmlSegment]:
    """All `<seg id=..>` of a WMT SGML file in order, with their `<doc>`'s id and attributes.

    Segment text is entity-unescaped and stripped of surrounding whitespace (segments may span
    lines); segments outside any `<doc>` get `doc_id=None`.
    """
    path = Path(path)
    text = path.read_bytes().decode("utf-8")
    segments: list[SgmlSegment] = []
    docs = list(_DOC_RE.finditer(text))
    spans = [(m.group(1), m.group(2)) for m in docs] if docs else [("", text)]
    for attr_text, body in spans:
        attrs = _attrs(attr_text)
        for seg in _SEG_RE.finditer(body):
            seg_attrs = _attrs(seg.group(1))
            segments.append(SgmlSegment(attrs.get("docid"), seg_attrs.get("id", ""),
                                        unescape_entities(seg.group(2)).strip(), attrs))
    if not segments:
        raise DataError(f"{path}: no <seg> elements found")
    return segments


def read_sgml(src_path: PathLike, ref_path: PathLike, *, reverse: bool = False,
              max_pairs: Optional[int] = None) -> ReadResult:
    """Pairs from an official WMT source SGML and its reference SGML, aligned by (docid, seg id).

    `reverse=True` makes the reference side the source (e.g. en->de from the de-en release).
    """
    src_segs, ref_segs = read_sgml_segments(src_path), read_sgml_segments(ref_path)
    if len(src_segs) != len(ref_segs):
        raise DataError(f"segment counts differ: {src_path} has {len(src_segs)} segments, "
                        f"{ref_path} has {len(ref_segs)}")
    for i, (s, r) in enumerate(zip(src_segs, ref_segs)):
        if (s.doc_id, s.seg_id) != (r.doc_id, r.seg_id):
            raise DataError(f"segment {i} is misaligned: {src_path} has doc {s.doc_id!r} seg "
                            f"{s.seg_id!r}, {ref_path} has doc {r.doc_id!r} seg {r.seg_id!r}")
    first, second = _oriented([s.text for s in src_segs], [r.text for r in ref_segs], reverse)
    candidates = zip(first, second, (s.doc_id for s in src_segs))
    return _collect(candidates, f"sgml:{src_path}+{ref_path}", max_pairs, strip=True)


# --------------------------------------------------------------------------------------------
# (a) sacreBLEU test sets
# --------------------------------------------------------------------------------------------

def _sacrebleu_dataset(test_set: str, cache_dir: Optional[PathLike]):
    """`sacrebleu.DATASETS[test_set]`, pointed at `cache_dir` or else at `$SACREBLEU` as it is *now*.

    sacreBLEU reads `$SACREBLEU` once, when it is first imported, and bakes it into every
    dataset's `_outdir`; setting the variable later would otherwise be ignored.
    """
    import sacrebleu

    if test_set not in sacrebleu.DATASETS:
        raise KeyError(f"unknown sacreBLEU test set {test_set!r}")
    dataset = sacrebleu.DATASETS[test_set]
    root = cache_dir if cache_dir is not None else os.environ.get("SACREBLEU")
    if root is None:
        return dataset
    outdir = os.path.join(os.fspath(root), dataset.name)
    if os.path.abspath(outdir) != os.path.abspath(dataset._outdir):
        dataset = copy.copy(dataset)
        dataset._outdir = outdir                          # private, but stable since sacreBLEU 2.1
        dataset._rawdir = os.path.join(outdir, "raw")
    return dataset


def read_sacrebleu(test_set: str = "wmt14/full", src_lang: str = "de", tgt_lang: str = "en", *,
                   langpair: Optional[str] = None, max_pairs: Optional[int] = None,
                   cache_dir: Optional[PathLike] = None) -> ReadResult:
    """A sacreBLEU test set (source and first reference) through sacreBLEU's own API.

    `langpair` (default f"{src_lang}-{tgt_lang}") is the sacreBLEU pair to read; giving the
    reverse pair (e.g. "de-en" for en->de) swaps source and reference. Without a cache sacreBLEU
    downloads the set into `cache_dir` / `$SACREBLEU` / `~/.sacrebleu`. Text is as sacreBLEU
    cleans it (stripped, internal whitespace runs incl. NBSP collapsed to one space).
    """
    langpair = langpair or f"{src_lang}-{tgt_lang}"
    first, second = langpair.split("-")
    if {first, second} != {src_lang, tgt_lang}:
        raise DataError(f"langpair {langpair!r} does not hold {src_lang}->{tgt_lang}")
    dataset = _sacrebleu_dataset(test_set, cache_dir)
    sources = list(dataset.source(langpair))
    refs = [fields[0].rstrip("\n") for fields in dataset.references(langpair)]
    files = dict(zip(dataset.fieldnames(langpair), dataset.get_files(langpair)))
    doc_ids = read_text_lines(files["docid"]) if "docid" in files else [None] * len(sources)
    if not len(sources) == len(refs) == len(doc_ids):
        raise DataError(f"sacreBLEU {test_set} {langpair}: {len(sources)} sources, {len(refs)} "
                        f"references, {len(doc_ids)} doc ids")
    sources, refs = _oriented(sources, refs, reverse=(first != src_lang))
    return _collect(zip(sources, refs, doc_ids), f"sacrebleu:{test_set}:{langpair}",
                    max_pairs, strip=True)


# --------------------------------------------------------------------------------------------
# (d) Hugging Face `wmt14`
# --------------------------------------------------------------------------------------------

def read_hf_wmt14(split: str = "train", src_lang: str = "de", tgt_lang: str = "en", *,
                  max_pairs: Optional[int] = None, path: str = "wmt14",
                  config: Optional[str] = None, **load_kwargs) -> ReadResult:
    """Rows of the HF `wmt14` dataset (`{"translation": {"de": .., "en": ..}}`), streamed.

    `config` defaults to the pair name HF uses ("de-en"); `path` may be "wmt/wmt14" on newer hubs.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("read_hf_wmt14 needs the optional Hugging Face `datasets` package "
                          "(pip install datasets); offline, use read_parallel_text, read_sgml "
                          "or read_sacrebleu instead") from e
    config = config or "-".join(sorted((src_lang, tgt_lang), key=lambda l: l == "en"))
    rows = datasets.load_dataset(path, config, split=split, streaming=True, **load_kwargs)

    def candidates() -> Iterator[tuple[str, str, None]]:
        for row in rows:
            yield row["translation"][src_lang], row["translation"][tgt_lang], None

    return _collect(candidates(), f"hf:{path}:{config}:{split}", max_pairs, strip=True)
