"""A converted tokenizer folder: reading it, loading the tokenizer in it, writing one.

    DIR/tokenizer_config.json   {"kind", "bos_id", "eos_id", "pad_id", "stop_ids", "add_bos"}
    DIR/tokenizer.model         kinds llama3_tiktoken, sentencepiece
    DIR/tokenizer.json          kind hf_json
    DIR/chat_template.jinja     optional: the model's chat template

A config without "add_bos" (folders written before it was recorded) gets `DEFAULT_ADD_BOS`.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Optional

from gptk_jax.tokenizers.base import (CONFIG_FILE, JSON_FILE, KIND_FILES, KIND_HF_JSON,
                                      KIND_LLAMA3, KIND_SENTENCEPIECE, KINDS, MODEL_FILE,
                                      PathLike, Tokenizer, TokenizerError, require_file,
                                      write_chat_template, write_config)
from gptk_jax.tokenizers.chat import read_chat_template_file
from gptk_jax.tokenizers.gguf_bpe import (build_gguf_bpe_tokenizer, gguf_tokenizer_ids,
                                          read_gguf_tokenizer_metadata)
from gptk_jax.tokenizers.hf_json import HFJsonTokenizer
from gptk_jax.tokenizers.llama3 import Llama3Tokenizer
from gptk_jax.tokenizers.sentencepiece import SentencePieceTokenizer

# "add_bos" when the config has none. Llama 3: Meta always prepends <|begin_of_text|>;
# sentencepiece: Meta's Llama 2 does; hf_json: None = whatever tokenizer.json's post-processor
# does (HF's Llama 3 file adds BOS; one built from SmolLM2's GGUF adds none).
DEFAULT_ADD_BOS = {KIND_LLAMA3: True, KIND_SENTENCEPIECE: True, KIND_HF_JSON: None}
_CLASSES = {KIND_LLAMA3: Llama3Tokenizer, KIND_SENTENCEPIECE: SentencePieceTokenizer,
            KIND_HF_JSON: HFJsonTokenizer}


def read_tokenizer_config(folder: PathLike) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: tokenizer folder not found; expected a folder with "
                             f"{CONFIG_FILE} and {MODEL_FILE} or {JSON_FILE}")
    path = require_file(folder / CONFIG_FILE,
                        f'{{"kind": one of {list(KINDS)}, "bos_id", "eos_id", "pad_id", '
                        f'"stop_ids"}}')
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r}; "
                             f"expected one of {list(KINDS)}")
    missing = [k for k in ("bos_id", "eos_id", "pad_id", "stop_ids") if k not in cfg]
    if missing:
        raise TokenizerError(f"{path}: missing {missing}; "
                             f"expected bos_id, eos_id, pad_id, stop_ids")
    if not isinstance(cfg["stop_ids"], list):
        raise TokenizerError(f"{path}: stop_ids must be a list of ints, got {cfg['stop_ids']!r}")
    if not isinstance(cfg.get("add_bos", False), bool):
        raise TokenizerError(f"{path}: add_bos must be true or false, got {cfg['add_bos']!r}")
    return cfg


def load_tokenizer(folder: PathLike) -> Tokenizer:
    """The tokenizer in `folder` (tokenizer_config.json + tokenizer.model or tokenizer.json,
    and chat_template.jinja when there is one)."""
    folder = Path(folder)
    cfg = read_tokenizer_config(folder)
    kind = cfg["kind"]
    file = folder / KIND_FILES[kind]
    require_file(file, f"the {KIND_FILES[kind]} of kind {kind!r} named in {folder / CONFIG_FILE}")
    return _CLASSES[kind](file, bos_id=cfg["bos_id"], eos_id=cfg["eos_id"],
                          pad_id=cfg["pad_id"], stop_ids=cfg["stop_ids"],
                          add_bos=cfg.get("add_bos", DEFAULT_ADD_BOS[kind]),
                          chat_template=read_chat_template_file(folder))


def save_tokenizer_files(tokenizer: Tokenizer, folder: PathLike) -> Path:
    """Writes a loaded tokenizer's file and config into `folder`; returns the folder."""
    return tokenizer.save(folder)


def detect_tokenizer_model_kind(path: PathLike) -> str:
    """'llama3_tiktoken' or 'sentencepiece' for a `tokenizer.model` (Meta ships both names)."""
    path = require_file(Path(path), "a tokenizer.model (tiktoken rank file or sentencepiece)")
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0].strip()
    parts = first.split()
    if len(parts) == 2 and parts[1].isdigit():
        try:
            base64.b64decode(parts[0], validate=True)
            return KIND_LLAMA3
        except binascii.Error:
            pass
    return KIND_SENTENCEPIECE


def write_llama3_tokenizer(src_tokenizer_model: PathLike, folder: PathLike, *,
                           add_bos: bool = True,
                           chat_template: Optional[str] = None) -> Llama3Tokenizer:
    """Copies Meta's Llama 3 `tokenizer.model` into `folder` with its config; returns it loaded."""
    tok = Llama3Tokenizer(src_tokenizer_model, add_bos=add_bos,   # validates the source first
                          chat_template=chat_template)
    tok.save(folder)
    return load_tokenizer(folder)


def write_sentencepiece_tokenizer(src_model: PathLike, folder: PathLike, *, add_bos: bool = True,
                                  chat_template: Optional[str] = None) -> SentencePieceTokenizer:
    """Copies a sentencepiece `tokenizer.model` into `folder` with its config; returns it loaded."""
    tok = SentencePieceTokenizer(src_model, add_bos=add_bos, chat_template=chat_template)
    tok.save(folder)
    return load_tokenizer(folder)


def write_gguf_tokenizer(gguf_reader_or_path, folder: PathLike) -> HFJsonTokenizer:
    """Builds `folder/tokenizer.json` from a GGUF's byte-level BPE metadata, writes the config
    (add_bos by llama.cpp's rule) and the GGUF's `tokenizer.chat_template`, and returns the
    tokenizer loaded from the folder."""
    meta = read_gguf_tokenizer_metadata(gguf_reader_or_path)
    tok = build_gguf_bpe_tokenizer(meta)
    ids = gguf_tokenizer_ids(meta)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / JSON_FILE))
    write_config(folder, {"kind": KIND_HF_JSON, **ids})
    write_chat_template(folder, meta["chat_template"])
    return load_tokenizer(folder)
