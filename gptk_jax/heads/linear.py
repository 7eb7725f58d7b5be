"""Linear head (blockwise parallel decoding): one residual D x D matrix per trained offset on
the trunk's normed hidden state, then the trunk's frozen unembedding.

  h'_k = h_normed + h_normed @ W_k      W_k zero-initialised, so at init every offset's logits
                                         equal the trunk's own next-token logits
  logits_k = unembed(h'_k)              h'_k goes to the unembedding directly (no second final
                                         norm: h_normed is already normed, and re-norming would
                                         break the zero-init identity)

Params: `proj` [J, D, D] (J = len(offsets), in offset order). All J offsets are projected in one
unembedding call on [B,T,J,D]. Stateless in decoding (init_state / advance are no-ops).

Einsum letters (docs/design.md): B batch, T positions, X gathered positions, J offsets, W tokens
per step, D width (E: output width), V vocab.
"""

from __future__ import annotations

import jax.numpy as jnp

from gptk_jax.heads.common import MTPHead, gather_positions


class LinearHead(MTPHead):
    per_position = True

    def setup(self):
        j, d = len(self.head_config.offsets), self.trunk_config.dim
        self.proj = self.param("proj", lambda rng, shape: jnp.zeros(shape, self._param_dtype),
                               (j, d, d))

    def _offset_hidden(self, hidden_normed, proj):
        """hidden_normed [..., D], proj [J,D,D] -> [..., J, D]."""
        h = hidden_normed.astype(self._dtype)
        delta = jnp.einsum("...d,jde->...je", h, proj.astype(self._dtype))
        return h[..., None, :] + delta

    def train_hidden(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> [B,T,J,D] ([B,X,J,D] at gather_index [B,X]): what the unembedding projects."""
        del trunk_params, deterministic
        hidden_normed = gather_positions(feats.hidden_normed, gather_index)
        return self._offset_hidden(hidden_normed, self.proj)

    def train_logits(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> head_logits [B,T,J,V] float32 for every configured offset ([B,X,J,V] at
        gather_index [B,X])."""
        h = self.train_hidden(trunk_params, feats, deterministic, gather_index)  # [B,T,J,D]
        return self._unembed(trunk_params, h)

    def draft_logits(self, trunk_params, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """-> (draft_tokens [B,W-1] int32, draft_logits [B,W-1,V]) for offsets 2..W."""
        del state, last_hidden, last_position, next_token
        proj = self.proj[jnp.asarray(self.head_config.draft_offset_indices)]  # [W-1,D,D]
        return self._draft_project(trunk_params, self._offset_hidden(last_hidden_normed, proj))
