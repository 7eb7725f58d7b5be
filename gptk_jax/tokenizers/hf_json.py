"""An HF `tokenizers` tokenizer.json behind the shared interface (kind "hf_json").

The file is either copied from an HF model folder or built from GGUF metadata (gguf_bpe.py).
Its added tokens marked special are this tokenizer's `special_tokens`; other added tokens
(GGUF USER_DEFINED) are always matched whole, as HF and llama.cpp do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from gptk_jax.tokenizers.base import (JSON_FILE, KIND_HF_JSON, PathLike, Tokenizer,
                                      TokenizerError, copy_file, require_file)


def post_processor_adds_bos(hf_tokenizer, bos_id: int) -> bool:
    """Whether tokenizer.json's post-processor puts `bos_id` in front of a text (what
    transformers does with `add_special_tokens=True`; Llama 3's TemplateProcessing)."""
    plain = hf_tokenizer.encode("a", add_special_tokens=False).ids
    full = hf_tokenizer.encode("a", add_special_tokens=True).ids
    return len(full) > len(plain) and full[0] == bos_id


class HFJsonTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from `tokenizer.json`; ids come from the config (required).

    Special tokens in the text are plain text unless allowed (`encode_special_tokens=True`
    underneath), like the other kinds; decode keeps special tokens' text, like tiktoken.
    `add_bos` None: what the file's post-processor does (`post_processor_adds_bos`).
    """

    kind = KIND_HF_JSON
    source_file = JSON_FILE

    def __init__(self, json_path: PathLike, *, bos_id: int, eos_id: int, pad_id: int,
                 stop_ids: Iterable[int], add_bos: Optional[bool] = None,
                 chat_template: Optional[str] = None):
        from tokenizers import Tokenizer as HFTokenizer

        json_path = require_file(Path(json_path), "a HF tokenizers tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(json_path))
        except Exception as e:
            raise TokenizerError(f"{json_path}: not a valid HF tokenizers JSON ({e})") from None
        self.tok.encode_special_tokens = True
        self.special_tokens = {t.content: i for i, t in
                               self.tok.get_added_tokens_decoder().items() if t.special}
        if add_bos is None and isinstance(bos_id, int):   # a bad bos_id is reported below
            add_bos = post_processor_adds_bos(self.tok, bos_id)
        super().__init__(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, stop_ids=stop_ids,
                         vocab_size=self.tok.get_vocab_size(with_added_tokens=True),
                         add_bos=False if add_bos is None else add_bos,
                         chat_template=chat_template, path=json_path)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _save_file(self, target: Path) -> None:
        copy_file(self.path, target)
