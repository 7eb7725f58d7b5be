"""EAGLE-class feature-level drafter: one decoder layer that predicts the trunk's next normed
hidden state from the current one and the next token's embedding, and drafts by feeding its own
predictions back (EAGLE, Li et al. 2024; training unrolled on its own outputs as EAGLE-3's
"training-time test").

One draft step, at sequence position t (the pair's entry in the drafter's own KV cache):

  u_t   = fc(concat(f_t, embed(x_{t+1})))              f_t: the trunk's normed hidden state at t
                                                        (or the previous step's prediction g)
  h     = u_t + Attn(norm_1(u_t)) over the drafter's cache (RoPE, causal)
  h     = h + MLP(norm_2(h))
  g_t   = norm_out(h)                                   ~ f_{t+1}, the next feature
  logits = unembed(g_t)                                 the trunk's frozen unembedding (tied or
                                                        not; the draft vocabulary's rows when
                                                        decoding or training passes one)

Drafting from the last verified position p (decoding): step 1 reads (f_p, x_{p+1} = the trunk's
exact next token) and gives draft d_{p+2}; step s reads (g from step s-1, d_{p+s}) one entry
further and gives d_{p+s+1}. Offsets 2..k are chain steps 1..k-1, so `offsets` must be exactly
(2, ..., k).

Training (`train_hidden`) runs the k-1 chain steps over every supervised position at once. Step
s's query at position q starts a chain at t = q-s+1 and sees what decoding's step s sees: the
true pairs (step-1 entries) at positions <= t, and the chain's own entries (steps 2..s) at
t+1..q, one per step, on the diagonal (EAGLE-3's training-time test masks). The token inputs are
the sequence's own tokens (teacher forcing); the features of steps >= 2 are the drafter's own
predictions, with gradients through the chain.

Decoding state (`init_state` / `advance`): the layer's keys and values of every consumed pair,
[B,S,N,H] each, `length` [B] entries filled, and the pending feature: `advance` sees position i's
feature and token together, but a pair joins feature i-1 with token i, so the last consumed
feature waits for the next token (which the next `draft` reads as its step 1, and the next
`advance` stores). Entries are consecutive positions, so the entry index is the RoPE position
(relative positions are what attention sees; training uses the gathered index the same way).
Context: the drafter trains on a row's supervised positions only (from prompt_len - k: the
feature cache keeps those), so in decoding the first `advance` keeps only a row's last k prompt
positions, the same context.

Letters (docs/design.md): B batch, T positions, X gathered positions, J offsets (k-1 chain
steps), D width, N heads, H head dim, S cache entries, F MLP width, V vocab, U draft vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.heads.common import MTPHead, gather_positions
from gptk_jax.heads.config import HeadConfigError
from gptk_jax.kernels.few_rows import dot_general_for
from gptk_jax.llama.layers import MLP, Dense, RMSNorm
from gptk_jax.llama.rope import apply_rope, inverse_frequencies

NEG_INF = float(np.finfo(np.float32).min)


class _TrunkScale(nn.Module):
    """An RMSNorm scale [D] initialised from the trunk's final norm scale (the call argument,
    read at init only), so g starts on the scale of the trunk's normed features."""
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, trunk_scale):
        return self.param("scale", lambda rng: trunk_scale.astype(self.param_dtype))


def _shift_right(x: jax.Array, n: int) -> jax.Array:
    """[B,X,...] -> out[:, q] = x[:, q-n] (zeros for q < n)."""
    if n == 0:
        return x
    pad = jnp.zeros(x.shape[:1] + (n,) + x.shape[2:], x.dtype)
    return jnp.concatenate([pad, x[:, :-n]], axis=1)


def _shift_left(x: jax.Array, n: int) -> jax.Array:
    """[B,X,...] -> out[:, q] = x[:, q+n] (zeros past the end)."""
    if n == 0:
        return x
    pad = jnp.zeros(x.shape[:1] + (n,) + x.shape[2:], x.dtype)
    return jnp.concatenate([x[:, n:], pad], axis=1)


