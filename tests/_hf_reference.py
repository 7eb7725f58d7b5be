"""HF transformers' LlamaForCausalLM as a test oracle, and the files it and llama.cpp write.

    model = build_hf_model(hf_config(n_kv_heads=2, tied=True, rope_factor=32), seed=0)
    write_hf_checkpoint(folder, model, max_shard_size="20KB")      # config.json + safetensors
    write_gguf(path, model, types={...})                           # llama.cpp's layout
    hf_logits(model, tokens, positions), hf_greedy(model, prompt, steps)

The GGUF writer does what llama.cpp's convert_hf_to_gguf.py does for a Llama (its `permute` of
q/k into Meta's interleaved-pair layout, its tensor names, its `rope_freqs.weight` for Llama 3
scaling) with gguf-py's `GGUFWriter` and `gguf.quants.quantize`; transformers reading that GGUF
back (`from_pretrained(..., gguf_file=...)`) un-permutes with its own code.

Plus `our_logits` / `our_greedy`: the converted model through `Llama.apply`, greedy with the
explicit KV cache one token per call (jitted), shared by the HF, GGUF and SmolLM2 tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama

VOCAB = 260
BYTE_TOKENS = 256
BOS_ID, EOS_ID = 258, 259  # the tiny tokenizer's specials (see tiny_tokenizer_json)


# --- the HF model -------------------------------------------------------------------------------

def hf_config(*, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
              ffn_dim: int = 128, vocab: int = VOCAB, tied: bool = False,
              rope_factor: Optional[float] = None, rope_theta: float = 500000.0,
              init_std: float = 0.2):
    """A tiny transformers LlamaConfig; rope_factor: Llama 3 scaling (None: off)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": float(rope_factor),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    return LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn_dim,
                       num_hidden_layers=n_layers, num_attention_heads=n_heads,
                       num_key_value_heads=n_kv_heads, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_parameters=rope,
                       initializer_range=init_std, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=None)


