"""RMSNorm and the SwiGLU feed-forward block (Meta's RMSNorm / FeedForward)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # x [..., D]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # Meta: norm in float32, cast back to the input dtype, then multiply by the weight.
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class MLP(nn.Module):
    ffn_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dot_general: Callable = jax.lax.dot_general   # kernels/few_rows.py
    fused: bool = False      # w1 and w3 as one product (param "w13" [D,2F]: llama/model.py)

    @nn.compact
    def __call__(self, x):  # x [B,T,D] -> [B,T,D]
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name,
                                         dot_general=self.dot_general)
        if self.fused:
            gate, up = jnp.split(dense(2 * self.ffn_dim, "w13")(x), 2, axis=-1)  # [B,T,F] each
        else:
            gate = dense(self.ffn_dim, "w1")(x)
            up = dense(self.ffn_dim, "w3")(x)
        return dense(x.shape[-1], "w2")(nn.silu(gate) * up)
