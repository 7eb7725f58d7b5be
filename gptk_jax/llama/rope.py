"""Rotary position embeddings with Llama 3 frequency scaling, in the half-split layout.

Layout: dims [0, H/2) rotate against [H/2, H) (HF / GPT-NeoX). Meta and GGUF checkpoints store
q/k rows as interleaved pairs; the converter permutes them once (see convert/common.py).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: Optional[RopeScaling] = None) -> np.ndarray:
    """[H/2] float32 inverse frequencies, scaled exactly as Meta's `apply_scaling`."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / np.float32(head_dim)
    freqs = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return freqs
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = (2 * np.pi / freqs).astype(np.float32)
    new_freqs = np.where(wavelen > low_wavelen, freqs / np.float32(scaling.factor), freqs)
    smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor)).astype(np.float32)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    blended = (1 - smooth) * new_freqs / np.float32(scaling.factor) + smooth * new_freqs
    return np.where(medium, blended, new_freqs).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotates x [B,T,*,H] by positions [B,T] (float32 angles, result in x's dtype)."""
    # angles [B,T,H/2]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    # broadcast over the head axis: [B,T,1,H/2]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
