"""RMSNorm, a bias-free Dense and the SwiGLU feed-forward block (Meta's RMSNorm / FeedForward)."""

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


class Dense(nn.Module):
    """nn.Dense without a bias (the same "kernel" [in, out] param, init and product), except
    that a bfloat16 kernel meets a float32 input as stored when `dot_general` is not XLA's own:
    the few-row kernels then read it at half the bytes (kernels/few_rows.py; a drafter's
    weights, DecoderSpec.drafter_weights; also a trunk stored in bfloat16 and computing in
    float32 with few-row products, whose 1-row products then sum in the kernel's order, not
    XLA's). Otherwise nn.Dense's promotion: input and kernel in `dtype`."""
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    dot_general: Callable = jax.lax.dot_general

    @nn.compact
    def __call__(self, x):  # x [..., in] -> [..., features]
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        x = x.astype(self.dtype)
        if not (kernel.dtype == jnp.bfloat16 and x.dtype == jnp.float32
                and self.dot_general is not jax.lax.dot_general):
            kernel = kernel.astype(self.dtype)
        return self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class MLP(nn.Module):
    ffn_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dot_general: Callable = jax.lax.dot_general   # kernels/few_rows.py
    fused: bool = False      # w1 and w3 as one product (param "w13" [D,2F]: llama/model.py)

    @nn.compact
    def __call__(self, x):  # x [B,T,D] -> [B,T,D]
        dense = lambda n, name: Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                      name=name, dot_general=self.dot_general)
        if self.fused:
            gate, up = jnp.split(dense(2 * self.ffn_dim, "w13")(x), 2, axis=-1)  # [B,T,F] each
        else:
            gate = dense(self.ffn_dim, "w1")(x)
            up = dense(self.ffn_dim, "w3")(x)
        return dense(x.shape[-1], "w2")(nn.silu(gate) * up)
