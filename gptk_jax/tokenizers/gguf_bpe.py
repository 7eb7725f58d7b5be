"""GGUF byte-level BPE metadata (`tokenizer.ggml.model` "gpt2") -> an HF tokenizer.json.

    meta = read_gguf_tokenizer_metadata(path_or_reader)    # plain Python values
    hf = build_gguf_bpe_tokenizer(meta)                     # a `tokenizers.Tokenizer`
    ids = gguf_tokenizer_ids(meta)                          # bos/eos/pad/stop ids, add_bos

The rules follow llama.cpp (llama-vocab.cpp): the split regex of `tokenizer.ggml.pre`, CONTROL
tokens special, USER_DEFINED tokens matched whole, end-of-generation tokens found by their text,
and its BOS rule (`tokenizer.ggml.add_bos_token`, else the pre type's default).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

from gptk_jax.tokenizers.base import TokenizerError, require_file
from gptk_jax.tokenizers.llama3 import LLAMA3_PAT_STR

# llama.cpp's pre-tokenizer types (`tokenizer.ggml.pre`), as in llama-vocab.cpp.
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
# Pre types llama.cpp gives `tokenizer_add_bos = true` when the file has no add_bos_token key
# (every other byte-level BPE type defaults to no BOS).
GGUF_PRE_ADD_BOS = ("llama3", "llama-v3", "llama-bpe", "falcon3")
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


# --- reading ----------------------------------------------------------------------------------

def _gguf_value(reader, key: str, source: str, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise TokenizerError(f"{source}: GGUF metadata has no {key!r}; expected it for a "
                                 f"byte-level BPE tokenizer")
        return None
    return field.contents()


def _open_reader(gguf_reader_or_path) -> tuple[Any, str]:
    from gguf import GGUFReader

    if not isinstance(gguf_reader_or_path, (str, os.PathLike)):
        reader = gguf_reader_or_path
        return reader, str(getattr(reader, "path", None) or "GGUF reader")
    path = require_file(Path(gguf_reader_or_path), "a GGUF file")
    try:
        return GGUFReader(str(path)), str(path)
    except Exception as e:
        raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from None


def read_gguf_tokenizer_metadata(gguf_reader_or_path) -> dict:
    """The `tokenizer.ggml.*` metadata a byte-level BPE tokenizer needs, as plain Python values
    (plus `chat_template`: `tokenizer.chat_template`, or None)."""
    reader, source = _open_reader(gguf_reader_or_path)
    meta = {"source": source}
    meta["model"] = _gguf_value(reader, "tokenizer.ggml.model", source)
    meta["pre"] = _gguf_value(reader, "tokenizer.ggml.pre", source, required=False)
    meta["tokens"] = list(_gguf_value(reader, "tokenizer.ggml.tokens", source))
    meta["token_type"] = _gguf_value(reader, "tokenizer.ggml.token_type", source, required=False)
    meta["merges"] = _gguf_value(reader, "tokenizer.ggml.merges", source,
                                 required=meta["model"] == "gpt2")
    for name in ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id",
                 "eom_token_id", "add_bos_token"):
        meta[name] = _gguf_value(reader, f"tokenizer.ggml.{name}", source, required=False)
    meta["chat_template"] = _gguf_value(reader, "tokenizer.chat_template", source,
                                        required=False)
    return meta


# --- building ---------------------------------------------------------------------------------

def _checked_pre_type(meta: Mapping[str, Any], source: str) -> str:
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
                      stacklevel=3)
    return pre


def _token_types(meta: Mapping[str, Any], source: str) -> list[int]:
    tokens = meta["tokens"]
    types = list(meta.get("token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    return types


def _byte_level_vocab(tokens: list[str], alphabet: set, source: str) -> dict[str, int]:
    """token spelling -> id; tokens outside the byte alphabet are spelled byte by byte."""
    spelling = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        if spelled in vocab:
            raise TokenizerError(f"{source}: token {tok!r} (id {i}) duplicates id {vocab[spelled]}")
        vocab[spelled] = i
    return vocab


def _merge_pairs(merges, source: str) -> list[tuple[str, str]]:
    pairs = []
    for lineno, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{source}: merge #{lineno} {m!r} is not `left right`")
        pairs.append((parts[0], parts[1]))
    return pairs


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre in GGUF_PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GGUF_PRE_DIGITS_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = LLAMA3_PAT_STR if pre in GGUF_PRE_LLAMA3 else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _add_gguf_added_tokens(tok, tokens: list[str], types: list[int], vocab: Mapping[str, int],
                           alphabet: set) -> None:
    """CONTROL tokens as special tokens, USER_DEFINED ones as plain added tokens. CONTROL
    tokens spelled outside the byte alphabet are llama.cpp mislabels (not real specials); they
    stay ordinary vocabulary entries."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types)
                            if ty == GGUF_TOKEN_TYPE_CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types)
                    if ty == GGUF_TOKEN_TYPE_USER_DEFINED and t in vocab])


