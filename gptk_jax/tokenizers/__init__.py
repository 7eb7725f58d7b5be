"""Tokenizers behind one interface: Llama 3 (tiktoken), sentencepiece, GGUF byte-level BPE.

    tok = load_tokenizer("DIR/tokenizer")        # reads tokenizer_config.json + the file beside it
    ids = tok.encode("Hallo Welt", bos=True)     # [bos_id, ...]
    text = tok.decode(ids)
    tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size

`encode` never turns text into special tokens: a literal "<|eot_id|>" (or "<|im_end|>", "<s>") in
the input is encoded as plain text, as Meta's Llama 3 `Tokenizer.encode` does by default
(`allowed_special=set()`, `disallowed_special=()`). Special ids only come from `bos=` / `eos=` or
from the caller.

A tokenizer folder holds `tokenizer_config.json`

    {"kind": "llama3_tiktoken" | "sentencepiece" | "hf_json",
     "bos_id": int, "eos_id": int, "pad_id": int, "stop_ids": [int, ...], "add_bos": bool}

and one of `tokenizer.model` (kinds llama3_tiktoken, sentencepiece) or `tokenizer.json` (hf_json).
`add_bos` (optional, default true) records whether the model's own convention prepends BOS.
The converter writes folders with `write_llama3_tokenizer`, `write_sentencepiece_tokenizer`,
`write_gguf_tokenizer` (or `save_tokenizer_files` for a tokenizer already loaded).

The heavy libraries (tiktoken, sentencepiece, tokenizers, gguf) are imported only when needed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "tokenizer_config.json"
MODEL_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"

KIND_LLAMA3 = "llama3_tiktoken"
KIND_SENTENCEPIECE = "sentencepiece"
KIND_HF_JSON = "hf_json"
KINDS = (KIND_LLAMA3, KIND_SENTENCEPIECE, KIND_HF_JSON)
KIND_FILES = {KIND_LLAMA3: MODEL_FILE, KIND_SENTENCEPIECE: MODEL_FILE, KIND_HF_JSON: JSON_FILE}


class TokenizerError(ValueError):
    """A tokenizer file or folder that is missing, malformed or not what was expected."""


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """The interface every tokenizer implements (see docs/design.md)."""

    kind: str = ""
    source_file: str = ""          # the file this kind reads: tokenizer.model or tokenizer.json

    def __init__(self, *, bos_id: int, eos_id: int, pad_id: int, stop_ids: Iterable[int],
                 vocab_size: int, add_bos: bool = True, path: Optional[Path] = None):
        self._vocab_size = int(vocab_size)
        self._bos_id = self._check_id("bos_id", bos_id, path)
        self._eos_id = self._check_id("eos_id", eos_id, path)
        self._pad_id = self._check_id("pad_id", pad_id, path)
        self._stop_ids = frozenset(self._check_id("stop_ids", i, path) for i in stop_ids)
        if not self._stop_ids:
            raise TokenizerError(f"{path or self.kind}: stop_ids is empty; "
                                 f"expected at least eos_id")
        self._add_bos = bool(add_bos)
        self.path = path

    def _check_id(self, name: str, value: Any, path: Optional[Path]) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TokenizerError(f"{path or self.kind}: {name} must be an int, got {value!r}")
        if not 0 <= value < self._vocab_size:
            raise TokenizerError(f"{path or self.kind}: {name}={value} is outside the vocabulary "
                                 f"[0, {self._vocab_size})")
        return value

    # -- the interface ---------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def stop_ids(self) -> frozenset:
        return self._stop_ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def add_bos(self) -> bool:
        """Whether the model's own convention prepends BOS to a prompt (a hint for callers)."""
        return self._add_bos

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(self._encode(self._check_text(text)), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False,
                     eos: bool = False) -> list[list[int]]:
        """`[encode(t, bos, eos) for t in texts]`, batched where the backend can."""
        texts = [self._check_text(t) for t in texts]
        return [self._wrap(ids, bos, eos) for ids in self._encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])

    # -- config ----------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "stop_ids": sorted(self.stop_ids), "add_bos": self.add_bos}

    def save(self, folder: PathLike) -> Path:
        """Writes `folder/<source_file>` and `folder/tokenizer_config.json`; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_file(folder / self.source_file)
        _write_config(folder, self.config())
        return folder

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, stop_ids={sorted(self.stop_ids)})")

    # -- for subclasses ----------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _save_file(self, target: Path) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_text(text: Any) -> str:
        if type(text) is not str:
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return text

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids


def _copy_file(src: Path, target: Path) -> None:
    if src.resolve() != target.resolve():
        shutil.copyfile(src, target)


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found; expected {what}")
    return path


# --------------------------------------------------------------------------------------------
# Llama 3 on tiktoken (Meta's llama_models/llama3/tokenizer.py)
# --------------------------------------------------------------------------------------------

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
    path = _require_file(Path(path), "a tiktoken BPE rank file (Llama 3 tokenizer.model)")
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
    Meta's own `pad_id` is <|finetune_right_pad_id|>).
    """

    kind = KIND_LLAMA3
    source_file = MODEL_FILE

    def __init__(self, model_path: PathLike, *, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 stop_ids: Optional[Iterable[int]] = None, add_bos: bool = True):
        import tiktoken

        model_path = Path(model_path)
        ranks = load_tiktoken_ranks(model_path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = llama3_special_tokens(self.num_base_tokens)
        self.model = tiktoken.Encoding(name=model_path.name, pat_str=LLAMA3_PAT_STR,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        st = self.special_tokens
        defaults = self.default_ids(self.num_base_tokens)
        super().__init__(
            bos_id=defaults["bos_id"] if bos_id is None else bos_id,
            eos_id=defaults["eos_id"] if eos_id is None else eos_id,
            pad_id=defaults["pad_id"] if pad_id is None else pad_id,
            stop_ids=defaults["stop_ids"] if stop_ids is None else stop_ids,
            vocab_size=self.num_base_tokens + len(st), add_bos=add_bos, path=model_path)
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
        _copy_file(self.path, target)


# --------------------------------------------------------------------------------------------
# sentencepiece (Llama 2 style tokenizer.model)
# --------------------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; bos/eos from the model, pad = the model's pad or else eos."""

    kind = KIND_SENTENCEPIECE
    source_file = MODEL_FILE

    def __init__(self, model_path: PathLike, *, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 stop_ids: Optional[Iterable[int]] = None, add_bos: bool = True):
        import sentencepiece as spm

        model_path = _require_file(Path(model_path), "a sentencepiece model (tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_path.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with a terse text
            raise TokenizerError(f"{model_path}: not a sentencepiece model ({e}); "
                                 f"a Llama 3 tiktoken file is kind 'llama3_tiktoken'") from None
        d = self.defaults_from_model(self.sp, model_path)
        super().__init__(
            bos_id=d["bos_id"] if bos_id is None else bos_id,
            eos_id=d["eos_id"] if eos_id is None else eos_id,
            pad_id=d["pad_id"] if pad_id is None else pad_id,
            stop_ids=d["stop_ids"] if stop_ids is None else stop_ids,
            vocab_size=self.sp.get_piece_size(), add_bos=add_bos, path=model_path)

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
        _copy_file(self.path, target)


# --------------------------------------------------------------------------------------------
# HF tokenizers JSON (what we build from GGUF byte-level BPE metadata)
# --------------------------------------------------------------------------------------------

class HFJsonTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from `tokenizer.json`; ids come from the config (required).

    Special tokens in the text are encoded as plain text (`encode_special_tokens=True`), like the
    other kinds; decode keeps special tokens' text, like tiktoken.
    """

    kind = KIND_HF_JSON
    source_file = JSON_FILE

    def __init__(self, json_path: PathLike, *, bos_id: int, eos_id: int, pad_id: int,
                 stop_ids: Iterable[int], add_bos: bool = False):
        from tokenizers import Tokenizer as HFTokenizer

        json_path = _require_file(Path(json_path), "a HF tokenizers tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(json_path))
        except Exception as e:
            raise TokenizerError(f"{json_path}: not a valid HF tokenizers JSON ({e})") from None
        self.tok.encode_special_tokens = True
        super().__init__(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, stop_ids=stop_ids,
                         vocab_size=self.tok.get_vocab_size(with_added_tokens=True),
                         add_bos=add_bos, path=json_path)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _save_file(self, target: Path) -> None:
        _copy_file(self.path, target)


# --------------------------------------------------------------------------------------------
# GGUF byte-level BPE -> tokenizer.json
# --------------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer types (`tokenizer.ggml.pre`), as in llama-vocab.cpp.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2 regex (what tokenizers' ByteLevel(use_regex=True) applies).
GGUF_PRE_GPT2 = ("gpt-2", "gpt2", "default")
# llama.cpp: "\p{N}" split first, then the GPT-2 regex; HF: Digits(individual) + ByteLevel.
GGUF_PRE_DIGITS_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                        "minerva")
# llama.cpp LLAMA3 pre type: Meta's pattern, and ignore_merges (whole-word vocab hits win).
GGUF_PRE_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx")
GGUF_PRE_QWEN2 = ("qwen2", "deepseek-r1-qwen")
GGUF_PRE_TYPES = GGUF_PRE_GPT2 + GGUF_PRE_DIGITS_GPT2 + GGUF_PRE_LLAMA3 + GGUF_PRE_QWEN2
# Tokens llama.cpp treats as end-of-generation when it finds them among the control tokens.
_EOG_TOKEN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                    "<end_of_turn>", "<|end|>", "</s>", "<EOT>", "<|return|>", "<|call|>")
GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char map (the alphabet byte-level BPE vocabularies use)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _gguf_value(reader, key: str, source: str, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise TokenizerError(f"{source}: GGUF metadata has no {key!r}; expected it for a "
                                 f"byte-level BPE tokenizer")
        return None
    return field.contents()


def read_gguf_tokenizer_metadata(gguf_reader_or_path) -> dict:
    """The `tokenizer.ggml.*` metadata a byte-level BPE tokenizer needs, as plain Python values."""
    from gguf import GGUFReader

    if isinstance(gguf_reader_or_path, (str, os.PathLike)):
        path = _require_file(Path(gguf_reader_or_path), "a GGUF file")
        try:
            reader = GGUFReader(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from None
        source = str(path)
    else:
        reader = gguf_reader_or_path
        source = str(getattr(reader, "path", None) or "GGUF reader")
    meta = {"source": source}
    meta["model"] = _gguf_value(reader, "tokenizer.ggml.model", source)
    meta["pre"] = _gguf_value(reader, "tokenizer.ggml.pre", source, required=False)
    meta["tokens"] = list(_gguf_value(reader, "tokenizer.ggml.tokens", source))
    meta["token_type"] = _gguf_value(reader, "tokenizer.ggml.token_type", source, required=False)
    meta["merges"] = _gguf_value(reader, "tokenizer.ggml.merges", source,
                                 required=meta["model"] == "gpt2")
    for name in ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id",
                 "eom_token_id"):
        meta[name] = _gguf_value(reader, f"tokenizer.ggml.{name}", source, required=False)
    meta["add_bos_token"] = _gguf_value(reader, "tokenizer.ggml.add_bos_token", source,
                                        required=False)
    return meta


def build_gguf_bpe_tokenizer(meta: Mapping[str, Any]):
    """A `tokenizers.Tokenizer` for GGUF byte-level BPE metadata (`tokenizer.ggml.model` gpt2).

    BPE over the file's vocabulary and merges, the split regex of `tokenizer.ggml.pre`, ByteLevel
    byte mapping and decoder, CONTROL tokens (type 3) added as special tokens and USER_DEFINED
    (type 4) as plain added tokens (llama.cpp matches both whole). No post-processor: BOS/EOS
    are added by `Tokenizer.encode`.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    source = meta.get("source", "GGUF")
    if meta.get("model") != "gpt2":
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model is {meta.get('model')!r}; only 'gpt2' (byte-level "
            f"BPE) can be built from GGUF metadata")
    pre = meta.get("pre") or "default"
    if pre not in GGUF_PRE_TYPES:
        raise TokenizerError(f"{source}: unsupported tokenizer.ggml.pre {pre!r}; "
                             f"supported: {sorted(GGUF_PRE_TYPES)}")
    if pre == "default":
        warnings.warn(f"{source}: no specific tokenizer.ggml.pre; using the GPT-2 split regex "
                      f"(as transformers does; llama.cpp's 'default' splits slightly differently)",
                      stacklevel=2)
    tokens = list(meta["tokens"])
    types = list(meta.get("token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        if spelled in vocab:
            raise TokenizerError(f"{source}: token {tok!r} (id {i}) duplicates id {vocab[spelled]}")
        vocab[spelled] = i
    merges = []
    for lineno, m in enumerate(meta["merges"]):
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{source}: merge #{lineno} {m!r} is not `left right`")
        merges.append((parts[0], parts[1]))

    llama3 = pre in GGUF_PRE_LLAMA3
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                                 byte_fallback=False, ignore_merges=llama3,
                                 continuing_subword_prefix="", end_of_word_suffix=""))
    if pre in GGUF_PRE_GPT2:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in GGUF_PRE_DIGITS_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        split = LLAMA3_PAT_STR if llama3 else _QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    # CONTROL tokens spelled outside the byte alphabet are llama.cpp mislabels (not real
    # specials); they stay ordinary vocabulary entries.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types)
                            if ty == GGUF_TOKEN_TYPE_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types)
                    if ty == GGUF_TOKEN_TYPE_USER_DEFINED and t in vocab])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        built = tok.get_vocab_size(with_added_tokens=True)
        raise TokenizerError(f"{source}: built a vocabulary of {built}, expected {len(tokens)}")
    return tok


