"""Soft targets (loss.targets = 'trunk_soft', as EAGLE / Hydra++): the loss of offset o at
position t is the cross-entropy against the trunk's whole next-token distribution at position
t+o-1 (the token verification will compare the draft against is that distribution's argmax).

    loss(o, t) = -sum_v p_trunk(v | t+o-1) log q_head(v | t, o)
               = logsumexp(s) - sum_v p_v s_v           (s the head's logits, sum_v p_v = 1)

The teacher logits are recomputed from the trunk's normed hidden states with the frozen
unembedding (nothing V-wide is cached on disk): per row for the heads that get [B,X,J,V] logits
anyway (`teacher_logits`), and for packed per-position heads a chunk at a time next to the
head's own logits, fused with the gradient as chunked_loss.py does for hard targets
(`chunked_soft_cross_entropy`: dloss/ds = softmax(s) - p). With one-hot teacher
distributions the loss is the hard cross-entropy.

Letters (docs/design.md): B batch, T positions, X supervised positions, J offsets, Z chunks,
Y row groups, C positions per chunk, D width, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.training.chunked_loss import _logits, hidden_grad


def soft_cross_entropy(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """logits, teacher_logits [..., V] -> -sum_v softmax(teacher)_v log_softmax(logits)_v [...]
    (no gradient into the teacher)."""
    p = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(p * log_q, axis=-1)


def teacher_positions(index: jax.Array, offsets, limit: int) -> jax.Array:
    """index [...] (a supervised position t) -> [..., J] int32: t+o-1 for each trained offset o,
    clipped to limit-1 (clipped entries are masked: their targets lie past the row)."""
    shift = jnp.asarray(np.asarray(offsets) - 1, jnp.int32)
    return jnp.minimum(index[..., None] + shift, limit - 1)


def teacher_hidden(hidden_normed: jax.Array, index: jax.Array, offsets) -> jax.Array:
    """hidden_normed [B,T,D] (or grouped [Y,N,D]), index [B,X] into its second axis ->
    [B,X,J,D]: the trunk's normed hidden state at t+o-1."""
    b, x = index.shape
    where = teacher_positions(index, offsets, hidden_normed.shape[1]).reshape(b, -1)
    gathered = jnp.take_along_axis(hidden_normed, where[..., None], axis=1)
    return jax.lax.stop_gradient(gathered.reshape(b, x, len(offsets), -1))


def _chunk_terms(tied: bool, w, h, teacher_h, targets, mask):
    """One chunk: h / teacher_h [Y,C,J,D], targets / mask [Y,C,J] -> (loss [J], top1 [J] against
    the hard targets, dloss/dh [Y,C,J,D]) over the masked entries."""
    logits = _logits(h, w, tied)                                           # [Y,C,J,V]
    p = jax.nn.softmax(_logits(teacher_h, w, tied), axis=-1)               # [Y,C,J,V]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    loss = jnp.where(mask, log_z - jnp.sum(p * logits, axis=-1), 0.0).sum(axis=(0, 1))
    top1 = ((jnp.argmax(logits, axis=-1) == targets) & mask).sum(axis=(0, 1))
    dlogits = jnp.exp(logits - log_z[..., None]) - p
    dlogits = jnp.where(mask[..., None], dlogits, 0.0).astype(w.dtype)
    return loss, top1.astype(jnp.float32), hidden_grad(dlogits, w, tied).astype(h.dtype)


def _forward(tied, w, h, teacher_h, targets, mask):
    j = mask.shape[-1]
    skipped = (jnp.zeros((j,), jnp.float32), jnp.zeros((j,), jnp.float32),
               jnp.zeros(h.shape[1:], h.dtype))

    def one(xs):
        h_c, p_c, t_c, m_c = xs
        return jax.lax.cond(m_c.any(), lambda _: _chunk_terms(tied, w, h_c, p_c, t_c, m_c),
                            lambda _: skipped, None)

    loss, top1, dh = jax.lax.map(one, (h, teacher_h, targets, mask))
    return (loss.sum(axis=0), top1.sum(axis=0)), dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_soft_cross_entropy(tied: bool, w: jax.Array, h: jax.Array, teacher_h: jax.Array,
                               targets: jax.Array, mask: jax.Array):
    """h / teacher_h [Z,Y,C,J,D] (the head's and the trunk's normed hidden states before the
    frozen unembedding w), targets / mask [Z,Y,C,J] -> (soft loss sum [J], top-1 hits of the
    hard targets [J]); differentiable in h only, chunks without a masked entry skipped."""
    return _forward(tied, w, h, teacher_h, targets, mask)[0]


def _fwd(tied, w, h, teacher_h, targets, mask):
    return _forward(tied, w, h, teacher_h, targets, mask)


def _bwd(tied, dh, cotangents):
    g_loss, _ = cotangents                                                  # [J]
    return None, dh * g_loss.astype(dh.dtype)[:, None], None, None, None


chunked_soft_cross_entropy.defvjp(_fwd, _bwd)
