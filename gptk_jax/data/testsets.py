"""Test sets by name or by path, and the layout of a data root.

    test = load_test_set("newstest2014", data_root)     # DATA_ROOT/wmt14-de-en/newstest2014.{de,en}
    test = load_test_set("wmt13", data_root, sacrebleu_cache=cache)  # any sacreBLEU test set name
    test = load_file_pair("mine.de", "mine.en")         # a user's line-aligned source + reference
    test.pairs                                          # [Pair(src, tgt, doc_id)]
    test.describe()                                     # what a report says was evaluated

`data_root` is always an argument here: which folder it is, the CLI decides once
(gptk_jax.data.root). sacreBLEU names are read through sacreBLEU and its cache (`sacrebleu_cache`,
else $SACREBLEU, else ~/.sacrebleu, downloading where a network exists). Every failure to find a
test set is a one-line `DataError` naming the split or the path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

from gptk_jax.data.wmt import DataError, ReadResult, read_file_pair, read_sacrebleu

PathLike = Union[str, "os.PathLike[str]"]

WMT14_DIR = "wmt14-de-en"
FILE_SPLITS = ("newstest2013", "newstest2014")      # DATA_ROOT/wmt14-de-en/<split>.{de,en}
NEWS_COMMENTARY = "train/news-commentary.first10k"  # under WMT14_DIR: few shots, draft vocab


def wmt14_path(data_root: PathLike, name: str) -> Path:
    """DATA_ROOT/wmt14-de-en/NAME (a file, or a PREFIX of PREFIX.{de,en})."""
    return Path(data_root) / WMT14_DIR / name


def news_commentary(data_root: PathLike) -> Path:
    """The News Commentary training PREFIX (PREFIX.de / PREFIX.en): the default few-shot pool and
    draft-vocabulary text (training text, never a test set)."""
    return wmt14_path(data_root, NEWS_COMMENTARY)


@dataclasses.dataclass(frozen=True)
class TestSet:
    """Pairs to evaluate on and where they came from.

    `kind`: 'files' (a split of the data root), 'sacrebleu' (a sacreBLEU test set), 'pair' (a
    user's two files). `origin`: the paths (source, reference) or the sacreBLEU set, langpair and
    cache. `dropped_empty`: pairs skipped because a side was empty.
    """
    __test__ = False          # not a pytest class, despite the name

    name: str
    kind: str
    pairs: tuple
    src_lang: str
    tgt_lang: str
    origin: dict
    dropped_empty: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, **self.origin,
                "num_sentences": len(self.pairs), "src_lang": self.src_lang,
                "tgt_lang": self.tgt_lang, "dropped_empty": self.dropped_empty}


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: no such file {path}")
    return path


def _test_set(name: str, kind: str, read: ReadResult, src_lang: str, tgt_lang: str,
              origin: dict) -> TestSet:
    return TestSet(name, kind, tuple(read.pairs), src_lang, tgt_lang, origin, read.dropped_empty)


def load_file_pair(source: PathLike, reference: PathLike, src_lang: str = "de",
                   tgt_lang: str = "en", *, max_sentences: Optional[int] = None) -> TestSet:
    """A user's line-aligned source and reference files (UTF-8, one segment per line; pairs with
    an empty side are dropped and counted)."""
    src = _existing(Path(source), "source file")
    ref = _existing(Path(reference), "reference file")
    read = read_file_pair(src, ref, max_pairs=max_sentences)
    return _test_set(f"{src} + {ref}", "pair", read, src_lang, tgt_lang,
                     {"source": str(src), "reference": str(ref)})


def is_sacrebleu_name(name: str) -> bool:
    import sacrebleu
    return name in sacrebleu.DATASETS


def _sacrebleu_langpair(name: str, src_lang: str, tgt_lang: str) -> str:
    import sacrebleu
    pairs = list(sacrebleu.DATASETS[name].langpairs)
    for langpair in (f"{src_lang}-{tgt_lang}", f"{tgt_lang}-{src_lang}"):
        if langpair in pairs:
            return langpair
    raise DataError(f"sacreBLEU test set {name!r} has no {src_lang}-{tgt_lang} pair (it has "
                    f"{', '.join(pairs)})")


def load_sacrebleu_set(name: str, src_lang: str = "de", tgt_lang: str = "en", *,
                       max_sentences: Optional[int] = None,
                       sacrebleu_cache: Optional[PathLike] = None) -> TestSet:
    """A sacreBLEU test set by its name ('wmt13', 'wmt14/full', ...), the direct language pair
    preferred over the reverse one. Text is as sacreBLEU cleans it (whitespace runs collapsed)."""
    if not is_sacrebleu_name(name):
        raise DataError(f"unknown sacreBLEU test set {name!r} (`sacrebleu --list` names them)")
    langpair = _sacrebleu_langpair(name, src_lang, tgt_lang)
    cache = sacrebleu_cache or os.environ.get("SACREBLEU") or "~/.sacrebleu"
    try:
        read = read_sacrebleu(name, src_lang, tgt_lang, langpair=langpair,
                              max_pairs=max_sentences, cache_dir=sacrebleu_cache)
    except OSError as e:       # not cached, and the download failed (no network)
        raise DataError(f"sacreBLEU test set {name!r} ({langpair}) is not in the cache {cache} "
                        f"and could not be downloaded: {e}") from e
    return _test_set(name, "sacrebleu", read, src_lang, tgt_lang,
                     {"sacrebleu": name, "langpair": langpair, "sacrebleu_cache": str(cache)})


def load_test_set(split: str, data_root: PathLike, src_lang: str = "de", tgt_lang: str = "en",
                  *, max_sentences: Optional[int] = None,
                  sacrebleu_cache: Optional[PathLike] = None) -> TestSet:
    """`split`: one of FILE_SPLITS (files in the data root) or a sacreBLEU test set name."""
    if split in FILE_SPLITS:
        prefix = wmt14_path(data_root, split)
        src = _existing(Path(f"{prefix}.{src_lang}"), f"split {split!r}")
        ref = _existing(Path(f"{prefix}.{tgt_lang}"), f"split {split!r}")
        read = read_file_pair(src, ref, max_pairs=max_sentences)
        return _test_set(split, "files", read, src_lang, tgt_lang,
                         {"source": str(src), "reference": str(ref)})
    if is_sacrebleu_name(split):
        return load_sacrebleu_set(split, src_lang, tgt_lang, max_sentences=max_sentences,
                                  sacrebleu_cache=sacrebleu_cache)
    raise DataError(f"unknown split {split!r}: give one of {', '.join(FILE_SPLITS)} (files in "
                    f"the data root) or a sacreBLEU test set name such as wmt13 or wmt14/full")


__all__ = ["FILE_SPLITS", "NEWS_COMMENTARY", "WMT14_DIR", "TestSet", "is_sacrebleu_name",
           "load_file_pair", "load_sacrebleu_set", "load_test_set", "news_commentary",
           "wmt14_path"]
