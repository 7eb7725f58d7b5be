"""LSTM head: a stacked LSTM (hidden = model width, dropout between layers) that reads the
trunk's normed hidden states over the context, then steps on token embeddings to draft.

Step j from the state s_t (the state after consuming hidden_normed[0..t]) predicts offset j:
  step 1: output of consuming hidden_normed[t]              -> offset 1 (the trunk's own token)
  step j: input embed(token at t+j-1), output               -> offset j      (j = 2..K)
Inputs of steps 2..K are the trunk's frozen token embeddings of: in training, the teacher-forced
`next_tokens` ('teacher') or the previous step's draft argmax ('argmax', seed); in decoding,
the trunk's exact `next_token` for step 2 (or, with lstm_first_input='own_argmax', the head's
own offset-1 argmax, seed) and the previous step's draft after that.

The original code re-ran the LSTM from zero over the whole prefix at every step; here it runs
once over the context (`nn.scan`, weights shared across time) and steps from that state. In
training, the states s_t of all T positions step K-1 times in parallel (batched over [B,T]).

Projection to the vocabulary: the trunk's frozen final norm + unembedding ('trunk', default) or
the head's own `Dense(V, bias)` ('own', seed). Parameter count does not depend on K.

Decoding state: a tuple over layers of (c, h), each [B,D]. `advance` consumes only positions
whose advance_mask is set (per-row ragged; masked positions leave the state unchanged).
`draft` expects the state that has consumed every accepted position up to and including
`last_position`; its top-layer h is then the step-1 output, so `last_hidden*` are not re-read.

Einsum letters: B batch, T positions, J offsets, K tokens per step, D width, V vocab.
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

    def setup(self):
        c = self.head_config
        self.lstm = LSTMStack(self.trunk_config.dim, c.lstm_layers, c.lstm_dropout, self._dtype,
                              self._param_dtype)
        if c.lstm_vocab_projection == "own":
            self.vocab_proj = nn.Dense(self.trunk_config.vocab_size, use_bias=True,
                                       dtype=self._dtype, param_dtype=self._param_dtype)

    def _project(self, trunk_params, y):
        """LSTM outputs [..., D] -> logits [..., V] float32."""
        if self.head_config.lstm_vocab_projection == "own":
            return self.vocab_proj(y).astype(jnp.float32)
        return self._unembed(trunk_params, self._final_norm(trunk_params, y))

    def _zero_carry(self, batch_shape):
        zeros = jnp.zeros(tuple(batch_shape) + (self.trunk_config.dim,), self._dtype)
        return tuple((zeros, zeros) for _ in range(self.head_config.lstm_layers))

    # --- training ----------------------------------------------------------------------------
    def train_logits(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> head_logits [B,T,J,V] float32 for every configured offset; [B,M,J,V] at
        gather_index [B,M] (the LSTM still runs over all T positions of feats, in order).

        Dropout needs `rngs={'dropout': key}` when deterministic=False."""
        c = self.head_config
        hidden = feats.hidden_normed.astype(self._dtype)                     # [B,T,D]
        b, t, _ = hidden.shape
        mask = feats.token_mask if feats.token_mask is not None else jnp.ones((b, t), bool)
        _, carries, step1 = _masked_scan(self.lstm, self._zero_carry((b,)), hidden, mask,
                                         axis=1, deterministic=deterministic)
        # carries: the state s_t after consuming position t, every leaf [B,T,D]
        carries, step1 = jax.tree.map(lambda x: gather_positions(x, gather_index),
                                      (carries, step1))
        next_tokens = gather_positions(feats.next_tokens, gather_index)     # [B,M,K]
        if c.lstm_step_inputs == "teacher":
            return self._teacher_logits(trunk_params, next_tokens, carries, step1, deterministic)
        return self._argmax_logits(trunk_params, next_tokens, carries, step1, deterministic)

    def _teacher_logits(self, trunk_params, next_tokens, carries, step1, deterministic):
        c = self.head_config
        n_steps = max(c.offsets) - 1  # steps 2..max offset
        outputs = step1[:, :, None, :]                                      # [B,T,1,D]
        if n_steps:
            inputs = self._embed(trunk_params, next_tokens[:, :, :n_steps])  # [B,T,S,D]
            ones = jnp.ones(inputs.shape[:-1], bool)
            _, _, later = _masked_scan(self.lstm, carries, inputs, ones, axis=2,
                                       deterministic=deterministic)          # [B,T,S,D]
            outputs = jnp.concatenate([outputs, later], axis=2)             # [B,T,1+S,D]
        outputs = outputs[:, :, np.asarray(c.offsets) - 1]                  # [B,T,J,D]
        return self._project(trunk_params, outputs)                         # [B,T,J,V]

    def _argmax_logits(self, trunk_params, next_tokens, carries, step1, deterministic):
        # Seed: each step's input is the previous step's draft, so the projection runs per step.
        c = self.head_config
        logits = {}
        if c.lstm_first_input == "own_argmax":
            logits[1] = self._project(trunk_params, step1)
            token = self._argmax(logits[1])
        else:
            token = next_tokens[:, :, 0]
        if 1 in c.offsets and 1 not in logits:
            logits[1] = self._project(trunk_params, step1)
        carry = carries
        for j in range(2, max(c.offsets) + 1):
            carry, y = self.lstm(carry, self._embed(trunk_params, token), deterministic)
            logits[j] = self._project(trunk_params, y)                      # [B,T,V]
            token = self._argmax(logits[j])
        return jnp.stack([logits[o] for o in c.offsets], axis=2)            # [B,T,J,V]

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
        -> (draft_tokens [B,K-1] int32, draft_logits [B,K-1,V]) for offsets 2..K."""
        del last_hidden, last_hidden_normed, last_position
        c = self.head_config
        if c.lstm_first_input == "own_argmax":
            token = self._argmax(self._project(trunk_params, state[-1][1]))  # top h = step 1
        else:
            token = next_token
        tokens, logits = [], []
        for _ in range(2, c.k + 1):
            state, y = self.lstm(state, self._embed(trunk_params, token), True)
            if c.lstm_vocab_projection == "own":
                step_logits = self._project(trunk_params, y)                # [B,V]
                token = self._argmax(step_logits)
            else:   # [B,V] or [B,Vd] with a precomputed draft unembedding
                token, step_logits = self._draft_project(trunk_params,
                                                         self._final_norm(trunk_params, y))
            tokens.append(token)
            logits.append(step_logits)
        return jnp.stack(tokens, axis=1), jnp.stack(logits, axis=1)
