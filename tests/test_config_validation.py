"""Architecture fields read from params.json / config.json are type- and range-checked: a bad
value is a ConfigError naming the file, the field and the value, never a silent cast (JSON `true`
read as 1, `64.9` as 64) or a NaN model (rope_theta -1)."""

import math

import pytest

from gptk_jax.llama.config import (ConfigError, LlamaConfig, RopeScaling, from_hf_config,
                                   from_meta_params)

META = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
        "multiple_of": 32, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0,
        "use_scaled_rope": True}
HF = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
      "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
      "max_position_embeddings": 512}

META_BAD = [
    ("dim", "sixty-four"), ("dim", 64.9), ("dim", True), ("dim", 0), ("n_heads", True),
    ("n_heads", 3),          # does not divide dim 64 -> message names both
    ("n_layers", -1), ("n_kv_heads", 3), ("vocab_size", "256"), ("multiple_of", 0),
    ("ffn_dim_multiplier", "big"), ("ffn_dim_multiplier", -1.0), ("norm_eps", "tiny"),
    ("norm_eps", 0.0), ("rope_theta", -1), ("rope_theta", float("nan")),
    ("rope_theta", float("inf")), ("use_scaled_rope", "yes"),
]


@pytest.mark.parametrize("field,value", META_BAD, ids=[f"{f}={v!r}" for f, v in META_BAD])
def test_meta_params_bad_field_is_refused_with_its_name(field, value):
    with pytest.raises(ConfigError) as err:
        from_meta_params(dict(META, **{field: value}), source="ckpt/params.json")
    message = str(err.value)
    assert message.startswith("ckpt/params.json: "), message
    assert field in message or "n_heads" in message, message
    if field != "n_heads" or value is True:
        assert repr(value) in message or str(value) in message, message


HF_BAD = [
    ("hidden_size", "sixty-four"), ("hidden_size", 64.5), ("num_attention_heads", True),
    ("vocab_size", "256"), ("intermediate_size", 0), ("rms_norm_eps", "tiny"),
    ("rope_theta", -1.0), ("max_position_embeddings", 512.5), ("tie_word_embeddings", "no"),
    ("head_dim", 15.5),
]


@pytest.mark.parametrize("field,value", HF_BAD, ids=[f"{f}={v!r}" for f, v in HF_BAD])
def test_hf_config_bad_field_is_refused_with_its_name(field, value):
    with pytest.raises(ConfigError) as err:
        from_hf_config(dict(HF, **{field: value}), source="hf/config.json")
    message = str(err.value)
    assert message.startswith("hf/config.json: ") and field in message, message
    assert repr(value) in message, message


def test_hf_rope_scaling_factor_is_checked():
    hf = dict(HF, rope_scaling={"rope_type": "llama3", "factor": "8"})
    with pytest.raises(ConfigError, match=r"rope_scaling.*'factor'.*'8'"):
        from_hf_config(hf, source="hf/config.json")


def test_good_fields_still_read_exactly():
    # Meta's own formula: hidden = int(2*4*64/3) = 170, *1.5 -> 255, rounded up to 32 -> 256.
    cfg = from_meta_params(META)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (64, 4, 2, 256,
                                                                                   256)
    # an integral float (some writers emit 64.0) is an integer
    assert from_meta_params(dict(META, dim=64.0)).dim == 64
    # Meta writes vocab_size -1: the tokenizer's size is used
    assert from_meta_params(dict(META, vocab_size=-1), vocab_size=300).vocab_size == 300
    assert from_hf_config(HF).ffn_dim == 128


@pytest.mark.parametrize("field,value", [("rope_theta", -1.0), ("rope_theta", math.nan),
                                         ("norm_eps", math.inf), ("norm_eps", True)])
def test_llama_config_itself_refuses_non_positive_or_non_finite(field, value):
    kwargs = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    with pytest.raises(ConfigError, match=field):
        LlamaConfig(**kwargs, **{field: value})


def test_rope_scaling_factor_must_be_finite():
    with pytest.raises(ConfigError, match="factor"):
        RopeScaling(factor=math.inf)


# config.json of a converted folder (LlamaConfig.from_dict): fields that used to load as
# nonsense ("no" is truthy, 16.0 is not an index, a string is not RoPE scaling)
FIELDS = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
# (field, value, text the message must show)
FROM_DICT_BAD = [
    ("tie_embeddings", "no", "'no'"), ("scan_layers", 1, "got 1"), ("head_dim", 16.0, "16.0"),
    ("head_dim", "16", "'16'"), ("rope_scaling", "llama3", "'llama3'"),
    ("rope_scaling", {"factor": "8"}, "factor must be a number, got '8'"),
    ("rope_scaling", {"factor": 8.0, "original_max_position": 8192.5}, "8192.5"),
    ("rope_scaling", {"factor": 8.0, "bogus": 1}, "bogus"),
    ("rope_scaling_source", 5, "got 5"),
]


@pytest.mark.parametrize("field,value,shown", FROM_DICT_BAD,
                         ids=[f"{f}={v!r}" for f, v, _ in FROM_DICT_BAD])
def test_converted_config_bad_field_is_refused_with_its_name(field, value, shown):
    with pytest.raises(ConfigError) as err:
        LlamaConfig.from_dict(dict(FIELDS, **{field: value}), source="out/config.json")
    message = str(err.value)
    assert message.startswith("out/config.json: ") and field in message, message
    assert shown in message, message


@pytest.mark.parametrize("fields", [None, [1, 2], "dim"])
def test_converted_config_that_is_not_an_object(fields):
    with pytest.raises(ConfigError, match="out/config.json: expected a JSON object"):
        LlamaConfig.from_dict(fields, source="out/config.json")
