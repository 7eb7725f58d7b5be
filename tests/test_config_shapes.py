"""Full-size shapes without allocating weights, and the two derived numbers checked against code
we did not write: FFN width (Meta's `FeedForward`) and RoPE frequencies (Meta's
`precompute_freqs_cis` / `apply_scaling`, HF's llama3 rope init). Plus config validation.
"""

import math

import jax
import numpy as np
import pytest
import torch

import _meta_reference as ref
from gptk_jax.llama.config import (LLAMA3_1_8B_PARAMS, LLAMA3_1_70B_PARAMS, LLAMA3_2_1B_PARAMS,
                             ConfigError, LlamaConfig, RopeScaling, from_meta_params,
                             meta_ffn_dim)
from gptk_jax.llama.model import abstract_params
from gptk_jax.llama.rope import inverse_frequencies

# Published sizes: Llama 3.2 1B (tied embeddings), Llama 3.1 8B.
LLAMA3_2_1B_COUNT = 1_235_814_400
LLAMA3_1_8B_COUNT = 8_030_261_248

SIZES = {"1B": LLAMA3_2_1B_PARAMS, "8B": LLAMA3_1_8B_PARAMS, "70B": LLAMA3_1_70B_PARAMS}


def count(config: LlamaConfig) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))


def test_llama3_2_1b_param_count_and_shapes():
    cfg = from_meta_params(LLAMA3_2_1B_PARAMS, tie_embeddings=True)
    shapes = abstract_params(cfg)
    assert count(cfg) == LLAMA3_2_1B_COUNT
    assert "output" not in shapes
    assert shapes["tok_embeddings"]["embedding"].shape == (128256, 2048)
    attention = shapes["layers"]["attention"]
    assert attention["wq"]["kernel"].shape == (16, 2048, 32, 64)
    assert attention["wk"]["kernel"].shape == (16, 2048, 8, 64)
    assert attention["wo"]["kernel"].shape == (16, 32, 64, 2048)
    assert shapes["layers"]["feed_forward"]["w2"]["kernel"].shape == (16, 8192, 2048)


def test_llama3_1_8b_param_count():
    cfg = from_meta_params(LLAMA3_1_8B_PARAMS)
    assert count(cfg) == LLAMA3_1_8B_COUNT
    assert abstract_params(cfg)["output"]["kernel"].shape == (4096, 128256)


@pytest.mark.parametrize("size,ffn", [("1B", 8192), ("8B", 14336), ("70B", 28672)])
def test_ffn_width_matches_metas_feed_forward(size, ffn):
    p = SIZES[size]
    assert meta_ffn_dim(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"]) == ffn
    assert from_meta_params(p).ffn_dim == ffn
    # Meta's own FeedForward computes its width in __init__. fairscale's layers allocate with the
    # legacy `torch.Tensor(rows, cols)` constructor, which ignores the meta device: the storage is
    # reserved but never touched (their init_method is the identity), so no RAM is used.
    meta_model = ref.meta_model_module()
    with torch.device("meta"):
        ff = meta_model.FeedForward(dim=p["dim"], hidden_dim=4 * p["dim"],
                                    multiple_of=p["multiple_of"],
                                    ffn_dim_multiplier=p["ffn_dim_multiplier"])
    assert ff.w1.weight.shape == (ffn, p["dim"]) and ff.w2.weight.shape == (p["dim"], ffn)
    del ff


def _meta_freqs_cis_angles(head_dim: int, theta: float) -> np.ndarray:
    """The angle Meta's `precompute_freqs_cis(use_scaled=True)` gives position 1: its inverse
    frequencies."""
    freqs_cis = ref.meta_model_module().precompute_freqs_cis(head_dim, 2, theta, use_scaled=True)
    return torch.angle(freqs_cis[1]).double().numpy()


@pytest.mark.parametrize("head_dim,theta", [(64, 500000.0), (128, 500000.0), (16, 10000.0)])
def test_rope_factor_8_matches_metas_precompute_freqs_cis(head_dim, theta):
    ours = inverse_frequencies(head_dim, theta, RopeScaling(factor=8.0))
    np.testing.assert_allclose(ours, _meta_freqs_cis_angles(head_dim, theta), rtol=1e-6, atol=0)
    meta = ref.meta_model_module()
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    np.testing.assert_allclose(ours, meta.apply_scaling(base).numpy(), rtol=1e-6, atol=0)
    unscaled = inverse_frequencies(head_dim, theta, None)
    np.testing.assert_allclose(unscaled, base.numpy(), rtol=1e-6, atol=0)
    if head_dim >= 64:  # some frequencies are long enough to be scaled at all
        assert np.abs(ours / unscaled - 1).max() > 0.5


@pytest.mark.parametrize("factor", [32.0, 8.0])
def test_rope_frequencies_match_hf_llama3_init(factor):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFLlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                       max_position_embeddings=131072,
                       rope_scaling={"rope_type": "llama3", "factor": factor,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    hf_freqs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, None)
    assert attention_factor == 1.0
    cfg = from_meta_params(LLAMA3_2_1B_PARAMS, rope_scaling_factor=factor, tie_embeddings=True)
    ours = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, hf_freqs.numpy(), rtol=1e-6, atol=0)


def test_meta_params_rope_decisions():
    default = from_meta_params(LLAMA3_2_1B_PARAMS)
    assert default.rope_scaling.factor == 8.0 and "use_scaled_rope" in default.rope_scaling_source
    off = from_meta_params(LLAMA3_2_1B_PARAMS, rope_scaling_factor=0)
    assert off.rope_scaling is None and "--rope-scaling-factor 0" in off.rope_scaling_source
    unscaled = from_meta_params(dict(LLAMA3_2_1B_PARAMS, use_scaled_rope=False))
    assert unscaled.rope_scaling is None


def test_vocab_from_embedding_when_params_json_says_minus_one():
    cfg = from_meta_params(dict(LLAMA3_2_1B_PARAMS, vocab_size=-1), vocab_size=128256)
    assert cfg.vocab_size == 128256
    with pytest.raises(ConfigError, match="vocab_size"):
        from_meta_params(dict(LLAMA3_2_1B_PARAMS, vocab_size=-1))


# --- validation ---------------------------------------------------------------------------------

TINY = dict(vocab_size=32, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=24)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="n_kv_heads 3 does not divide n_heads 4"):
        LlamaConfig(**dict(TINY, n_kv_heads=3))
    with pytest.raises(ConfigError, match=r"params.json: .*n_kv_heads 3 does not divide"):
        from_meta_params(dict(LLAMA3_2_1B_PARAMS, n_heads=32, n_kv_heads=3))


def test_head_dim_must_be_even():
    with pytest.raises(ConfigError, match="head_dim must be even"):
        LlamaConfig(**dict(TINY, dim=12, n_heads=4, n_kv_heads=4))  # head_dim 3
    with pytest.raises(ConfigError, match="dim 18 is not divisible by n_heads 4"):
        LlamaConfig(**dict(TINY, dim=18))


def test_unknown_field_is_refused():
    good = LlamaConfig(**TINY).to_dict()
    assert LlamaConfig.from_dict(good) == LlamaConfig(**TINY)
    with pytest.raises(ConfigError, match=r"unknown LlamaConfig field\(s\) \['n_expert'\]"):
        LlamaConfig.from_dict(dict(good, n_expert=8), source="config.json")


def test_missing_meta_fields_are_named():
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['n_heads'\]"):
        from_meta_params({"dim": 64, "n_layers": 2, "vocab_size": 10})