def build_hf_model(config, seed: int = 0):
    """LlamaForCausalLM with random float32 weights; norms random too (so a swapped norm shows)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def tiny_tokenizer_json(folder: Path) -> None:
    """A byte-level BPE tokenizer.json (256 byte tokens, 2 merges, <s>=258 and </s>=259 special)
    plus tokenizer_config.json, as HF folders carry them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    vocab = {alphabet[b]: b for b in range(BYTE_TOKENS)}
    vocab.update({"Ġt": 256, "he": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("</s>") == EOS_ID
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_hf_checkpoint(folder: Path, model, *, max_shard_size: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, legacy_rope_config: bool = False,
                        tokenizer: bool = True) -> Path:
    """`save_pretrained` (safetensors; sharded with max_shard_size) + tokenizer files.

    legacy_rope_config rewrites config.json the way Llama 3.2's real file spells RoPE
    (top-level rope_theta + rope_scaling) instead of transformers 5's rope_parameters."""
    import copy

    to_save = model if dtype is None else copy.deepcopy(model).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    to_save.save_pretrained(folder, safe_serialization=True, **kwargs)
    if legacy_rope_config:
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        tiny_tokenizer_json(folder)
    return folder


def hf_logits(model, tokens, positions=None) -> np.ndarray:
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    kwargs = {} if positions is None else \
        {"position_ids": torch.as_tensor(np.asarray(positions), dtype=torch.long)}
    with torch.no_grad():
        return model(tokens, **kwargs).logits.float().numpy()


def hf_greedy(model, prompt, steps: int) -> list[list[int]]:
    """transformers' own greedy `generate` (no stop token, no padding)."""
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=steps, min_new_tokens=steps, eos_token_id=None,
                             pad_token_id=0, num_beams=1)
    return out[:, prompt.shape[1]:].tolist()


def hf_greedy_batch(model, prompts: list[list[int]], steps: int,
                    pad_id: int) -> tuple[list[list[int]], np.ndarray]:
    """`generate` on ragged prompts in one left-padded batch (transformers derives the RoPE
    positions from the attention mask, as our decoder does). Returns the tokens and the logits
    each one was picked from, [B, steps, V] float32."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(p)
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                             min_new_tokens=steps, eos_token_id=None, pad_token_id=pad_id,
                             num_beams=1, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, dim=1).float().numpy()
    return out.sequences[:, width:].tolist(), logits


# --- GGUF, written the way llama.cpp does -------------------------------------------------------

GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: Optional[int]) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama 3 scaling (LlamaModel.generate_extra_tensors)."""
    rope = config.rope_parameters
    base, dim = rope["rope_theta"], config.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = 8192  # llama.cpp reads hparams' original_max_position_embeddings or 8192
    low_wavelen, high_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> float32 torch-order array, q/k permuted as llama.cpp does."""
    cfg = model.config
    out = {}
    for name, value in model.state_dict().items():
        w = value.float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out["output.weight"] = w
        else:
            _, _, layer, rest = name.split(".", 3)
            leaf = rest[:-len(".weight")]
            if leaf.endswith("q_proj"):
                w = llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
            elif leaf.endswith("k_proj"):
                w = llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
            out[f"blk.{layer}.{GGUF_LAYER_NAMES[leaf]}.weight"] = w
    return out


def gguf_tokenizer_metadata(writer) -> None:
    """A byte-level BPE vocabulary of VOCAB tokens as llama.cpp writes it (model gpt2)."""
    import gguf

    tokens = _byte_alphabet() + ["Ġt", "he", "<|im_start|>", "<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * 258 + [gguf.TokenType.CONTROL] * 2
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)


def write_gguf(path: Path, model, *, types: Optional[dict] = None, architecture: str = "llama",
               rope_freqs: Optional[np.ndarray] = None, tokenizer: bool = True,
               drop: tuple = (), feed_forward_length: Optional[int] = None) -> Path:
    """A GGUF of `model`; types maps a tensor-name substring to a GGMLQuantizationType (first
    match wins; default F32; 1-D tensors always F32, as llama.cpp keeps norms). rope_freqs: a
    `rope_freqs.weight` tensor to add; drop: tensor names left out; feed_forward_length: written
    instead of the model's (a metadata / tensor mismatch)."""
    import gguf

    cfg = model.config
    types = types or {}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(feed_forward_length or cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    if tokenizer:
        gguf_tokenizer_metadata(writer)
    tensors = gguf_tensors(model)
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = np.asarray(rope_freqs, np.float32)
    for name in drop:
        del tensors[name]
    for name, w in tensors.items():
        qtype = next((t for key, t in types.items() if key in name), gguf.GGMLQuantizationType.F32)
        if w.ndim == 1:
            qtype = gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_from_gguf(path: Path):
    """transformers' own GGUF loader (dequantizes and un-permutes q/k itself), float32."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                            dtype=torch.float32).eval()


# --- our side -----------------------------------------------------------------------------------

def our_logits(model, tokens, positions=None) -> np.ndarray:
    """Logits of a loaded conversion (`load_converted`) without a cache."""
    tokens = np.asarray(tokens, np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    out = Llama(model.config).apply({"params": model.params}, jnp.asarray(tokens),
                                    jnp.asarray(positions, jnp.int32))
    return np.asarray(out.logits)


def our_greedy(model, prompt, steps: int) -> list[list[int]]:
    """Prefill the prompt into the explicit KV cache, then one jitted call per token."""
    cfg = model.config
    prompt = np.asarray(prompt, np.int32)
    b, t = prompt.shape
    apply = jax.jit(lambda params, tokens, positions, cache: Llama(cfg).apply(
        {"params": params}, tokens, positions, cache, logits_index=jnp.full((b,), tokens.shape[1]
                                                                            - 1, jnp.int32)))
    out = apply(model.params, prompt, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                KVCache.init(cfg, b, t + steps))
    tokens = []
    for step in range(steps):
        nxt = np.asarray(out.logits[:, -1]).argmax(-1).astype(np.int32)
        tokens.append(nxt)
        out = apply(model.params, nxt[:, None], np.full((b, 1), t + step, np.int32), out.cache)
    return np.stack(tokens, 1).tolist()
