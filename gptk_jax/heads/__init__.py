"""Multi-token-prediction heads on a frozen Llama trunk (interface: docs/design.md, "MTP heads").

  head = make_head(head_config, trunk_config)
  head_params = init_head_params(head, trunk_params, rng)
  head_logits = head.apply({"params": head_params}, trunk_params, feats,
                           method=head.train_logits)                    # [B,T,J,V]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.heads.common import (HeadFeatures, MTPHead, draft_argmax, shifted_next_tokens,
                                   trunk_embed, trunk_final_norm, trunk_unembed)
from gptk_jax.heads.config import KINDS, RECIPES, HeadConfig, HeadConfigError, seed_config
from gptk_jax.heads.eagle import EagleHead
from gptk_jax.heads.linear import LinearHead
from gptk_jax.heads.lstm import LSTMHead
from gptk_jax.heads.lstm_conditioned import ConditionedLSTMHead
from gptk_jax.heads.poma import PomaHead

_HEADS = {"lstm": LSTMHead, "poma": PomaHead, "linear": LinearHead, "eagle": EagleHead}

__all__ = ["HeadConfig", "HeadConfigError", "HeadFeatures", "MTPHead", "LSTMHead",
           "ConditionedLSTMHead", "PomaHead", "EagleHead",
           "LinearHead", "KINDS", "RECIPES", "make_head", "init_head_params", "example_features",
           "seed_config", "draft_argmax", "shifted_next_tokens", "trunk_embed", "trunk_final_norm",
           "trunk_unembed"]


def make_head(head_config: HeadConfig, trunk_config: LlamaConfig) -> MTPHead:
    """The flax.linen Module for head_config on a trunk described by trunk_config."""
    if head_config.kind == "lstm" and head_config.recipe == "conditioned":
        return ConditionedLSTMHead(head_config, trunk_config)
    return _HEADS[head_config.kind](head_config, trunk_config)


def example_features(trunk_config: LlamaConfig, k: int, batch: int = 1,
                     length: int = 2) -> HeadFeatures:
    """Zero features of the right shapes and dtypes (for init and shape checks)."""
    d = trunk_config.dim
    ints = jnp.zeros((batch, length), jnp.int32)
    return HeadFeatures(hidden=jnp.zeros((batch, length, d)),
                        hidden_normed=jnp.zeros((batch, length, d)), positions=ints,
                        tokens=ints, token_mask=jnp.ones((batch, length), bool),
                        next_tokens=jnp.zeros((batch, length, k), jnp.int32))


def init_head_params(head: MTPHead, trunk_params: dict, rng: jax.Array) -> dict:
    """Initial head params (PoMa copies the trunk's final norm scale here, see poma.py)."""
    feats = example_features(head.trunk_config, head.head_config.k)
    return head.init(rng, trunk_params, feats, method=head.train_logits)["params"]