def _bos_post_processor(meta: Mapping[str, Any]):
    """TemplateProcessing "BOS $A" when llama.cpp would add BOS (so transformers reading the
    tokenizer.json adds it too); None otherwise."""
    from tokenizers import processors

    bos = meta.get("bos_token_id")
    if bos is None:
        bos = meta.get("eos_token_id")
    if not gguf_add_bos(meta) or bos is None or not 0 <= int(bos) < len(meta["tokens"]):
        return None
    text = meta["tokens"][int(bos)]
    return processors.TemplateProcessing(single=f"{text}:0 $A:0", pair=f"{text}:0 $A:0 $B:1",
                                         special_tokens=[(text, int(bos))])


def build_gguf_bpe_tokenizer(meta: Mapping[str, Any]):
    """A `tokenizers.Tokenizer` for GGUF byte-level BPE metadata (`tokenizer.ggml.model` gpt2).

    BPE over the file's vocabulary and merges, the split regex of `tokenizer.ggml.pre`, ByteLevel
    byte mapping and decoder, CONTROL tokens (type 3) added as special tokens and USER_DEFINED
    (type 4) as plain added tokens (llama.cpp matches both whole), and a BOS post-processor when
    `gguf_add_bos` (our `Tokenizer.encode` never applies it; transformers would).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    source = meta.get("source", "GGUF")
    pre = _checked_pre_type(meta, source)
    tokens = list(meta["tokens"])
    types = _token_types(meta, source)
    alphabet = set(_bytes_to_unicode().values())
    vocab = _byte_level_vocab(tokens, alphabet, source)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(meta["merges"], source),
                                 dropout=None, fuse_unk=False, byte_fallback=False,
                                 ignore_merges=pre in GGUF_PRE_LLAMA3,
                                 continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(tok, tokens, types, vocab, alphabet)
    post = _bos_post_processor(meta)
    if post is not None:
        tok.post_processor = post
    built = tok.get_vocab_size(with_added_tokens=True)
    if built != len(tokens):
        raise TokenizerError(f"{source}: built a vocabulary of {built}, expected {len(tokens)}")
    return tok


# --- ids --------------------------------------------------------------------------------------

def gguf_add_bos(meta: Mapping[str, Any]) -> bool:
    """llama.cpp's rule: `tokenizer.ggml.add_bos_token` when present, else True only for the
    Llama 3 pre types (SmolLM2: the key is false; transformers adds no BOS either)."""
    add_bos = meta.get("add_bos_token")
    if add_bos is not None:
        return bool(add_bos)
    return (meta.get("pre") or "default") in GGUF_PRE_ADD_BOS


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
    pad: Optional[int] = meta.get("padding_token_id")
    stop = {int(eos)}
    for key in ("eot_token_id", "eom_token_id"):
        if meta.get(key) is not None:
            stop.add(int(meta[key]))
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == GGUF_TOKEN_TYPE_CONTROL and t in _EOG_TOKEN_TEXTS:
            stop.add(i)
    return {"bos_id": int(bos), "eos_id": int(eos), "pad_id": int(eos if pad is None else pad),
            "stop_ids": sorted(stop), "add_bos": gguf_add_bos(meta)}