def gguf_tokenizer_ids(meta: Mapping[str, Any]) -> dict:
    """bos/eos/pad/stop ids and add_bos for GGUF metadata (llama.cpp's conventions)."""
    source = meta.get("source", "GGUF")
    tokens = meta["tokens"]
    types = list(meta.get("token_type") or [1] * len(tokens))
    bos, eos = meta.get("bos_token_id"), meta.get("eos_token_id")
    if eos is None:
        raise TokenizerError(f"{source}: GGUF metadata has no 'tokenizer.ggml.eos_token_id'")
    if bos is None:
        bos = eos
    pad = meta.get("padding_token_id")
    stop = {int(eos)}
    for key in ("eot_token_id", "eom_token_id"):
        if meta.get(key) is not None:
            stop.add(int(meta[key]))
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == GGUF_TOKEN_TYPE_CONTROL and t in _EOG_TOKEN_TEXTS:
            stop.add(i)
    add_bos = meta.get("add_bos_token")
    return {"bos_id": int(bos), "eos_id": int(eos), "pad_id": int(eos if pad is None else pad),
            "stop_ids": sorted(stop), "add_bos": bool(add_bos) if add_bos is not None else False}


# --------------------------------------------------------------------------------------------
# Folder: load / write
# --------------------------------------------------------------------------------------------

