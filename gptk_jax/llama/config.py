"""LlamaConfig: the one frozen, validated description of a Llama-family trunk.

Built once at the edge from a Meta `params.json`, an HF `config.json` or GGUF metadata; modules
only ever see this dataclass. Architecture numbers are read from the checkpoint; the two derived
ones (FFN width, RoPE scaling factor) are computed exactly as the checkpoint's own code does, and
the RoPE decision is recorded in `rope_scaling_source` so the converter can print it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

from gptk_jax.errors import GptkError

MATMULS = ("xla", "few_rows")   # LlamaConfig.matmul: XLA's products, or gptk_jax/kernels/few_rows.py

# Meta's reference code (llama-models, llama3/model.py `apply_scaling`) hard-codes these for every
# Llama 3.x checkpoint whose params.json says use_scaled_rope; HF configs of Llama 3.2 1B/3B say
# factor 32 instead. The factor is an explicit field so either can be reproduced.
META_ROPE_SCALE_FACTOR = 8.0
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_CONTEXT = 8192


class ConfigError(GptkError, ValueError):
    """An architecture description that cannot describe a valid model."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (`rope_type: llama3`)."""
    factor: float
    low_freq_factor: float = LLAMA3_LOW_FREQ_FACTOR
    high_freq_factor: float = LLAMA3_HIGH_FREQ_FACTOR
    original_max_position: int = LLAMA3_ORIGINAL_CONTEXT

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"rope_scaling.{name} must be a number, got "
                                  f"{getattr(self, name)!r}")
        if not _is_int(self.original_max_position) or self.original_max_position <= 0:
            raise ConfigError("rope_scaling.original_max_position must be a positive integer, "
                              f"got {self.original_max_position!r}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError("rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
                              f"{self.high_freq_factor} and {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int                      # D, model width
    n_layers: int                 # L
    n_heads: int                  # N, query heads
    n_kv_heads: int               # K, key/value heads (GQA)
    ffn_dim: int                  # F, SwiGLU hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    rope_scaling_source: str = "none"  # why rope_scaling is what it is (printed by the converter)
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    head_dim: Optional[int] = None  # H; defaults to dim // n_heads
    scan_layers: bool = False     # nn.scan over layers (same params either way)
    dtype: str = "float32"        # activation / compute dtype
    param_dtype: str = "float32"
    # How products run, not what the trunk is (never written by to_dict, so it changes no file
    # or fingerprint): "xla", or "few_rows" (products of <= 8 rows by gptk_jax/kernels/few_rows.py
    # on CPU; decoders set it, decoding/engine.py).
    matmul: str = "xla"
    # Also a run-time setting, never written: q|k|v and w1|w3 each as one product over weights
    # concatenated once at load (`model.fuse_projections`; decoders set it): 120 products a
    # SmolLM2 step instead of 210, each call's overhead paid fewer times (docs/benchmarks.md).
    fuse_projections: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "max_seq_len") + (() if self.head_dim is None else ("head_dim",)):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("tie_embeddings", "scan_layers", "fuse_projections"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.rope_scaling_source, str):
            raise ConfigError(f"rope_scaling_source must be a string, "
                              f"got {self.rope_scaling_source!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.rope_scaling, Mapping):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as e:   # a missing or unknown field
                raise ConfigError(f"rope_scaling {dict(self.rope_scaling)!r}: {e}") from None
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be null or an object, got {self.rope_scaling!r}")
        if self.matmul not in MATMULS:
            raise ConfigError(f"matmul must be {' or '.join(map(repr, MATMULS))}, got "
                              f"{self.matmul!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name} must be float32, bfloat16 or float16, "
                                  f"got {getattr(self, name)!r}")

    @property
    def n_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("matmul")        # run-time settings (see the fields)
        d.pop("fuse_projections")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> "LlamaConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object of LlamaConfig fields, got "
                              f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown LlamaConfig field(s) {unknown}")
        try:
            return cls(**d)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None


# --- typed reads of checkpoint fields (JSON / GGUF values) -----------------------------------
_MISSING = object()


def read_int(fields: Mapping[str, Any], key: str, source: str, default: Any = _MISSING, *,
             minimum: Optional[int] = 1) -> int:
    """fields[key] as an int: a bool, a string or a non-integral float is refused (JSON `true`
    is not 1, `64.9` is not 64), as is a value below `minimum`."""
    value = fields.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"{source}: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ConfigError(f"{source}: field {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{source}: field {key!r} must be >= {minimum}, got {value!r}")
    return int(value)


def read_float(fields: Mapping[str, Any], key: str, source: str, default: Any = _MISSING, *,
               positive: bool = True) -> float:
    """fields[key] as a finite float (> 0 when `positive`); bools and strings are refused."""
    value = fields.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"{source}: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: field {key!r} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"{source}: field {key!r} must be > 0, got {value!r}")
    return float(value)


def read_bool(fields: Mapping[str, Any], key: str, source: str, default: bool = False) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: field {key!r} must be true or false, got {value!r}")
    return value


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """FFN width exactly as Meta's `FeedForward.__init__` computes it (hidden_dim = 4 * dim)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _rope_from_flag(use_scaled: bool, factor_override: Optional[float], default_factor: float,
                    default_source: str) -> tuple[Optional[RopeScaling], str]:
    """Applies the CLI override: factor <= 0 turns scaling off, a positive factor replaces it."""
    if factor_override is not None:
        if factor_override <= 0:
            return None, "disabled by --rope-scaling-factor 0 (as the original research code did)"
        return RopeScaling(factor=float(factor_override)), \
            f"factor {factor_override} from --rope-scaling-factor"
    if not use_scaled:
        return None, default_source
    return RopeScaling(factor=default_factor), default_source


def from_meta_params(params: Mapping[str, Any], *, vocab_size: Optional[int] = None,
                     rope_scaling_factor: Optional[float] = None, tie_embeddings: bool = False,
                     source: str = "params.json", **overrides) -> LlamaConfig:
    """From Meta's `params.json` (dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of,
    ffn_dim_multiplier, norm_eps, rope_theta, use_scaled_rope)."""
    required = ("dim", "n_layers", "n_heads")
    missing = [k for k in required if k not in params]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {missing}")
    vocab = params.get("vocab_size", -1)
    if vocab is None or (not isinstance(vocab, bool) and isinstance(vocab, (int, float))
                         and vocab <= 0):
        vocab = vocab_size        # Meta writes -1: the tokenizer decides
        if vocab is None or vocab <= 0:
            raise ConfigError(f"{source}: vocab_size is missing or <= 0 and was not given "
                              "otherwise")
    else:
        vocab = read_int(params, "vocab_size", source)
    use_scaled = read_bool(params, "use_scaled_rope", source)
    rope, why = _rope_from_flag(
        use_scaled, rope_scaling_factor, META_ROPE_SCALE_FACTOR,
        f"factor {META_ROPE_SCALE_FACTOR} because {source} says use_scaled_rope and Meta's "
        "reference code (llama-models llama3/model.py) applies 8 to every Llama 3.x checkpoint"
        if use_scaled else f"{source} has no use_scaled_rope")
    dim, n_heads = read_int(params, "dim", source), read_int(params, "n_heads", source)
    multiplier = params.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = read_float(params, "ffn_dim_multiplier", source)
    cfg = dict(
        vocab_size=int(vocab), dim=dim, n_layers=read_int(params, "n_layers", source),
        n_heads=n_heads,
        n_kv_heads=read_int(params, "n_kv_heads", source, None) if params.get("n_kv_heads")
        is not None else n_heads,
        ffn_dim=meta_ffn_dim(dim, read_int(params, "multiple_of", source, 256), multiplier),
        norm_eps=read_float(params, "norm_eps", source, 1e-5),
        rope_theta=read_float(params, "rope_theta", source, 10000.0),
        rope_scaling=rope, rope_scaling_source=why, tie_embeddings=tie_embeddings)
    cfg.update(overrides)
    try:
        return LlamaConfig(**cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def from_hf_config(hf: Mapping[str, Any], *, rope_scaling_factor: Optional[float] = None,
                   source: str = "config.json", **overrides) -> LlamaConfig:
    """From an HF Llama `config.json`."""
    # transformers >= 5 writes RoPE settings as `rope_parameters` {rope_type, rope_theta, factor…}
    # instead of top-level `rope_theta` / `rope_scaling`; read either spelling.
    rope_params = hf.get("rope_parameters")
    if isinstance(rope_params, Mapping) and "rope_theta" not in hf:
        hf = dict(hf, rope_theta=rope_params.get("rope_theta", 10000.0))
        if rope_params.get("rope_type", "default") != "default" and not hf.get("rope_scaling"):
            hf["rope_scaling"] = dict(rope_params)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {missing}")
    rs = hf.get("rope_scaling") or None
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "llama3":
            raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported "
                              "(only 'llama3')")
        default = read_float(rs, "factor", f"{source} rope_scaling")
        why = f"factor {default} from {source} rope_scaling"
    else:
        default, why = 0.0, f"{source} has no rope_scaling"
    rope, why = _rope_from_flag(rs is not None, rope_scaling_factor, default, why)
    if rope is not None and rs is not None and rope_scaling_factor is None:
        rope = RopeScaling(factor=default,
                           low_freq_factor=float(rs.get("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR)),
                           high_freq_factor=float(rs.get("high_freq_factor",
                                                         LLAMA3_HIGH_FREQ_FACTOR)),
                           original_max_position=int(rs.get("original_max_position_embeddings",
                                                            LLAMA3_ORIGINAL_CONTEXT)))
    heads = read_int(hf, "num_attention_heads", source)
    cfg = dict(
        vocab_size=read_int(hf, "vocab_size", source), dim=read_int(hf, "hidden_size", source),
        n_layers=read_int(hf, "num_hidden_layers", source), n_heads=heads,
        n_kv_heads=read_int(hf, "num_key_value_heads", source) if hf.get("num_key_value_heads")
        is not None else heads,
        ffn_dim=read_int(hf, "intermediate_size", source),
        norm_eps=read_float(hf, "rms_norm_eps", source, 1e-6),
        rope_theta=read_float(hf, "rope_theta", source, 10000.0), rope_scaling=rope,
        rope_scaling_source=why, tie_embeddings=read_bool(hf, "tie_word_embeddings", source),
        max_seq_len=read_int(hf, "max_position_embeddings", source, 8192),
        head_dim=read_int(hf, "head_dim", source) if hf.get("head_dim") is not None else None)
    cfg.update(overrides)
    try:
        return LlamaConfig(**cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def from_gguf_metadata(meta: Mapping[str, Any], *, tie_embeddings: bool,
                       rope_scaling_factor: Optional[float] = None, source: str = "gguf",
                       **overrides) -> LlamaConfig:
    """From GGUF key/values (already decoded to Python values), architecture `llama`."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{source}: general.architecture is {arch!r}, expected 'llama'")
    p = "llama."
    required = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
    missing = [p + k for k in required if p + k not in meta]
    if missing:
        raise ConfigError(f"{source}: missing metadata key(s) {missing}")
    vocab = meta.get(p + "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    kind = meta.get(p + "rope.scaling.type")
    default = float(meta.get(p + "rope.scaling.factor", 0.0) or 0.0)
    use = kind in ("llama3",) and default > 0
    rope, why = _rope_from_flag(use, rope_scaling_factor, default,
                                f"factor {default} from {source}" if use
                                else f"{source} has no llama3 rope scaling")
    cfg = dict(
        vocab_size=int(vocab), dim=int(meta[p + "embedding_length"]),
        n_layers=int(meta[p + "block_count"]), n_heads=int(meta[p + "attention.head_count"]),
        n_kv_heads=int(meta.get(p + "attention.head_count_kv") or meta[p + "attention.head_count"]),
        ffn_dim=int(meta[p + "feed_forward_length"]),
        norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)), rope_scaling=rope,
        rope_scaling_source=why, tie_embeddings=tie_embeddings,
        max_seq_len=int(meta.get(p + "context_length", 8192)))
    cfg.update(overrides)
    try:
        return LlamaConfig(**cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# Published shapes, for eval_shape tests and for users who want a config without a checkpoint.
LLAMA3_2_1B_PARAMS = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32,
                      "n_kv_heads": 8, "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True, "vocab_size": 128256}
LLAMA3_1_8B_PARAMS = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
                      "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True, "vocab_size": 128256}
LLAMA3_1_70B_PARAMS = {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64,
                       "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0,
                       "use_scaled_rope": True, "vocab_size": 128256}
