"""Shared pieces of every converter: per-tensor transforms and the canonical param tree.

A format reader (meta.py, hf.py, gguf_format.py) maps its tensor names onto the canonical names
below with small per-tensor transforms, then `build_params` stacks the layers. Torch-style
`Linear.weight` is [out, in]; our kernels are [in, out] reshaped to heads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from gptk_jax.errors import GptkError
from gptk_jax.llama.config import LlamaConfig


class ConversionError(GptkError, ValueError):
    """Bad conversion input; the message names the file and tensor/field."""


@dataclasses.dataclass
class Converted:
    """What a format reader hands to the CLI: ready to `save_converted`."""
    config: LlamaConfig
    params: dict                                   # canonical stacked tree (docs/design.md)
    write_tokenizer: Optional[Callable[[Path], None]]
    provenance: dict


ALLOW_SMALL_VOCAB_FLAG = "--allow-small-vocab"


def check_tokenizer_fits(tokenizer_ids: Optional[int], embedding_rows: int, *, tokenizer: str,
                         embedding: str, allow_small_vocab: bool) -> list[str]:
    """A tokenizer with more ids than the embedding has rows is refused: ids past the last row
    would be embedded as NaN (out-of-range gathers) and poison every logit after them. With
    `allow_small_vocab` (tiny test models beside a real tokenizer) it is a warning, returned.
    `tokenizer` / `embedding` say where each size was read (file and field or tensor)."""
    if tokenizer_ids is None or tokenizer_ids <= embedding_rows:
        return []
    problem = (f"{tokenizer} has {tokenizer_ids} token ids but {embedding} has only "
               f"{embedding_rows} rows: ids {embedding_rows}..{tokenizer_ids - 1} cannot be "
               "embedded")
    if not allow_small_vocab:
        raise ConversionError(f"{problem}; pass {ALLOW_SMALL_VOCAB_FLAG} to convert anyway "
                              "(test models only: the converted folder records it)")
    return [f"{problem} (converted anyway: {ALLOW_SMALL_VOCAB_FLAG})"]


def interleaved_to_half_split(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """q/k weight [n_heads*head_dim, in] from Meta's interleaved-pair RoPE layout (also GGUF's)
    to the half-split layout: per head, rows [0,2,4,…,1,3,5,…]."""
    perm = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    out_dim, in_dim = w.shape
    if out_dim != n_heads * head_dim:
        raise ConversionError(f"q/k weight has {out_dim} rows, expected {n_heads}*{head_dim}")
    return w.reshape(n_heads, head_dim, in_dim)[:, perm, :].reshape(out_dim, in_dim)


def heads_in_kernel(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Linear weight [n*h, D] -> DenseGeneral kernel [D, n, h] (wq / wk / wv)."""
    return np.ascontiguousarray(w.T).reshape(w.shape[1], n_heads, head_dim)


def heads_out_kernel(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Linear weight [D, n*h] -> DenseGeneral kernel [n, h, D] (wo)."""
    return np.ascontiguousarray(w.T).reshape(n_heads, head_dim, w.shape[0])


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """Linear weight [out, in] -> Dense kernel [in, out]."""
    return np.ascontiguousarray(w.T)


# kind -> the full torch `[out, in]` shape a config implies (Meta, HF and GGUF agree on it; GGUF
# stores the dims reversed, ne0 innermost)
TORCH_SHAPES = {
    "norm": lambda c: (c.dim,),
    "q": lambda c: (c.n_heads * c.head_dim, c.dim),
    "k": lambda c: (c.n_kv_heads * c.head_dim, c.dim),
    "v": lambda c: (c.n_kv_heads * c.head_dim, c.dim),
    "o": lambda c: (c.dim, c.n_heads * c.head_dim),
    "ffn_in": lambda c: (c.ffn_dim, c.dim),
    "ffn_out": lambda c: (c.dim, c.ffn_dim),
    "embedding": lambda c: (c.vocab_size, c.dim),
    "output": lambda c: (c.vocab_size, c.dim),
}


def torch_to_kernel(kind: str, w: np.ndarray, config: LlamaConfig, *,
                    interleaved_qk: bool) -> np.ndarray:
    """A torch-layout tensor of `kind` (TORCH_SHAPES) -> our kernel layout. `interleaved_qk`:
    q/k rows in Meta's interleaved rotary pairs (Meta, GGUF), permuted here to half-split;
    HF checkpoints are half-split already. Norms and embeddings pass through unchanged."""
    c = config
    if kind in ("q", "k"):
        n = c.n_heads if kind == "q" else c.n_kv_heads
        if interleaved_qk:
            w = interleaved_to_half_split(w, n, c.head_dim)
        return heads_in_kernel(w, n, c.head_dim)
    if kind == "v":
        return heads_in_kernel(w, c.n_kv_heads, c.head_dim)
    if kind == "o":
        return heads_out_kernel(w, c.n_heads, c.head_dim)
    if kind in ("ffn_in", "ffn_out", "output"):
        return dense_kernel(w)
    return w  # norm, embedding


# canonical per-layer leaf paths (inside params["layers"])
LAYER_LEAVES = (
    ("attention_norm", "scale"),
    ("attention", "wq", "kernel"), ("attention", "wk", "kernel"),
    ("attention", "wv", "kernel"), ("attention", "wo", "kernel"),
    ("ffn_norm", "scale"),
    ("feed_forward", "w1", "kernel"), ("feed_forward", "w3", "kernel"),
    ("feed_forward", "w2", "kernel"),
)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def empty_layer_stack(config: LlamaConfig, dtype) -> dict:
    """Preallocated stacked layer arrays, filled tensor by tensor (one copy of the weights)."""
    from gptk_jax.llama.model import abstract_params
    abstract = abstract_params(config)["layers"]
    out: dict = {}
    for path in LAYER_LEAVES:
        leaf = abstract
        for key in path:
            leaf = leaf[key]
        _set(out, path, np.empty(leaf.shape, dtype))
    return out


def set_layer(stack: dict, path: tuple, layer: int, value: np.ndarray, *, name: str) -> None:
    """Writes one layer's tensor into the stack, checking its shape against the model's."""
    leaf = stack
    for key in path:
        leaf = leaf[key]
    if leaf.shape[1:] != value.shape:
        raise ConversionError(f"tensor {name}: shape {tuple(value.shape)} after conversion, "
                              f"expected {tuple(leaf.shape[1:])}")
    leaf[layer] = value


def numpy_dtype(name: str):
    """'float32' | 'bfloat16' -> numpy dtype (bfloat16 via ml_dtypes)."""
    if name == "float32":
        return np.float32
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    raise ConversionError(f"--dtype must be float32 or bfloat16, got {name!r}")
