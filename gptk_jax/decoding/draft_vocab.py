"""A reduced draft vocabulary: the most frequent target-side tokens of a text.

Heads that draft offset by offset (the LSTM) or over several offsets project onto the whole
vocabulary for every draft; an argmax over the N most frequent target-language tokens costs N/V
of that (SmolLM2: 4,096 of 49,152 ids = 1/12). The trunk verifies every draft, so the output
stays greedy decoding's; only acceptance can change (a draft outside the set is never proposed).

    ids = frequent_token_ids(tokenizer, lines, 4096, always=stop_ids)
    ids = build_draft_vocab(tokenizer, 4096, "train.en", space_with_target=True)  # from a file
    head_drafter(..., draft_vocab=ids)
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Iterable, Sequence, Union

from gptk_jax.data.prompts import translation_stop_ids
from gptk_jax.data.wmt import read_text_lines
from gptk_jax.decoding.heads import DraftVocabError


def frequent_token_ids(tokenizer, lines: Iterable[str], size: int, *, prefix: str = "",
                       always: Sequence[int] = ()) -> tuple[int, ...]:
    """The `size` most frequent ids of prefix + line (no BOS; a trailing '\\r' dropped, blank
    lines skipped), ties by id; `always` (e.g. the stop ids, so a draft can end a translation)
    come first and count towards size."""
    if size < 1:
        raise DraftVocabError(f"draft vocabulary size must be >= 1, got {size}")
    counts = collections.Counter()
    for line in lines:
        line = line[:-1] if line.endswith("\r") else line
        if line.strip():
            counts.update(tokenizer.encode(prefix + line, bos=False))
    return most_frequent(counts, size, always=always)


def most_frequent(counts, size: int, *, always: Sequence[int] = ()) -> tuple[int, ...]:
    """The `size` most frequent ids of `counts` ({id: count}), ties by id, `always` first
    (counting towards size): the ranking of frequent_token_ids, for counts made elsewhere
    (training: the training rows' target tokens, gptk_jax/training/vocab.py)."""
    if size < 1:
        raise DraftVocabError(f"draft vocabulary size must be >= 1, got {size}")
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    ids = list(dict.fromkeys(int(i) for i in always))
    first = set(ids)
    ids += [i for i in ranked if i not in first]
    if len(ids) < size:
        raise DraftVocabError(f"the text has only {len(ids)} distinct tokens, fewer than the "
                              f"draft vocabulary size {size}")
    return tuple(ids[:size])


def build_draft_vocab(tokenizer, size: int, text_path: Union[str, os.PathLike], *,
                      space_with_target: bool = False) -> tuple[int, ...]:
    """The `size` most frequent target-side tokens of the text file at `text_path` (training
    text, never the test set), the translation stop ids first so a draft can end a translation.
    `space_with_target`: each line is counted as it follows a prompt ending at 'en:' (' text')."""
    path = Path(text_path)
    if not path.is_file():
        raise FileNotFoundError(f"draft vocabulary text {path}: no such file")
    return frequent_token_ids(tokenizer, read_text_lines(path), size,
                              prefix=" " if space_with_target else "",
                              always=translation_stop_ids(tokenizer))
