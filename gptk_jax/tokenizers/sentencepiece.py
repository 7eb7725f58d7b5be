"""A sentencepiece `tokenizer.model` (Llama 2 style) behind the shared interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from gptk_jax.tokenizers.base import (KIND_SENTENCEPIECE, MODEL_FILE, PathLike, Tokenizer,
                                      TokenizerError, copy_file, ids_or_defaults,
                                      require_file)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; bos/eos from the model, pad = the model's pad or else eos.

    `special_tokens` are the model's control and unknown pieces ("<s>", "</s>", "<unk>");
    sentencepiece itself never makes them from text. `add_bos` True: Meta's Llama 2 prepends
    BOS to every prompt (and every chat turn).
    """

    kind = KIND_SENTENCEPIECE
    source_file = MODEL_FILE

    def __init__(self, model_path: PathLike, *, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 stop_ids: Optional[Iterable[int]] = None, add_bos: bool = True,
                 chat_template: Optional[str] = None):
        import sentencepiece as spm

        model_path = require_file(Path(model_path), "a sentencepiece model (tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_path.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with a terse text
            raise TokenizerError(f"{model_path}: not a sentencepiece model ({e}); "
                                 f"a Llama 3 tiktoken file is kind 'llama3_tiktoken'") from None
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                               if self.sp.is_control(i) or self.sp.is_unknown(i)}
        ids = ids_or_defaults(self.defaults_from_model(self.sp, model_path), bos_id=bos_id,
                              eos_id=eos_id, pad_id=pad_id, stop_ids=stop_ids)
        super().__init__(**ids, vocab_size=self.sp.get_piece_size(), add_bos=add_bos,
                         chat_template=chat_template, path=model_path)

    @staticmethod
    def defaults_from_model(sp, path: Any = "sentencepiece model") -> dict:
        bos, eos, pad = sp.bos_id(), sp.eos_id(), sp.pad_id()
        if bos < 0 or eos < 0:
            raise TokenizerError(f"{path}: the sentencepiece model defines no "
                                 f"{'BOS' if bos < 0 else 'EOS'} piece; expected both")
        return {"bos_id": bos, "eos_id": eos, "pad_id": pad if pad >= 0 else eos,
                "stop_ids": [eos]}

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def _save_file(self, target: Path) -> None:
        copy_file(self.path, target)
