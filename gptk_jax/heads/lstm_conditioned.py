"""The LSTM drafter conditioned on the trunk (recipe 'conditioned', ReDrafter-like): per
position t, a short LSTM run that starts from the trunk's hidden state there and steps on the
embeddings of the tokens it drafts.

  cond   = norm(h_t)                       the trunk's last-layer output after its frozen
                                           final norm (`hidden_normed`)
  carry0 = per layer (c = 0, h = tanh(A_l cond))
  step j (j = 1..W-1, predicts offset j+1):
         x_j  = embed(token at t+j)        frozen embedding; step 1 reads the trunk's next
                                           token (exact in decoding), step j > 1 the true
                                           token (teacher forcing) or, with
                                           `lstm_train_on_drafts`, the previous step's argmax
                                           (no gradient through it); decoding: its own drafts
         [x_j, cond] instead of x_j        with `lstm_condition_inputs`
         y_j  = LSTM(carry, x_j)
         out  = cond + P y_j               P zero at init: every offset starts as the trunk's
                                           own next-token logits; the residual is added after
                                           the norm (as the linear head's), not to the raw h_t:
                                           SmolLM2's pre-norm states are large, so norm(h_t +
                                           P y) barely moved in 300 steps (probe: top-1 6% at
                                           offset 2, linear 28%; bench/probe_heads.py)
  offset 1 (if trained) is cond itself: the trunk's token, no parameters.
  logits = unembed(out)                    frozen unembedding (no second norm)

A position reads only its own h_t and the tokens after it, so the head is per-position
(`per_position`: packed training, `train_hidden`), keeps no decoding state (`init_state` = (),
`advance` is a no-op: the trunk's hidden state at the last accepted position is the whole
condition) and reads `last_hidden_normed` in `draft`. Why a recipe of its own rather than 'default':
heads.json files saved as the context LSTM ('default') keep loading as what they are, and the
original research code's LSTM stays recipe 'seed'.

Params: `condition_{l}` (A_l, Dense D->D, no bias), `lstm/layer_{l}` (OptimizedLSTMCell, width D,
dropout between layers as in lstm.py), `residual` (P, Dense D->D, no bias, zeros).

Einsum letters (docs/design.md): B batch, T positions, X gathered positions, J offsets, W tokens
per step (largest offset), D width, V vocab, U draft vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.heads.common import MTPHead, gather_positions
from gptk_jax.heads.lstm import LSTMStack


class ConditionedLSTMHead(MTPHead):
    per_position = True

    def setup(self):
        c, d = self.head_config, self.trunk_config.dim
        dense = lambda init: nn.Dense(d, use_bias=False, dtype=self._dtype,
                                      param_dtype=self._param_dtype, kernel_init=init)
        # a list attribute: flax names its entries condition_0, condition_1, ...
        self.condition = [dense(nn.initializers.lecun_normal()) for _ in range(c.lstm_layers)]
        self.lstm = LSTMStack(d, c.lstm_layers, c.lstm_dropout, self._dtype, self._param_dtype)
        self.residual = dense(nn.initializers.zeros_init())

    def _start(self, hidden_normed):
        """hidden_normed [..., D] -> (cond [..., D], the LSTM's initial carry: per layer (c, h))."""
        cond = hidden_normed.astype(self._dtype)
        carry = tuple((jnp.zeros_like(cond), jnp.tanh(a(cond))) for a in self.condition)
        return cond, carry

    def _step(self, trunk_params, carry, cond, token, deterministic):
        """One draft step: token [...] int -> (carry, out [..., D], what the unembedding
        projects)."""
        x = self._embed(trunk_params, token)
        if self.head_config.lstm_condition_inputs:
            x = jnp.concatenate([x, cond], axis=-1)                         # [..., 2D]
        carry, y = self.lstm(carry, x, deterministic)
        return carry, cond + self.residual(y)

    # --- training ----------------------------------------------------------------------------
    def train_hidden(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> [B,T,J,D] ([B,X,J,D] at gather_index [B,X]) after the final norm: what the
        unembedding projects. Dropout needs `rngs={'dropout': key}` when not deterministic."""
        hidden_normed = gather_positions(feats.hidden_normed, gather_index)  # [B,X,D]
        next_tokens = gather_positions(feats.next_tokens, gather_index)     # [B,X,W]
        cond, carry = self._start(hidden_normed)
        outputs = [cond]                                                    # offset 1
        token = next_tokens[..., 0]
        for j in range(1, max(self.head_config.offsets)):
            carry, out = self._step(trunk_params, carry, cond, token, deterministic)
            outputs.append(out)                                             # offset j+1
            if self.head_config.lstm_train_on_drafts:
                token = jnp.argmax(self._unembed(trunk_params, out), axis=-1).astype(jnp.int32)
            elif j < next_tokens.shape[-1]:
                token = next_tokens[..., j]
        columns = np.asarray(self.head_config.offsets) - 1
        return jnp.stack(outputs, axis=-2)[..., columns, :]                 # [B,X,J,D]

    def train_logits(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> head_logits [B,T,J,V] float32 for every configured offset (one unembed call);
        [B,X,J,V] at gather_index [B,X]."""
        h = self.train_hidden(trunk_params, feats, deterministic, gather_index)
        return self._unembed(trunk_params, h)

    # --- decoding ----------------------------------------------------------------------------
    def draft_logits(self, trunk_params, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """-> (draft_tokens [B,W-1] int32, draft_logits [B,W-1,V]; [B,W-1,U] over decoding's
        draft vocabulary rows) for offsets 2..W, from the trunk's hidden state at the last
        accepted position and its exact next token."""
        del state, last_hidden, last_position
        cond, carry = self._start(last_hidden_normed)
        token, tokens, logits = next_token, [], []
        for _ in range(2, self.head_config.k + 1):
            carry, out = self._step(trunk_params, carry, cond, token, True)
            token, step_logits = self._draft_project(trunk_params, out)
            tokens.append(token)
            logits.append(step_logits)
        return jnp.stack(tokens, axis=1), jnp.stack(logits, axis=1)