def _write_config(folder: Path, config: Mapping[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")


def read_tokenizer_config(folder: PathLike) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: tokenizer folder not found; expected a folder with "
                             f"{CONFIG_FILE} and {MODEL_FILE} or {JSON_FILE}")
    path = _require_file(folder / CONFIG_FILE,
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
    return cfg


def load_tokenizer(folder: PathLike) -> Tokenizer:
    """The tokenizer in `folder` (tokenizer_config.json + tokenizer.model or tokenizer.json)."""
    folder = Path(folder)
    cfg = read_tokenizer_config(folder)
    kind = cfg["kind"]
    file = folder / KIND_FILES[kind]
    _require_file(file, f"the {KIND_FILES[kind]} of kind {kind!r} named in {folder / CONFIG_FILE}")
    ids = dict(bos_id=cfg["bos_id"], eos_id=cfg["eos_id"], pad_id=cfg["pad_id"],
               stop_ids=cfg["stop_ids"])
    if kind == KIND_LLAMA3:
        return Llama3Tokenizer(file, add_bos=cfg.get("add_bos", True), **ids)
    if kind == KIND_SENTENCEPIECE:
        return SentencePieceTokenizer(file, add_bos=cfg.get("add_bos", True), **ids)
    return HFJsonTokenizer(file, add_bos=cfg.get("add_bos", False), **ids)


def save_tokenizer_files(tokenizer: Tokenizer, folder: PathLike) -> Path:
    """Writes a loaded tokenizer's file and config into `folder`; returns the folder."""
    return tokenizer.save(folder)


def detect_tokenizer_model_kind(path: PathLike) -> str:
    """'llama3_tiktoken' or 'sentencepiece' for a `tokenizer.model` (Meta ships both names)."""
    path = _require_file(Path(path), "a tokenizer.model (tiktoken rank file or sentencepiece)")
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


def write_llama3_tokenizer(src_tokenizer_model: PathLike, folder: PathLike) -> Llama3Tokenizer:
    """Copies Meta's Llama 3 `tokenizer.model` into `folder` with its config; returns it loaded."""
    tok = Llama3Tokenizer(src_tokenizer_model)          # validates the source first
    tok.save(folder)
    return load_tokenizer(folder)


def write_sentencepiece_tokenizer(src_model: PathLike, folder: PathLike) -> SentencePieceTokenizer:
    """Copies a sentencepiece `tokenizer.model` into `folder` with its config; returns it loaded."""
    tok = SentencePieceTokenizer(src_model)
    tok.save(folder)
    return load_tokenizer(folder)


def write_gguf_tokenizer(gguf_reader_or_path, folder: PathLike) -> HFJsonTokenizer:
    """Builds `folder/tokenizer.json` from a GGUF's byte-level BPE metadata, writes the config,
    and returns the tokenizer loaded from the folder."""
    meta = read_gguf_tokenizer_metadata(gguf_reader_or_path)
    tok = build_gguf_bpe_tokenizer(meta)
    ids = gguf_tokenizer_ids(meta)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / JSON_FILE))
    _write_config(folder, {"kind": KIND_HF_JSON, **ids})
    return load_tokenizer(folder)


__all__ = [
    "Tokenizer", "TokenizerError", "Llama3Tokenizer", "SentencePieceTokenizer", "HFJsonTokenizer",
    "load_tokenizer", "read_tokenizer_config", "save_tokenizer_files",
    "detect_tokenizer_model_kind",
    "write_llama3_tokenizer", "write_sentencepiece_tokenizer", "write_gguf_tokenizer",
    "read_gguf_tokenizer_metadata", "build_gguf_bpe_tokenizer", "gguf_tokenizer_ids",
    "llama3_special_tokens", "load_tiktoken_ranks", "LLAMA3_PAT_STR", "KINDS",
]