class EagleHead(MTPHead):
    per_position = False         # attention over the row's earlier positions
    projects_hidden = True       # train_hidden + the (draft-vocabulary) unembedding, like linear
    advance_reads_tokens = True  # advance(..., tokens): a pair joins a feature with a token
    state_needs_capacity = True  # init_state(..., capacity): the drafter's own KV cache

    def setup(self):
        c, t = self.head_config, self.trunk_config
        if tuple(c.offsets) != tuple(range(2, c.k + 1)):
            raise HeadConfigError(f"eagle drafts offsets 2..k as a chain: offsets must be "
                                  f"{tuple(range(2, c.k + 1))}, got {c.offsets}")
        d, n, h = t.dim, t.n_heads, t.head_dim
        dt, pdt = self._dtype, self._param_dtype
        dot = dot_general_for(t.matmul)   # a decoder's trunk config: the few-row kernels
        dense = lambda features, name, std=0.02: Dense(
            features, dtype=dt, param_dtype=pdt, name=name,
            kernel_init=nn.initializers.normal(std), dot_general=dot)
        self.fc = dense(d, "fc")                       # [2D,D]
        self.wq, self.wk, self.wv = dense(n * h, "wq"), dense(n * h, "wk"), dense(n * h, "wv")
        self.wo = dense(d, "wo", 0.02 / np.sqrt(2.0))  # [N*H,D]
        self.attn_norm = RMSNorm(t.norm_eps, dt, pdt)
        self.mlp_norm = RMSNorm(t.norm_eps, dt, pdt)
        self.mlp = MLP(t.ffn_dim, dt, pdt, dot)
        self.out_scale = _TrunkScale(pdt)
        self.inv_freq = inverse_frequencies(h, t.rope_theta, t.rope_scaling)

    # --- the layer, in pieces ----------------------------------------------------------------
    def _input(self, trunk_params, feature, token):
        """feature [B,T,D], token [B,T] -> u [B,T,D]."""
        e = self._embed(trunk_params, token)
        return self.fc(jnp.concatenate([feature.astype(self._dtype), e], axis=-1))

    def _qkv(self, u, positions):
        """u [B,T,D], positions [B,T] -> q, k, v [B,T,N,H] (q, k rotated)."""
        t = self.trunk_config
        x = self.attn_norm(u)
        split = lambda y: y.reshape(y.shape[:2] + (t.n_heads, t.head_dim))
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        return apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq), v

    def _finish(self, trunk_params, u, attended):
        """u [B,T,D], attended [B,T,N,H] -> g [B,T,D] (the predicted next normed feature)."""
        h = u + self.wo(attended.reshape(attended.shape[:2] + (-1,)))
        h = h + self.mlp(self.mlp_norm(h))
        xf = h.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True)
                                    + self.trunk_config.norm_eps)
        return normed.astype(self._dtype) * self.out_scale(
            trunk_params["norm"]["scale"]).astype(self._dtype)

    @property
    def _scale(self):
        return 1.0 / np.sqrt(self.trunk_config.head_dim)

    # --- training ------------------------------------------------------------------------------
    def train_hidden(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> [B,X,J,D]: offset j's predicted feature for the chain starting at each gathered
        position (gather_index [B,X]: the rows' supervised positions, contiguous and in order,
        as training/step.py's gather_index gives them; None: every position)."""
        del deterministic
        b, t = feats.tokens.shape
        index = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                 if gather_index is None else gather_index)                      # [B,X]
        f = gather_positions(feats.hidden_normed, index)                          # [B,X,D]
        next_tok = gather_positions(feats.tokens, jnp.minimum(index + 1, t - 1))  # [B,X]
        x = index.shape[1]
        pos = jnp.broadcast_to(jnp.arange(x, dtype=jnp.int32), (b, x))            # entry index
        steps = len(self.head_config.offsets)
        keys, values, outs = [], [], []
        feature = f
        for s in range(1, steps + 1):
            if s > 1:
                feature = _shift_right(outs[-1], 1)        # g^{s-1} at q-1: the chain's feature
            u = self._input(trunk_params, feature, next_tok)
            q, k, v = self._qkv(u, pos)
            keys.append(k)
            values.append(v)
            # step-1 (true) entries at positions <= q-s+1
            visible = jnp.arange(x)[None, :] <= jnp.arange(x)[:, None] - (s - 1)
            scores = [jnp.where(visible[None, None],
                                jnp.einsum("bqnh,bknh->bnqk", q, keys[0]) * self._scale, NEG_INF)]
            diag_values = []
            for i in range(2, s + 1):  # step i's entry of this chain sits at q - (s - i)
                ki, vi = _shift_right(keys[i - 1], s - i), _shift_right(values[i - 1], s - i)
                scores.append((jnp.einsum("bqnh,bqnh->bnq", q, ki) * self._scale)[..., None])
                diag_values.append(vi)
            probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1).astype(jnp.float32), -1)
            probs = probs.astype(v.dtype)
            out = jnp.einsum("bnqk,bknh->bqnh", probs[..., :x], values[0])
            for i, vi in enumerate(diag_values):
                out = out + probs[..., x + i].transpose(0, 2, 1)[..., None] * vi
            outs.append(self._finish(trunk_params, u, out))                     # [B,X,D]
        # offset j = step j+1's output at the chain's query position t + j
        return jnp.stack([_shift_left(g, j) for j, g in enumerate(outs)], axis=2)  # [B,X,J,D]

    def train_logits(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> [B,X,J,V] float32 (the frozen unembedding of train_hidden)."""
        return self._unembed(trunk_params, self.train_hidden(trunk_params, feats, deterministic,
                                                             gather_index))

    # --- decoding ------------------------------------------------------------------------------
    def init_state(self, trunk_params, batch: int, capacity: int = 0,
                   max_new_tokens: int | None = None):
        """Empty cache of `capacity` entries (a row consumes at most its sequence's positions),
        or fewer where max_new_tokens bounds them: the first `advance` keeps k prompt positions
        (k - 1 pairs and the pending feature) and the row's later positions are the tokens it
        emits but the last (< max_new_tokens), so k + max_new_tokens entries hold every pair.
        Each draft step's attention reads every entry, filled or not: at batch 8 and the
        ~350-slot cache of a 2-shot newstest prompt, drafting cost 13 ms a step where 80
        entries cost 8 (runs/s15/prof_eagle.py)."""
        t = self.trunk_config
        if max_new_tokens is not None:
            capacity = min(capacity, self.head_config.k + max_new_tokens)
        shape = (batch, max(capacity, 1), t.n_heads, t.head_dim)
        return {"k": jnp.zeros(shape, self._dtype), "v": jnp.zeros(shape, self._dtype),
                "length": jnp.zeros((batch,), jnp.int32),
                "pending": jnp.zeros((batch, t.dim), self._dtype),
                "has_pending": jnp.zeros((batch,), bool)}

    def advance(self, trunk_params, state, hidden_normed, advance_mask, tokens=None):
        """Stores the pairs (feature i-1, token i) of the consumed positions (advance_mask
        [B,T], contiguous per row); a row's first call keeps its last k positions only."""
        b, t = advance_mask.shape
        first = ~state["has_pending"]                                            # [B]
        from_end = jnp.cumsum(advance_mask[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]
        mask = advance_mask & (~first[:, None] | (from_end <= self.head_config.k))  # [B,T]
        prev_mask = jnp.concatenate([state["has_pending"][:, None], mask[:, :-1]], axis=1)
        prev_feat = jnp.concatenate([state["pending"][:, None].astype(hidden_normed.dtype),
                                     hidden_normed[:, :-1]], axis=1)             # [B,T,D]
        pair = mask & prev_mask                                                  # [B,T]
        slots = state["length"][:, None] + jnp.cumsum(pair.astype(jnp.int32), axis=1) - 1
        capacity = state["k"].shape[1]
        slots = jnp.where(pair, slots, capacity)                                 # dropped
        u = self._input(trunk_params, prev_feat, tokens)
        _, k, v = self._qkv(u, slots)
        rows = jnp.arange(b)[:, None]
        last = jnp.argmax(jnp.where(mask, jnp.arange(t)[None, :], -1), axis=1)  # [B]
        any_kept = mask.any(axis=1)
        pending = jnp.take_along_axis(hidden_normed, last[:, None, None], axis=1)[:, 0]
        return {"k": state["k"].at[rows, slots].set(k.astype(state["k"].dtype), mode="drop"),
                "v": state["v"].at[rows, slots].set(v.astype(state["v"].dtype), mode="drop"),
                "length": state["length"] + pair.sum(axis=1).astype(jnp.int32),
                "pending": jnp.where(any_kept[:, None], pending.astype(state["pending"].dtype),
                                     state["pending"]),
                "has_pending": state["has_pending"] | any_kept}

    def draft_logits(self, trunk_params, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """-> (draft_tokens [B,W-1] int32, draft_logits [B,W-1,V or U]): the chain from the
        last verified position (its feature and the trunk's exact next token)."""
        del last_hidden, last_position
        cache_k, cache_v, length = state["k"], state["v"], state["length"]       # [B,S,N,H]
        in_cache = jnp.arange(cache_k.shape[1])[None, :] < length[:, None]     # [B,S]
        feature, token = last_hidden_normed[:, None], next_token[:, None]       # [B,1,D], [B,1]
        chain_k, chain_v, tokens, logits = [], [], [], []
        for s in range(len(self.head_config.offsets)):
            u = self._input(trunk_params, feature, token)                        # [B,1,D]
            q, k, v = self._qkv(u, (length + s)[:, None])                        # [B,1,N,H]
            chain_k.append(k)
            chain_v.append(v)
            ck, cv = jnp.concatenate(chain_k, 1), jnp.concatenate(chain_v, 1)   # [B,s+1,N,H]
            sc = jnp.einsum("bqnh,bknh->bnqk", q, cache_k) * self._scale         # [B,N,1,S]
            sc = jnp.where(in_cache[:, None, None, :], sc, NEG_INF)
            sc_chain = jnp.einsum("bqnh,bknh->bnqk", q, ck) * self._scale        # [B,N,1,s+1]
            probs = jax.nn.softmax(jnp.concatenate([sc, sc_chain], -1).astype(jnp.float32), -1)
            probs = probs.astype(v.dtype)
            s_len = cache_k.shape[1]
            out = (jnp.einsum("bnqk,bknh->bqnh", probs[..., :s_len], cache_v)
                   + jnp.einsum("bnqk,bknh->bqnh", probs[..., s_len:], cv))      # [B,1,N,H]
            g = self._finish(trunk_params, u, out)                               # [B,1,D]
            tok, lg = self._draft_project(trunk_params, g[:, 0])                 # [B], [B,V|U]
            tokens.append(tok)
            logits.append(lg)
            feature, token = g, tok[:, None]
        return jnp.stack(tokens, axis=1).astype(jnp.int32), jnp.stack(logits, axis=1)
