"""LSTM head: a stacked LSTM (hidden = model width, dropout between layers) that reads the
trunk's normed hidden states over the context, then steps on token embeddings to draft.

Step j from the state s_t (the state after consuming hidden_normed[0..t]) predicts offset j:
  step 1: output of consuming hidden_normed[t]              -> offset 1 (the trunk's own token)
  step j: input embed(token at t+j-1), output               -> offset j      (j = 2..W)
Inputs of steps 2..W are the trunk's frozen token embeddings. Two recipes (heads/config.py):
  default: the trunk's frozen final norm + unembedding projects to the vocabulary; training
           teacher-forces the inputs (`next_tokens`); decoding feeds the trunk's exact
           `next_token` to step 2, then each draft.
  seed:    the head's own `Dense(V, bias)` projects; step 2 reads the head's own offset-1
           argmax and every later step the previous step's draft argmax, in training and in
           decoding alike (so the projection runs once per step).
(Recipe 'conditioned', the drafter that starts from the trunk's hidden state at each position
instead of reading the context, is heads/lstm_conditioned.py; it reuses LSTMStack.)

The original code re-ran the LSTM from zero over the whole prefix at every step; here it runs
once over the context (`nn.scan`, weights shared across time) and steps from that state. In
training, the states s_t of all T positions step W-1 times in parallel (batched over [B,T]).
Parameter count does not depend on W.

Decoding state: a tuple over layers of (c, h), each [B,D]. `advance` consumes only positions
whose advance_mask is set (per-row ragged; masked positions leave the state unchanged).
`draft` expects the state that has consumed every accepted position up to and including
`last_position`; its top-layer h is then the step-1 output, so `last_hidden*` are not re-read.

Einsum letters (docs/design.md): B batch, T positions, X gathered positions, J offsets, W tokens
per step (largest offset), D width, V vocab, U draft vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.heads.common import MTPHead, gather_positions


class LSTMStack(nn.Module):
    """One time step of a stacked LSTM (torch nn.LSTM semantics: dropout on the outputs of
    every layer but the last)."""
    features: int
    n_layers: int
    dropout_rate: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, carry, x, deterministic: bool):
        """carry: tuple over layers of (c, h) [..., D]; x [..., D] -> (carry, top output)."""
        new_carry = []
        for i in range(self.n_layers):
            if i > 0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
            layer_carry, x = nn.OptimizedLSTMCell(self.features, dtype=self.dtype,
                                                  param_dtype=self.param_dtype,
                                                  name=f"layer_{i}")(carry[i], x)
            new_carry.append(layer_carry)
        return tuple(new_carry), x


def _masked_scan(lstm: LSTMStack, carry, xs, mask, axis: int, deterministic: bool):
    """Runs `lstm` over `axis` of xs [..., D] (mask [...]: False steps keep the carry).
    Returns (final carry, carries after every step, outputs), stacked on `axis`."""
    def body(cell, carry, step):
        x, m = step
        new_carry, y = cell(carry, x, deterministic)
        new_carry = jax.tree.map(lambda n, o: jnp.where(m[..., None], n, o), new_carry, carry)
        return new_carry, (new_carry, y)

    scan = nn.scan(body, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, in_axes=axis, out_axes=axis)
    carry, (carries, ys) = scan(lstm, carry, (xs, mask))
    return carry, carries, ys


class LSTMHead(MTPHead):

    @property
    def _seed(self) -> bool:
        return self.head_config.recipe == "seed"

    def setup(self):
        c = self.head_config
        self.lstm = LSTMStack(self.trunk_config.dim, c.lstm_layers, c.lstm_dropout, self._dtype,
                              self._param_dtype)
        if self._seed:
            self.vocab_proj = nn.Dense(self.trunk_config.vocab_size, use_bias=True,
                                       dtype=self._dtype, param_dtype=self._param_dtype)

    def _project(self, trunk_params, y):
        """LSTM outputs [..., D] -> logits [..., V] float32."""
        if self._seed:
            return self.vocab_proj(y).astype(jnp.float32)
        return self._unembed(trunk_params, self._final_norm(trunk_params, y))

    def _zero_carry(self, batch_shape):
        zeros = jnp.zeros(tuple(batch_shape) + (self.trunk_config.dim,), self._dtype)
        return tuple((zeros, zeros) for _ in range(self.head_config.lstm_layers))

    # --- training ----------------------------------------------------------------------------
    def train_logits(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> head_logits [B,T,J,V] float32 for every configured offset; [B,X,J,V] at
        gather_index [B,X] (the LSTM still runs over all T positions of feats, in order).

        Dropout needs `rngs={'dropout': key}` when deterministic=False."""
        hidden = feats.hidden_normed.astype(self._dtype)                     # [B,T,D]
        b, t, _ = hidden.shape
        mask = feats.token_mask if feats.token_mask is not None else jnp.ones((b, t), bool)
        _, carries, step1 = _masked_scan(self.lstm, self._zero_carry((b,)), hidden, mask,
                                         axis=1, deterministic=deterministic)
        # carries: the state s_t after consuming position t, every leaf [B,T,D]
        carries, step1 = jax.tree.map(lambda x: gather_positions(x, gather_index),
                                      (carries, step1))
        if self._seed:
            return self._own_argmax_logits(trunk_params, carries, step1, deterministic)
        next_tokens = gather_positions(feats.next_tokens, gather_index)     # [B,X,W]
        return self._teacher_logits(trunk_params, next_tokens, carries, step1, deterministic)

    def _teacher_logits(self, trunk_params, next_tokens, carries, step1, deterministic):
        c = self.head_config
        n_steps = max(c.offsets) - 1  # steps 2..max offset
        outputs = step1[:, :, None, :]                                      # [B,T,1,D]
        if n_steps:
            inputs = self._embed(trunk_params, next_tokens[:, :, :n_steps])  # [B,T,W-1,D]
            ones = jnp.ones(inputs.shape[:-1], bool)
            _, _, later = _masked_scan(self.lstm, carries, inputs, ones, axis=2,
                                       deterministic=deterministic)          # [B,T,W-1,D]
            outputs = jnp.concatenate([outputs, later], axis=2)             # [B,T,W,D]
        outputs = outputs[:, :, np.asarray(c.offsets) - 1]                  # [B,T,J,D]
        return self._project(trunk_params, outputs)                         # [B,T,J,V]

    def _own_argmax_logits(self, trunk_params, carries, step1, deterministic):
        # Seed: offsets are 1..k (validated), and each step reads the previous step's argmax.
        logits = [self._project(trunk_params, step1)]                       # offset 1 [B,T,V]
        carry = carries
        for _ in range(2, self.head_config.k + 1):
            token = self._argmax(logits[-1])
            carry, y = self.lstm(carry, self._embed(trunk_params, token), deterministic)
            logits.append(self._project(trunk_params, y))
        return jnp.stack(logits, axis=2)                                    # [B,T,J,V]

    # --- decoding ----------------------------------------------------------------------------
    def init_state(self, trunk_params, batch: int):
        """Zero state: tuple over layers of (c, h), each [B,D]."""
        del trunk_params
        return self._zero_carry((batch,))

    def advance(self, trunk_params, state, hidden_normed, advance_mask):
        """Consumes hidden_normed [B,T,D] where advance_mask [B,T] is set, in order."""
        del trunk_params
        state, _, _ = _masked_scan(self.lstm, state, hidden_normed.astype(self._dtype),
                                   advance_mask, axis=1, deterministic=True)
        return state

    def draft_logits(self, trunk_params, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """state: consumed every accepted position up to and including last_position.
        -> (draft_tokens [B,W-1] int32, draft_logits [B,W-1,V]) for offsets 2..W."""
        del last_hidden, last_hidden_normed, last_position
        if self._seed:   # the head's own offset-1 argmax: the top h is the step-1 output
            token, _ = self._draft_step(trunk_params, state[-1][1])
        else:
            token = next_token
        tokens, logits = [], []
        for _ in range(2, self.head_config.k + 1):
            state, y = self.lstm(state, self._embed(trunk_params, token), True)
            token, step_logits = self._draft_step(trunk_params, y)
            tokens.append(token)
            logits.append(step_logits)
        return jnp.stack(tokens, axis=1), jnp.stack(logits, axis=1)

    def _draft_step(self, trunk_params, y):
        """A step's output y [B,D] -> (draft token [B] int32, logits [B,V]; [B,U] when the
        trunk's projection runs onto a precomputed draft unembedding)."""
        if self._seed:
            step_logits = self._project(trunk_params, y)
            return self._argmax(step_logits), step_logits
        return self._draft_project(trunk_params, self._final_norm(trunk_params, y))
