"""PoMa head ("positional matrices"): per trained offset k, a learned position matrix P_k
[max_positions, D] added to the trunk's last-layer output before the final norm, the head's own
RMSNorm, then the trunk's frozen unembedding.

  logits_k(t) = unembed(RMSNorm_k(hidden_t + P_k[position_t]))

Params: `position_table` [J, A, D] and `offset_norm.scale` [J, D]. Recipe 'default': the table
starts at zero and the norm scales as the trunk's final norm scale (the trunk params are an
argument of `head.init`, and the initializer copies `trunk_params['norm']['scale']` once, at init
time), so at init the head reproduces the trunk's own logits. Recipe 'seed' (the original code):
the table ~ normal(SEED_POSITION_STD) and fresh RMSNorm scales (ones).

Positions are the real (RoPE) positions, so the head works in cached decoding. A real position
>= poma_max_positions raises ValueError when positions are concrete; under jit (where no Python
error can be raised) those entries' logits become NaN instead of silently reading a clamped row.
Padding entries (token_mask False, e.g. left-padding position -1) read row 0.

Einsum letters (docs/design.md): B batch, T positions, X gathered positions, J offsets, W tokens
per step, A table rows (absolute positions), D width, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.heads.common import MTPHead, gather_features, rms_norm
from gptk_jax.heads.config import SEED_POSITION_STD, HeadConfigError


class _NormScales(nn.Module):
    """J norm scales [J, D]; initialised from the call argument (the trunk's final norm scale
    [D]) or to ones. After init the argument is ignored."""
    n_offsets: int
    from_trunk: bool
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, trunk_scale):  # [D] -> [J,D]
        shape = (self.n_offsets, trunk_scale.shape[-1])
        start = trunk_scale if self.from_trunk else jnp.ones_like(trunk_scale)
        return self.param("scale", lambda rng: jnp.broadcast_to(
            start.astype(self.param_dtype), shape))


def check_positions(positions, valid, max_positions: int) -> None:
    """Raises if a real (valid) position is outside the table; skipped for traced values."""
    if isinstance(positions, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
        return
    pos, ok = np.asarray(positions), np.asarray(valid)
    bad = ok & ((pos < 0) | (pos >= max_positions))
    if bad.any():
        raise HeadConfigError(
            f"PoMa position {int(pos[bad].max())} is outside its position table (rows "
            f"0..{max_positions - 1}); raise HeadConfig.poma_max_positions (and retrain) or keep "
            "sequences shorter")


class PomaHead(MTPHead):
    per_position = True

    def setup(self):
        c = self.head_config
        j, d = len(c.offsets), self.trunk_config.dim
        seed = c.recipe == "seed"
        init = nn.initializers.normal(SEED_POSITION_STD) if seed else nn.initializers.zeros_init()
        self.position_table = self.param("position_table", init, (j, c.poma_max_positions, d),
                                         self._param_dtype)
        self.offset_norm = _NormScales(j, not seed, self._param_dtype)

    def _norm_scale(self, trunk_params):  # [J,D]
        return self.offset_norm(trunk_params["norm"]["scale"])

    def _offset_hidden(self, trunk_params, hidden, positions, valid, offset_idx):
        """hidden [..., D], positions / valid [...] -> normed [..., J', D] for offset_idx (J')."""
        max_positions = self.head_config.poma_max_positions
        check_positions(positions, valid, max_positions)
        in_range = (positions >= 0) & (positions < max_positions)
        rows = jnp.where(valid & in_range, positions, 0)
        pos_emb = jnp.take(self.position_table, rows, axis=1)[offset_idx]  # [J', ..., D]
        pos_emb = jnp.moveaxis(pos_emb, 0, -2)                      # [..., J', D]
        h = hidden.astype(self._dtype)[..., None, :] + pos_emb.astype(self._dtype)
        h = jnp.where((valid & ~in_range)[..., None, None], jnp.nan, h)
        scale = self._norm_scale(trunk_params)[offset_idx]          # [J',D]
        return rms_norm(h, scale, self.trunk_config.norm_eps, self._dtype)

    def train_hidden(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> [B,T,J,D] ([B,X,J,D] at gather_index [B,X]): what the unembedding projects."""
        del deterministic
        feats = gather_features(feats, gather_index)
        valid = feats.token_mask if feats.token_mask is not None else \
            jnp.ones(feats.positions.shape, bool)
        idx = np.arange(len(self.head_config.offsets))
        return self._offset_hidden(trunk_params, feats.hidden, feats.positions, valid, idx)

    def train_logits(self, trunk_params, feats, deterministic: bool = True, gather_index=None):
        """-> head_logits [B,T,J,V] float32 for every configured offset (one unembed call);
        [B,X,J,V] at gather_index [B,X]."""
        h = self.train_hidden(trunk_params, feats, deterministic, gather_index)
        return self._unembed(trunk_params, h)                       # [B,T,J,V]

    def draft_logits(self, trunk_params, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """-> (draft_tokens [B,W-1] int32, draft_logits [B,W-1,V]) for offsets 2..W."""
        del state, last_hidden_normed, next_token
        idx = np.asarray(self.head_config.draft_offset_indices)
        valid = jnp.ones(last_position.shape, bool)
        h = self._offset_hidden(trunk_params, last_hidden, last_position, valid, idx)  # [B,W-1,D]
        return self._draft_project(trunk_params, h)
