"""Tokenizers behind one interface: Llama 3 (tiktoken), sentencepiece, byte-level BPE from GGUF.

    tok = load_tokenizer("DIR/tokenizer")        # reads tokenizer_config.json + the file beside it
    ids = tok.encode("Hallo Welt", bos=True)     # [bos_id, ...]
    ids = encode_prompt(tok, "Hallo Welt")       # BOS iff tok.add_bos (the model's own rule)
    ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True),
                     allowed_special="all")      # chat-formatted text: specials become ids
    text = tok.decode(ids)
    tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size, tok.add_bos,
    tok.special_tokens, tok.chat_template

By default `encode` never turns text into special tokens: a literal "<|eot_id|>" (or
"<|im_end|>", "<s>") is encoded as plain text, as Meta's Llama 3 `Tokenizer.encode` does
(`allowed_special=set()`); `allowed_special="all"` or a set of special-token strings parses them
(tiktoken's argument).

`add_bos` per kind: llama3_tiktoken True (Meta); sentencepiece True (Meta's Llama 2); hf_json as
recorded at conversion (GGUF: `tokenizer.ggml.add_bos_token`, else llama.cpp's default for the
pre type; HF folder: tokenizer_config.json `add_bos_token`, else the tokenizer.json
post-processor), and for a folder without the field, the post-processor's behaviour.

Modules: base (interface, errors, `encode_prompt`), llama3, sentencepiece, hf_json, gguf_bpe
(tokenizer.json from GGUF metadata), chat (chat templates), folder (load / write folders).
The heavy libraries (tiktoken, sentencepiece, tokenizers, gguf, jinja2) load only when needed.
"""

from gptk_jax.tokenizers.base import (CHAT_TEMPLATE_FILE, CONFIG_FILE, JSON_FILE, KIND_FILES,
                                      KIND_HF_JSON, KIND_LLAMA3, KIND_SENTENCEPIECE, KINDS,
                                      MODEL_FILE, PathLike, Tokenizer, TokenizerError,
                                      encode_prompt)
from gptk_jax.tokenizers.chat import read_hf_chat_template, render_chat_template
from gptk_jax.tokenizers.folder import (DEFAULT_ADD_BOS, detect_tokenizer_model_kind,
                                        load_tokenizer, read_tokenizer_config,
                                        save_tokenizer_files, write_gguf_tokenizer,
                                        write_llama3_tokenizer, write_sentencepiece_tokenizer)
from gptk_jax.tokenizers.gguf_bpe import (GGUF_PRE_DIGITS_GPT2, GGUF_PRE_GPT2, GGUF_PRE_LLAMA3,
                                          GGUF_PRE_QWEN2, GGUF_PRE_TYPES,
                                          GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED,
                                          _bytes_to_unicode, build_gguf_bpe_tokenizer,
                                          gguf_add_bos, gguf_tokenizer_ids,
                                          read_gguf_tokenizer_metadata)
from gptk_jax.tokenizers.hf_json import HFJsonTokenizer, post_processor_adds_bos
from gptk_jax.tokenizers.llama3 import (LLAMA3_NAMED_SPECIAL_TOKENS,
                                        LLAMA3_NUM_RESERVED_SPECIAL_TOKENS, LLAMA3_PAT_STR,
                                        MAX_NO_WHITESPACES_CHARS, TIKTOKEN_MAX_ENCODE_CHARS,
                                        Llama3Tokenizer, llama3_special_tokens,
                                        load_tiktoken_ranks)
from gptk_jax.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = [
    "Tokenizer", "TokenizerError", "Llama3Tokenizer", "SentencePieceTokenizer", "HFJsonTokenizer",
    "encode_prompt", "render_chat_template", "read_hf_chat_template",
    "load_tokenizer", "read_tokenizer_config", "save_tokenizer_files",
    "detect_tokenizer_model_kind", "DEFAULT_ADD_BOS",
    "write_llama3_tokenizer", "write_sentencepiece_tokenizer", "write_gguf_tokenizer",
    "read_gguf_tokenizer_metadata", "build_gguf_bpe_tokenizer", "gguf_tokenizer_ids",
    "gguf_add_bos", "post_processor_adds_bos",
    "llama3_special_tokens", "load_tiktoken_ranks", "LLAMA3_PAT_STR",
    "LLAMA3_NAMED_SPECIAL_TOKENS", "LLAMA3_NUM_RESERVED_SPECIAL_TOKENS",
    "TIKTOKEN_MAX_ENCODE_CHARS", "MAX_NO_WHITESPACES_CHARS",
    "GGUF_PRE_GPT2", "GGUF_PRE_DIGITS_GPT2", "GGUF_PRE_LLAMA3", "GGUF_PRE_QWEN2",
    "GGUF_PRE_TYPES", "GGUF_TOKEN_TYPE_CONTROL", "GGUF_TOKEN_TYPE_USER_DEFINED",
    "KINDS", "KIND_LLAMA3", "KIND_SENTENCEPIECE", "KIND_HF_JSON", "KIND_FILES",
    "CONFIG_FILE", "MODEL_FILE", "JSON_FILE", "CHAT_TEMPLATE_FILE", "PathLike",
]
