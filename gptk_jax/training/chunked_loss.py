"""Cross-entropy over the vocabulary a chunk of positions at a time, fused with its gradient
(what levanter's blockwise cross-entropy and Liger's fused linear cross-entropy do), skipping
chunks that hold no supervised position.

Letters (docs/design.md): Z chunks, Y row groups, C positions per chunk, J offsets, D width, V vocab.

    h [Z,Y,C,J,D] (the heads' hidden states right before the frozen unembedding w)
      -> per chunk, only if its mask has a True entry (lax.cond):
         logits = h @ w [Y,C,J,V]; nll = logsumexp - logit[target]; top-1 hit;
         dnll/dh = (softmax - onehot(target)) @ w^T [Y,C,J,D]
      -> sums over the chunk's masked entries, per offset [J]

Why fused: differentiating a `lax.map` of `lax.cond` with JAX's autodiff makes every chunk a
scan iteration whose residuals include the loop-invariant unembedding (113 MB for SmolLM2,
copied once per chunk) and the chunk's logits; measured 3x slower than no packing at all. Here
the forward computes dnll/dh for the chunk while its logits are at hand, and the backward is one
multiply: the residual is dh [Z,Y,C,J,D], the size of h. The unembedding is frozen (no
cotangent); `tied`: w is the embedding table [V,D], else the output kernel [D,V].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _logits(h: jax.Array, w: jax.Array, tied: bool) -> jax.Array:
    """h [...,D] -> [...,V] float32 (the arithmetic of Llama.unembed: tied attends the
    embedding table, untied multiplies the output kernel)."""
    if tied:
        return jnp.einsum("...d,vd->...v", h.astype(w.dtype), w).astype(jnp.float32)
    return jnp.einsum("...d,dv->...v", h.astype(w.dtype), w).astype(jnp.float32)


def _chunk_terms(tied: bool, w, h, targets, mask):
    """One chunk: h [Y,C,J,D], targets / mask [Y,C,J] -> (nll [J], top1 [J], dnll/dh
    [Y,C,J,D]) over the masked entries."""
    logits = _logits(h, w, tied)                                           # [Y,C,J,V]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, log_z - picked, 0.0).sum(axis=(0, 1))
    top1 = ((jnp.argmax(logits, axis=-1) == targets) & mask).sum(axis=(0, 1))
    dlogits = jnp.exp(logits - log_z[..., None])
    dlogits = dlogits - jax.nn.one_hot(targets, logits.shape[-1], dtype=dlogits.dtype)
    dlogits = jnp.where(mask[..., None], dlogits, 0.0).astype(w.dtype)
    return nll, top1.astype(jnp.float32), hidden_grad(dlogits, w, tied).astype(h.dtype)


def hidden_grad(dlogits: jax.Array, w: jax.Array, tied: bool) -> jax.Array:
    """dloss/dh [..., D] from dloss/dlogits [..., V] through the frozen unembedding w ([V,D]
    tied, else [D,V])."""
    if tied:
        return jnp.einsum("...v,vd->...d", dlogits, w)
    return jnp.einsum("...v,dv->...d", dlogits, w)


def _forward(tied, w, h, targets, mask):
    j = mask.shape[-1]
    skipped = (jnp.zeros((j,), jnp.float32), jnp.zeros((j,), jnp.float32),
               jnp.zeros(h.shape[1:], h.dtype))

    def one(xs):
        h_c, t_c, m_c = xs
        return jax.lax.cond(m_c.any(), lambda _: _chunk_terms(tied, w, h_c, t_c, m_c),
                            lambda _: skipped, None)

    nll, top1, dh = jax.lax.map(one, (h, targets, mask))                   # [Z,J] [Z,J] [Z,...]
    return (nll.sum(axis=0), top1.sum(axis=0)), dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_cross_entropy(tied: bool, w: jax.Array, h: jax.Array, targets: jax.Array,
                          mask: jax.Array):
    """-> (nll_sum [J], top1 [J]) over the entries of mask [Z,Y,C,J]; differentiable in h only
    (top1 is a count: no gradient)."""
    return _forward(tied, w, h, targets, mask)[0]


def _fwd(tied, w, h, targets, mask):
    out, dh = _forward(tied, w, h, targets, mask)
    return out, dh


def _bwd(tied, dh, cotangents):
    g_nll, _ = cotangents                                                   # [J]
    return None, dh * g_nll.astype(dh.dtype)[:, None], None, None


chunked_cross_entropy.defvjp(_fwd, _bwd)
