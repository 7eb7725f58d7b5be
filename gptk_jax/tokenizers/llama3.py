"""Meta's Llama 3 tokenizer on tiktoken (as llama_models/llama3/tokenizer.py builds it).

`tokenizer.model` is a tiktoken rank file (`<base64 token> <rank>` per line); the 256 special
tokens follow the base vocabulary. Long inputs are cut the way Meta's reference cuts them, so ids
match it exactly.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Iterable, Iterator, Optional

from gptk_jax.tokenizers.base import (KIND_LLAMA3, MODEL_FILE, PathLike, Tokenizer,
                                      TokenizerError, copy_file, ids_or_defaults,
                                      require_file)

# Meta's pre-tokenizer pattern, verbatim.
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's named special tokens, in id order after the base vocabulary (llama-models 0.3.0: note
# <|image|> at base+11; HF's Llama 3.2 tokenizer.json has <|reserved_special_token_2|> there).
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# Meta's reference tokenizer works on <=400k-char chunks, further split so that no run of
# whitespace / non-whitespace exceeds 25k chars (tiktoken issue 195); reproduced for exactness.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Meta's special tokens: the named ones, then reserved ones up to 256, after the base vocab."""
    names = list(LLAMA3_NAMED_SPECIAL_TOKENS) + [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def load_tiktoken_ranks(path: PathLike) -> dict[bytes, int]:
    """Reads a tiktoken rank file (`<base64 token> <rank>` per line), strictly.

    Meta's `load_bpe_file` skips malformed lines with a warning; a converter must not silently
    drop tokens, so any malformed line, duplicate or gap in the ranks is an error here.
    """
    path = require_file(Path(path), "a tiktoken BPE rank file (Llama 3 tokenizer.model)")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(
            f"{path}: not a text file, so not a tiktoken rank file (`<base64> <rank>` lines); "
            f"is it a sentencepiece model? (kind 'sentencepiece')") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(content.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}, line {lineno}: expected `<base64 token> <rank>`, "
                                 f"got {line[:80]!r}") from None
        if token in ranks:
            raise TokenizerError(f"{path}, line {lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no `<base64 token> <rank>` lines; "
                             f"expected a tiktoken rank file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Meta's splitter: no piece has more than `max_len` consecutive (non-)whitespace chars."""
    if len(s) <= max_len:       # fast path: the loop below would yield `s` whole
        yield s
        return
    current_slice_len = 0
    current_slice_is_space = s[0].isspace()
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def _llama3_pieces(s: str) -> list[str]:
    return [sub for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS)
            for sub in _split_whitespaces_or_nonwhitespaces(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                            MAX_NO_WHITESPACES_CHARS)]


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: tiktoken with Meta's pattern and 256 special tokens.

    Defaults: bos <|begin_of_text|>, eos <|end_of_text|>, stop {<|end_of_text|>, <|eom_id|>,
    <|eot_id|>} (Meta's `stop_tokens`), pad <|eot_id|> (what the research code padded with;
    Meta's own `pad_id` is <|finetune_right_pad_id|>). `add_bos` True: Meta's generation and
    chat format always start with <|begin_of_text|> (and HF's Llama 3 tokenizer.json adds it).
    """

    kind = KIND_LLAMA3
    source_file = MODEL_FILE

    def __init__(self, model_path: PathLike, *, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 stop_ids: Optional[Iterable[int]] = None, add_bos: bool = True,
                 chat_template: Optional[str] = None):
        import tiktoken

        model_path = Path(model_path)
        ranks = load_tiktoken_ranks(model_path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = llama3_special_tokens(self.num_base_tokens)
        self.model = tiktoken.Encoding(name=model_path.name, pat_str=LLAMA3_PAT_STR,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        st = self.special_tokens
        ids = ids_or_defaults(self.default_ids(self.num_base_tokens), bos_id=bos_id,
                              eos_id=eos_id, pad_id=pad_id, stop_ids=stop_ids)
        super().__init__(**ids, vocab_size=self.num_base_tokens + len(st), add_bos=add_bos,
                         chat_template=chat_template, path=model_path)
        self.eot_id = st["<|eot_id|>"]
        self.eom_id = st["<|eom_id|>"]

    @staticmethod
    def default_ids(num_base_tokens: int = 128000) -> dict:
        st = llama3_special_tokens(num_base_tokens)
        return {"bos_id": st["<|begin_of_text|>"], "eos_id": st["<|end_of_text|>"],
                "pad_id": st["<|eot_id|>"],
                "stop_ids": [st["<|end_of_text|>"], st["<|eom_id|>"], st["<|eot_id|>"]]}

    def _encode(self, text: str) -> list[int]:
        pieces = _llama3_pieces(text)
        if len(pieces) == 1:
            return self.model.encode_ordinary(pieces[0])
        out: list[int] = []
        for piece in pieces:
            out.extend(self.model.encode_ordinary(piece))
        return out

    # No `_encode_batch`: tiktoken's threaded encode_ordinary_batch measured slower than the plain
    # loop for sentence-length texts on a 2-core machine.

    def _decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)

    def _save_file(self, target: Path) -> None:
        copy_file(self.path, target)
