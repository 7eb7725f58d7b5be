"""The tokenizer interface every kind implements, its errors, and the prompt-encoding rule.

    ids = tok.encode(text, bos=False, eos=False, allowed_special=frozenset())
    ids = encode_prompt(tok, text)            # BOS exactly when the tokenizer's `add_bos` says

Special-token text is plain text unless it is allowed: with the default `allowed_special`
(empty) a literal "<|eot_id|>" in `text` is encoded like any other characters (Meta's Llama 3
`Tokenizer.encode` default). `allowed_special="all"` or a set of special-token strings makes
those strings their ids (tiktoken's `allowed_special`); the text between them is encoded as if
it stood alone, so each kind keeps its own rules there (sentencepiece: a dummy-prefix space per
stretch, as Meta's Llama 2 chat format encodes each turn separately).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import AbstractSet, Any, Iterable, Mapping, Optional, Sequence, Union

from gptk_jax.errors import GptkError

PathLike = Union[str, "os.PathLike[str]"]
AllowedSpecial = Union[str, AbstractSet[str], Sequence[str]]

CONFIG_FILE = "tokenizer_config.json"
MODEL_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"
# transformers' own file name for a chat template stored beside the tokenizer.
CHAT_TEMPLATE_FILE = "chat_template.jinja"

KIND_LLAMA3 = "llama3_tiktoken"
KIND_SENTENCEPIECE = "sentencepiece"
KIND_HF_JSON = "hf_json"
KINDS = (KIND_LLAMA3, KIND_SENTENCEPIECE, KIND_HF_JSON)
KIND_FILES = {KIND_LLAMA3: MODEL_FILE, KIND_SENTENCEPIECE: MODEL_FILE, KIND_HF_JSON: JSON_FILE}


class TokenizerError(GptkError, ValueError):
    """A tokenizer file or folder that is missing, malformed or not what was expected."""


class Tokenizer:
    """The interface every tokenizer implements (see docs/design.md).

    Subclasses set `special_tokens` (special-token text -> id) before calling `__init__` and
    implement `_encode`, `_decode`, `_save_file` (and `_encode_batch` where batching helps).
    """

    kind: str = ""
    source_file: str = ""          # the file this kind reads: tokenizer.model or tokenizer.json
    special_tokens: Mapping[str, int] = MappingProxyType({})

    def __init__(self, *, bos_id: int, eos_id: int, pad_id: int, stop_ids: Iterable[int],
                 vocab_size: int, add_bos: bool = True, chat_template: Optional[str] = None,
                 path: Optional[Path] = None):
        self._vocab_size = int(vocab_size)
        self._bos_id = self._check_id("bos_id", bos_id, path)
        self._eos_id = self._check_id("eos_id", eos_id, path)
        self._pad_id = self._check_id("pad_id", pad_id, path)
        self._stop_ids = frozenset(self._check_id("stop_ids", i, path) for i in stop_ids)
        if not self._stop_ids:
            raise TokenizerError(f"{path or self.kind}: stop_ids is empty; "
                                 f"expected at least eos_id")
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{path or self.kind}: add_bos must be true or false, "
                                 f"got {add_bos!r}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"{path or self.kind}: chat_template must be a str, "
                                 f"got {type(chat_template).__name__}")
        self._add_bos = add_bos
        self._chat_template = chat_template
        self._special_patterns: dict[frozenset, re.Pattern] = {}
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
        """Whether the model's own convention prepends BOS to a prompt (`encode_prompt` obeys)."""
        return self._add_bos

    @property
    def chat_template(self) -> Optional[str]:
        """The model's jinja chat template (transformers' `chat_template`), or None."""
        return self._chat_template

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        text = self._check_text(text)
        pattern = self._special_pattern(allowed_special)
        ids = self._encode(text) if pattern is None else self._encode_special(text, pattern)
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     allowed_special: AllowedSpecial = frozenset()) -> list[list[int]]:
        """`[encode(t, bos, eos, allowed_special) for t in texts]`, batched where it can be."""
        texts = [self._check_text(t) for t in texts]
        pattern = self._special_pattern(allowed_special)
        encoded = (self._encode_batch(texts) if pattern is None
                   else [self._encode_special(t, pattern) for t in texts])
        return [self._wrap(ids, bos, eos) for ids in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        """A token's text; a special token's own spelling ("<|im_end|>", "<s>")."""
        for text, i in self.special_tokens.items():
            if i == token_id:
                return text
        return self.decode([token_id])

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = False, **variables: Any) -> str:
        """`messages` ([{"role", "content"}, ...]) through the chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` renders them. Encode the result with
        `allowed_special="all"` (and `bos=False` where the template writes BOS itself)."""
        from gptk_jax.tokenizers.chat import render_chat_template

        if self._chat_template is None:
            raise TokenizerError(f"{self.path or self.kind}: this tokenizer has no chat template "
                                 f"(none in its source files)")
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        for name, token_id in names.items():
            variables.setdefault(name, self.token_text(token_id))
        return render_chat_template(self._chat_template, messages,
                                    add_generation_prompt=add_generation_prompt, **variables)

    # -- config ----------------------------------------------------------------------------
    def config(self) -> dict:
        return {"kind": self.kind, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "stop_ids": sorted(self.stop_ids), "add_bos": self.add_bos}

    def save(self, folder: PathLike) -> Path:
        """Writes `folder/<source_file>`, `folder/tokenizer_config.json` and, when there is one,
        `folder/chat_template.jinja`; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_file(folder / self.source_file)
        write_config(folder, self.config())
        write_chat_template(folder, self._chat_template)
        return folder

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, stop_ids={sorted(self.stop_ids)}, "
                f"add_bos={self.add_bos})")

    # -- for subclasses ----------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _save_file(self, target: Path) -> None:
        raise NotImplementedError

    # -- special tokens in text ----------------------------------------------------------------
    def _special_pattern(self, allowed_special: AllowedSpecial) -> Optional[re.Pattern]:
        """The regex matching the allowed special tokens (longest first); None for none."""
        if isinstance(allowed_special, str):
            if allowed_special != "all":
                raise TypeError(f"allowed_special is 'all' or a set of special-token strings, "
                                f"got the string {allowed_special!r}")
            allowed = frozenset(self.special_tokens)
        else:
            allowed = frozenset(allowed_special)
            unknown = sorted(t for t in allowed if t not in self.special_tokens)
            if unknown:
                raise TokenizerError(f"{self.path or self.kind}: {unknown} in allowed_special "
                                     f"are not special tokens of this tokenizer")
        if not allowed:
            return None
        if allowed not in self._special_patterns:
            alternatives = sorted(allowed, key=lambda t: (-len(t), t))
            self._special_patterns[allowed] = re.compile("|".join(map(re.escape, alternatives)))
        return self._special_patterns[allowed]

    def _encode_special(self, text: str, pattern: re.Pattern) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                ids.extend(self._encode(text[start:match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(text) or not ids:
            ids.extend(self._encode(text[start:]))
        return ids

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


def encode_prompt(tokenizer: Tokenizer, text: str, bos: Optional[bool] = None, *,
                  allowed_special: AllowedSpecial = frozenset()) -> list[int]:
    """A prompt's ids under one BOS rule, the tokenizer's: BOS first iff `tokenizer.add_bos`
    (or `bos` when given). Text rendered by a chat template that writes BOS itself wants
    `bos=False`."""
    add = tokenizer.add_bos if bos is None else bool(bos)
    return tokenizer.encode(text, bos=add, allowed_special=allowed_special)


def ids_or_defaults(defaults: Mapping[str, Any], **given: Any) -> dict:
    """`given` (bos_id=…, eos_id=…), each None replaced by its entry in `defaults`."""
    return {name: defaults[name] if value is None else value for name, value in given.items()}


# --- files ------------------------------------------------------------------------------------

def copy_file(src: Path, target: Path) -> None:
    if src.resolve() != target.resolve():
        shutil.copyfile(src, target)


def require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found; expected {what}")
    return path


def write_config(folder: Path, config: Mapping[str, Any]) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")


def write_chat_template(folder: Path, template: Optional[str]) -> None:
    """`folder/chat_template.jinja` holds `template`; no template, no file."""
    path = folder / CHAT_TEMPLATE_FILE
    if template is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(template, encoding="utf-8")
