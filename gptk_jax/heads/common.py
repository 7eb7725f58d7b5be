"""What every MTP head shares: its input features, the frozen trunk's embed / final norm /
unembed, the (optionally reduced-vocabulary) draft argmax, and the decoding defaults of heads
that keep no state.

A draft vocabulary is decoding's choice (gptk_jax/decoding/heads.py owns it): decoding passes
its ids [U] and unembedding rows [U,D] as the variable collection DRAFT_VOCAB_COLLECTION next
to the head params, and the draft argmax runs over those ids only (projecting onto the rows,
when given, instead of onto all V and filtering). Without it, drafts range over the vocabulary.

Einsum letters (docs/design.md): B batch, T positions, X gathered positions, J trained offsets,
W tokens per step (largest offset), D width, V vocab, U draft vocabulary.

The trunk params are an argument of every head method, never a head variable: callers take
`jax.grad` with respect to the head params only, and the trunk leaves are additionally wrapped in
`stop_gradient` so nothing can leak into them. Only `tok_embeddings`, `norm` and `output` are read,
so stacked and per-layer (`layers_{i}`) trunk trees both work.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gptk_jax.kernels.argmax import first_argmax
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.heads.config import HeadConfig
from gptk_jax.llama.model import Llama

_TRUNK_KEYS_FOR_HEADS = ("tok_embeddings", "norm", "output")
# Decoding only: {"ids": [U] int32, optionally "rows": [U,D] their unembedding rows}.
DRAFT_VOCAB_COLLECTION = "draft_vocab"


@flax.struct.dataclass
class HeadFeatures:
    """Trunk activations a head trains on, over the whole sequence: the LSTM reads the T
    positions in order as its sequence, so pass `gather_index` to `train_logits` to get logits
    at the supervised positions only, rather than gathering the features."""
    hidden: jax.Array         # [B,T,D] last layer output before the final norm (PoMa)
    hidden_normed: jax.Array  # [B,T,D] after the final norm (LSTM, linear)
    positions: jax.Array      # [B,T] int32 real positions (PoMa)
    tokens: jax.Array         # [B,T] int32 input tokens
    token_mask: jax.Array     # [B,T] bool; False: padding (the LSTM does not consume it)
    next_tokens: jax.Array    # [B,T,W] int32 tokens at t+1..t+W (teacher-forcing inputs)


def shifted_next_tokens(tokens: jax.Array, k: int, pad_id: int = 0) -> jax.Array:
    """[B,T] -> [B,T,W]: out[b,t,j] = tokens[b,t+1+j], pad_id past the end."""
    b, t = tokens.shape
    padded = jnp.concatenate([tokens, jnp.full((b, k), pad_id, tokens.dtype)], axis=1)
    idx = jnp.arange(t)[:, None] + 1 + jnp.arange(k)[None, :]  # [T,W]
    return padded[:, idx]


def gather_positions(x: Optional[jax.Array], index: Optional[jax.Array]):
    """x [B,T,...], index [B,X] -> x at those positions [B,X,...] (None passes through)."""
    if x is None or index is None:
        return x
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def gather_features(feats: HeadFeatures, index: Optional[jax.Array]) -> HeadFeatures:
    """Every field at the positions index [B,X] (heads that read each position on its own)."""
    return jax.tree.map(lambda x: gather_positions(x, index), feats)


def trunk_params_for_heads(trunk_params: dict) -> dict:
    """The trunk leaves heads read (embedding, final norm, output), any layer layout."""
    return {name: trunk_params[name] for name in _TRUNK_KEYS_FOR_HEADS if name in trunk_params}


def _trunk_vars(trunk_params: dict) -> dict:
    return {"params": jax.lax.stop_gradient(trunk_params_for_heads(trunk_params))}


def trunk_embed(trunk_config: LlamaConfig, trunk_params: dict, tokens: jax.Array) -> jax.Array:
    """[...] int -> [..., D] (the trunk's frozen token embedding)."""
    return Llama(trunk_config, parent=None).apply(_trunk_vars(trunk_params), tokens,
                                                  method=Llama.embed)


def trunk_final_norm(trunk_config: LlamaConfig, trunk_params: dict, hidden: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] (the trunk's frozen final RMSNorm)."""
    return Llama(trunk_config, parent=None).apply(_trunk_vars(trunk_params), hidden,
                                                  method=Llama.final_norm)


def trunk_unembed(trunk_config: LlamaConfig, trunk_params: dict,
                  hidden_normed: jax.Array) -> jax.Array:
    """[..., D] -> [..., V] float32 (the trunk's frozen LM head: one matmul, any leading dims)."""
    return Llama(trunk_config, parent=None).apply(_trunk_vars(trunk_params), hidden_normed,
                                                  method=Llama.unembed)


def unembedding_weights(trunk_config: LlamaConfig, trunk_params: dict) -> tuple[jax.Array, bool]:
    """The frozen unembedding as (w, tied): the embedding table [V,D] when tied, else the
    output kernel [D,V] (no copy, no transpose)."""
    if trunk_config.tie_embeddings:
        return jax.lax.stop_gradient(trunk_params["tok_embeddings"]["embedding"]), True
    return jax.lax.stop_gradient(trunk_params["output"]["kernel"]), False


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    """Same arithmetic as layers.RMSNorm (norm in float32, cast, times scale); scale [..., D]
    broadcasts, so J per-offset norms run as one op."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return normed.astype(dtype) * scale.astype(dtype)


def draft_argmax(logits: jax.Array, draft_vocab) -> jax.Array:
    """[..., V] -> [...] int32 token ids; with a draft vocabulary (ids [U]: a sequence or an
    array), the argmax over those only."""
    if draft_vocab is None:
        return first_argmax(logits)
    ids = jnp.asarray(draft_vocab, jnp.int32)                  # [U]
    best = first_argmax(jnp.take(logits, ids, axis=-1))        # index into ids
    return ids[best]


class MTPHead(nn.Module):
    """Base of every head: config fields, trunk access and the stateless decoding defaults.

    Subclasses implement `train_logits(trunk_params, feats, deterministic=True,
    gather_index=None) -> [B,T,J,V]` (gather_index [B,X]: logits at those positions only,
    [B,X,J,V]; feats always cover the whole sequence) and
    `draft_logits(trunk_params, state, last_hidden, last_hidden_normed, last_position,
    next_token) -> (draft_tokens [B,W-1], draft_logits [B,W-1,V])` (over the draft vocabulary,
    [B,W-1,U], when decoding passes its unembedding rows in DRAFT_VOCAB_COLLECTION).
    """
    head_config: HeadConfig
    trunk_config: LlamaConfig
    # True: a position's logits read that position's features only (train_logits may be called
    # on any subset of positions, e.g. packed from several rows) and are the frozen unembedding
    # of `train_hidden(...)` [B,X,J,D]; False: the LSTM reads the sequence in order.
    per_position = False
    # Decoding state needs: the tokens of the consumed positions in `advance`, and the most
    # positions a row can hold in `init_state` (heads with a KV cache of their own: eagle.py).
    advance_reads_tokens = False
    state_needs_capacity = False

    @property
    def projects_hidden(self) -> bool:
        """True: `train_hidden(...)` [B,X,J,D] exists and the logits are its frozen unembedding,
        so a draft-vocabulary softmax projects onto U rows only (every per-position head; eagle
        too)."""
        return self.per_position

    @property
    def _dtype(self):
        return jnp.dtype(self.head_config.dtype)

    @property
    def _param_dtype(self):
        return jnp.dtype(self.head_config.param_dtype)

    def _embed(self, trunk_params, tokens):
        return trunk_embed(self.trunk_config, trunk_params, tokens).astype(self._dtype)

    def _final_norm(self, trunk_params, hidden):
        return trunk_final_norm(self.trunk_config, trunk_params, hidden)

    def _unembed(self, trunk_params, hidden_normed):
        return trunk_unembed(self.trunk_config, trunk_params, hidden_normed)

    def _draft_vocab(self, name: str):
        """Decoding's draft vocabulary "ids" [U] or "rows" [U,D], None when not passed."""
        if self.has_variable(DRAFT_VOCAB_COLLECTION, name):
            return self.get_variable(DRAFT_VOCAB_COLLECTION, name)
        return None

    def _argmax(self, logits):
        return draft_argmax(logits, self._draft_vocab("ids"))

    def _draft_project(self, trunk_params, hidden_normed):
        """[..., D] (after the trunk's final norm) -> (tokens [...] int32, logits [..., V]; with
        the draft vocabulary's unembedding rows passed, logits over those ids only, [..., U]:
        the same argmax, 1/(V/U) of the projection's cost)."""
        rows = self._draft_vocab("rows")
        if rows is None:
            logits = self._unembed(trunk_params, hidden_normed)
            return self._argmax(logits), logits
        rows = jax.lax.stop_gradient(rows)
        # bfloat16 rows (DecoderSpec.drafter_weights) meet float32 features: the kernels widen
        # them as they load them; elsewhere they are widened first
        x = hidden_normed.astype(jnp.float32 if rows.dtype == jnp.bfloat16 else rows.dtype)
        if self.trunk_config.matmul == "few_rows":     # 2..8 rows: kernels/few_rows.py
            from gptk_jax.kernels.few_rows import unembed
            logits = unembed(x, rows)
        else:
            logits = jnp.einsum("...d,vd->...v", x, rows.astype(x.dtype))
        logits = logits.astype(jnp.float32)
        ids = jnp.asarray(self._draft_vocab("ids"), jnp.int32)
        return ids[first_argmax(logits)], logits

    # --- decoding defaults (heads without state) -----------------------------------------------
    def init_state(self, trunk_params, batch: int):
        """Decoding state before any position is consumed (stateless heads: `()`)."""
        del trunk_params, batch
        return ()

    def advance(self, trunk_params, state, hidden_normed, advance_mask):
        """Consumes the accepted positions (advance_mask [B,T]); stateless heads: no-op."""
        del trunk_params, hidden_normed, advance_mask
        return state

    def draft(self, trunk_params, state, last_hidden, last_hidden_normed, last_position,
              next_token):
        """-> draft_tokens [B,W-1] int32 for offsets 2..W."""
        draft_tokens, _ = self.draft_logits(trunk_params, state, last_hidden, last_hidden_normed,
                                            last_position, next_token)
        return draft_tokens

    def draft_scored(self, trunk_params, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """-> (draft_tokens [B,W-1] int32, scores [B,W-1] float32): each draft's softmax
        probability under the head (over the draft vocabulary when decoding passes one), the
        confidence auto W calibrates (decoding/width.py)."""
        draft_tokens, logits = self.draft_logits(trunk_params, state, last_hidden,
                                                 last_hidden_normed, last_position, next_token)
        logits = logits.astype(jnp.float32)
        top = jnp.max(logits, axis=-1, keepdims=True)
        scores = 1.0 / jnp.sum(jnp.exp(logits - top), axis=-1)                # [B,W-1]
        return draft_tokens, scores
