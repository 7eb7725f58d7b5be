"""The training ConfigDict turned, once, into frozen validated dataclasses.

`RunSettings.from_config(config)` is the only place that reads an ml_collections ConfigDict
(configs/*.py); everything after it sees these dataclasses. Every section rejects keys it does not
know with an error naming the key and the known ones, so a typo (`optimizer.lerning_rate`) fails
before anything is loaded. Relative paths are resolved against the repository root at run time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional

from gptk_jax.heads.config import HeadConfig, HeadConfigError

ROOT = Path(__file__).resolve().parent.parent.parent   # repository root
RANDOM_TINY = "random-tiny"

TARGETS = ("gold", "trunk_argmax")
OPTIMIZERS = ("adamw", "adam_l2")
SCHEDULES = ("cosine", "constant")
PARALLEL_MODES = ("mesh", "pmap")
FEATURE_DTYPES = ("float32", "bfloat16")


class TrainingError(ValueError):
    """Training cannot start or continue: the message says what to change."""


class ConfigKeyError(TrainingError):
    """A config that names a key no section knows, or holds a value no section accepts."""


def resolve_path(path: str) -> Path:
    """A config path: absolute as given, relative ones against the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def _to_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _section(cls, values: Mapping[str, Any], name: str):
    """cls(**values) with unknown keys and bad values reported as `name.key`."""
    values = _to_dict(values)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigKeyError(f"unknown config key(s) {[f'{name}.{k}' for k in unknown]}; "
                             f"known keys of '{name}': {known}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigKeyError(f"config '{name}': {e}") from None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_prefixes: tuple = ()
    train_target_files: tuple = ()
    src_lang: str = "de"
    tgt_lang: str = "en"
    max_train_pairs: Optional[int] = None
    max_len: int = 256
    truncate: str = "drop"
    bucket_lengths: tuple = ()
    shots: int = 0
    shots_prefix: str = ""
    space_with_target: bool = False
    eval_prefix: str = ""
    eval_max_sentences: Optional[int] = None

    def __post_init__(self):
        for name in ("train_prefixes", "train_target_files", "bucket_lengths"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _check(len(self.train_prefixes) > 0, "train_prefixes is empty")
        _check(not self.train_target_files or
               len(self.train_target_files) == len(self.train_prefixes),
               f"train_target_files ({len(self.train_target_files)}) must be empty or one per "
               f"train prefix ({len(self.train_prefixes)})")
        _check(self.max_train_pairs is None or self.max_train_pairs > 0,
               f"max_train_pairs must be > 0 or None, got {self.max_train_pairs}")
        _check(self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}")
        _check(self.shots >= 0, f"shots must be >= 0, got {self.shots}")
        _check(not self.shots or bool(self.shots_prefix), "shots > 0 needs shots_prefix")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    targets: str = "gold"
    offset_weights: Optional[tuple] = None
    first_target_tokens_only: bool = False
    positions_per_row: Optional[int] = None
    argmax_chunk: int = 64
    position_chunk: int = 64

    def __post_init__(self):
        _check(self.targets in TARGETS, f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.offset_weights is not None:
            weights = tuple(float(w) for w in self.offset_weights)
            _check(all(w >= 0 for w in weights) and sum(weights) > 0,
                   f"offset_weights must be >= 0 with a positive sum, got {weights}")
            object.__setattr__(self, "offset_weights", weights)
        _check(self.positions_per_row is None or self.positions_per_row >= 1,
               f"positions_per_row must be >= 1 or None, got {self.positions_per_row}")
        _check(self.argmax_chunk >= 1, f"argmax_chunk must be >= 1, got {self.argmax_chunk}")
        _check(self.position_chunk >= 0,
               f"position_chunk must be >= 0 (0: no packing), got {self.position_chunk}")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    end_learning_rate_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 0.0

    def __post_init__(self):
        _check(self.name in OPTIMIZERS, f"name must be one of {OPTIMIZERS}, got {self.name!r}")
        _check(self.schedule in SCHEDULES,
               f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip_norm >= 0, f"grad_clip_norm must be >= 0, got {self.grad_clip_norm}")


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    global_batch_size: int = 16
    num_epochs: float = 1.0
    num_train_steps: Optional[int] = None
    log_every_steps: int = 10
    eval_every_steps: int = 0
    eval_at_start: bool = False
    checkpoint_every_steps: int = 0
    max_checkpoints_to_keep: int = 3

    def __post_init__(self):
        _check(self.global_batch_size >= 1,
               f"global_batch_size must be >= 1, got {self.global_batch_size}")
        _check(self.num_epochs > 0, f"num_epochs must be > 0, got {self.num_epochs}")
        _check(self.num_train_steps is None or self.num_train_steps >= 1,
               f"num_train_steps must be >= 1 or None, got {self.num_train_steps}")
        for name in ("log_every_steps",):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        for name in ("eval_every_steps", "checkpoint_every_steps"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0 (0: off)")
        _check(self.max_checkpoints_to_keep >= 1, "max_checkpoints_to_keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    mode: str = "mesh"
    model_axis_size: int = 1

    def __post_init__(self):
        _check(self.mode in PARALLEL_MODES,
               f"mode must be one of {PARALLEL_MODES}, got {self.mode!r}")
        _check(self.model_axis_size >= 1, "model_axis_size must be >= 1")
        _check(self.mode == "mesh" or self.model_axis_size == 1,
               "model_axis_size > 1 (trunk sharded over 'model') needs mode='mesh'")


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    cache: bool = False
    cache_dir: Optional[str] = None
    dtype: str = "float32"
    build_batch_size: int = 16

    def __post_init__(self):
        _check(self.dtype in FEATURE_DTYPES,
               f"dtype must be one of {FEATURE_DTYPES}, got {self.dtype!r}")
        _check(self.build_batch_size >= 1, "build_batch_size must be >= 1")


_SECTIONS = {"data": DataSettings, "loss": LossSettings, "optimizer": OptimizerSettings,
             "training": LoopSettings, "parallel": ParallelSettings, "features": FeatureSettings}
_SCALARS = ("trunk_checkpoint", "trunk_dtype", "seed")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    trunk_checkpoint: str
    trunk_dtype: str
    seed: int
    head: HeadConfig
    data: DataSettings
    loss: LossSettings
    optimizer: OptimizerSettings
    training: LoopSettings
    parallel: ParallelSettings
    features: FeatureSettings

    @classmethod
    def from_config(cls, config: Any) -> "RunSettings":
        values = _to_dict(config)
        known = list(_SCALARS) + ["head"] + list(_SECTIONS)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigKeyError(f"unknown config key(s) {unknown}; known top-level keys: {known}")
        missing = sorted(set(known) - set(values))
        if missing:
            raise ConfigKeyError(f"config lacks key(s) {missing} (start from configs/base.py)")
        head = dict(_to_dict(values["head"]))
        for name in ("offsets", "draft_vocab"):
            if head.get(name) is not None:
                head[name] = tuple(head[name])
        try:
            head_config = HeadConfig.from_dict(head)
        except (HeadConfigError, TypeError) as e:
            raise ConfigKeyError(f"config 'head': {e}") from None
        if values["trunk_dtype"] not in ("float32", "bfloat16", "float16"):
            raise ConfigKeyError(f"trunk_dtype must be float32, bfloat16 or float16, "
                                 f"got {values['trunk_dtype']!r}")
        sections = {name: _section(kind, values[name], name) for name, kind in _SECTIONS.items()}
        settings = cls(trunk_checkpoint=str(values["trunk_checkpoint"]),
                       trunk_dtype=values["trunk_dtype"], seed=int(values["seed"]),
                       head=head_config, **sections)
        weights = settings.loss.offset_weights
        if weights is not None and len(weights) != len(head_config.offsets):
            raise ConfigKeyError(f"loss.offset_weights has {len(weights)} entries, head.offsets "
                                 f"{head_config.offsets} has {len(head_config.offsets)}")
        return settings

    @property
    def offset_weights(self) -> tuple:
        return self.loss.offset_weights or (1.0,) * len(self.head.offsets)

    @property
    def max_offset(self) -> int:
        return max(self.head.offsets)
