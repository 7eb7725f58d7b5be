"""The training ConfigDict turned, once, into frozen validated dataclasses.

`RunSettings.from_config(config)` is the only place that reads an ml_collections ConfigDict
(configs/*.py); everything after it sees these dataclasses. Every section rejects keys it does not
know with an error naming the key and the known ones, so a typo (`optimizer.lerning_rate`) fails
before anything is loaded.

The field defaults here are the one source of the training defaults: configs/base.py builds its
sections from them (`SECTIONS`). Paths have no default (the library does not know where a
checkout keeps its data): configs set them, and `from_config` makes the relative ones absolute,
against the working directory, once; everything after it takes the paths as they are.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from gptk_jax.errors import GptkError
from gptk_jax.heads.config import HeadConfig, HeadConfigError

RANDOM_TINY = "random-tiny"   # trunk_checkpoint: a tiny random trunk written into the workdir

TARGETS = ("gold", "trunk_argmax", "trunk_soft")
OPTIMIZERS = ("adamw", "adam_l2")
SCHEDULES = ("cosine", "constant")
PARALLEL_MODES = ("mesh", "pmap")
FEATURE_DTYPES = ("float32", "bfloat16")


PATH = {"path": True}   # field metadata: a file or folder path, made absolute once (from_config)


class TrainingError(GptkError, ValueError):
    """Training cannot start or continue: the message says what to change."""


class ConfigKeyError(TrainingError):
    """A config that names a key no section knows, or holds a value no section accepts."""


def absolute_path(path: Optional[str], base_dir: Path) -> Optional[str]:
    """A config path made absolute: as given, or relative to base_dir ('~' expanded);
    '' and None (unset) stay as they are."""
    if not path:
        return path
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(str(path))))


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
        raise TrainingError(msg)


def line_range(value: Any, name: str) -> tuple:
    """(first, last) 1-based inclusive line numbers, last None (to the end) -> a checked tuple."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be (first, last) line numbers, got {value!r}")
    first, last = value
    ok = lambda x: isinstance(x, int) and not isinstance(x, bool)
    _check(ok(first) and first >= 1, f"{name}: first line must be an int >= 1, got {first!r}")
    _check(last is None or (ok(last) and last >= first),
           f"{name}: last line must be None or an int >= first ({first}), got {last!r}")
    return (first, last)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings:
    # PREFIX.{src_lang,tgt_lang}: line-aligned parallel text, read in order
    train_prefixes: tuple = dataclasses.field(metadata=PATH)
    # Optional, one per prefix: files replacing PREFIX.tgt_lang line by line (the trunk's own
    # translations from `python -m gptk_jax.distill`); (): the references
    train_target_files: tuple = dataclasses.field(default=(), metadata=PATH)
    # Optional, one per prefix: (first, last) 1-based line numbers of PREFIX.src_lang (and of
    # its target file) to read, inclusive; last None: to the end. (): every line. E.g.
    # ((1, 2700), (1, None)): newstest2013's lines 1-2700, all of News Commentary
    train_line_ranges: tuple = ()
    src_lang: str = "de"                    # source language suffix
    tgt_lang: str = "en"                    # target language suffix
    max_train_pairs: Optional[int] = None   # first N pairs over all prefixes; None: all
    max_len: int = 256                      # longest row in tokens (prompt + target)
    truncate: str = "drop"                  # longer rows: 'drop' | 'truncate_target' | 'error'
    bucket_lengths: tuple = ()              # row lengths to pad to (fewer pads); (): max_len
    shots: int = 0                          # few-shot pairs in every prompt
    # where few-shot pairs come from (PREFIX as above; read only when shots > 0)
    shots_prefix: str = dataclasses.field(metadata=PATH)
    space_with_target: bool = False         # prompt ends 'en:', target ' {tgt}' (byte-level BPE
                                            # models such as SmolLM2); False: 'en: ' + '{tgt}'
    eval_prefix: str = dataclasses.field(metadata=PATH)  # evaluation set; '': none
    eval_max_sentences: Optional[int] = 500  # first N evaluation pairs; None: all
    # (first, last) 1-based lines of eval_prefix to evaluate on, inclusive (last None: to the
    # end), before eval_max_sentences; (): from the first line. Keep it apart from the training
    # lines when eval_prefix is also a train prefix
    eval_line_range: tuple = ()
    # The trunk's own translations of eval_prefix's sources (`python -m gptk_jax.distill`,
    # line-aligned): when set, evaluation also scores the heads on these rows (same lines,
    # distilled targets): teacher-forced acceptance per offset, chain acceptance and the tau
    # estimate (training/draft_metrics.py), split 'eval_distilled'; '': reference text only
    eval_target_file: str = dataclasses.field(default="", metadata=PATH)
    # False: no split 'eval' against the reference text (with eval_target_file, validation runs
    # on the distilled rows only: one feature-cache build less, e.g. for `make demo`)
    eval_reference: bool = True

    def __post_init__(self):
        for name in ("train_prefixes", "train_target_files", "bucket_lengths"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _check(len(self.train_prefixes) > 0, "train_prefixes is empty")
        if self.train_line_ranges:
            ranges = tuple(self.train_line_ranges)
            _check(len(ranges) == len(self.train_prefixes),
                   f"train_line_ranges ({len(ranges)}) must be empty or one (first, last) per "
                   f"train prefix ({len(self.train_prefixes)})")
            object.__setattr__(self, "train_line_ranges", tuple(
                line_range(r, f"train_line_ranges[{i}]") for i, r in enumerate(ranges)))
        if self.eval_line_range:
            object.__setattr__(self, "eval_line_range",
                               line_range(self.eval_line_range, "eval_line_range"))
        _check(not self.eval_target_file or bool(self.eval_prefix),
               "eval_target_file needs eval_prefix (the sources it translates)")
        _check(self.eval_reference or bool(self.eval_target_file) or not self.eval_prefix,
               "eval_reference=False needs eval_target_file (the distilled rows to validate on; "
               "eval_prefix='' turns validation off)")
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
    targets: str = "gold"                   # 'gold' reference tokens | 'trunk_argmax' (the trunk's
                                            # own token at each position: self-distillation) |
                                            # 'trunk_soft' (soft cross-entropy against the trunk's
                                            # whole next-token distribution at t+o-1; its argmax
                                            # for top-1 and the LSTM's inputs)
    offset_weights: Optional[tuple] = None  # one loss weight per trained offset; None: all 1
    offset_weight_decay: Optional[float] = None  # weight decay**(o-1) for offset o (e.g. 0.8);
                                            # None: offset_weights; setting both is an error
    first_target_tokens_only: bool = False  # True: supervise only the last prompt token, so
                                            # offsets 1..k cover the first k target tokens (seed)
    positions_per_row: Optional[int] = None  # logits per row; None: from the data
    argmax_chunk: int = 64                  # positions per chunk for the trunk's argmax (memory)
    position_chunk: int = 64                # linear/PoMa: pack the supervised positions and project
                                            # this many at a time, skipping padding; 0: per row
    # The heads' softmax over the N most frequent target tokens of the training rows only
    # (EAGLE-3 / FR-Spec; training/vocab.py): targets outside them are left out of the loss and
    # counted (train/eval `oov_*`), and count as misses in top-1 / acceptance. The ids travel
    # with the exported heads (draft_vocab.json). None or 0: the whole vocabulary. Hard targets
    # only ('gold' / 'trunk_argmax').
    draft_vocab_size: Optional[int] = None

    def __post_init__(self):
        _check(self.targets in TARGETS, f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.offset_weights is not None:
            weights = tuple(float(w) for w in self.offset_weights)
            _check(all(w >= 0 for w in weights) and sum(weights) > 0,
                   f"offset_weights must be >= 0 with a positive sum, got {weights}")
            object.__setattr__(self, "offset_weights", weights)
        _check(self.offset_weight_decay is None or self.offset_weight_decay > 0,
               f"offset_weight_decay must be > 0 or None, got {self.offset_weight_decay}")
        _check(self.offset_weight_decay is None or self.offset_weights is None,
               "set loss.offset_weights or loss.offset_weight_decay, not both")
        _check(self.positions_per_row is None or self.positions_per_row >= 1,
               f"positions_per_row must be >= 1 or None, got {self.positions_per_row}")
        _check(self.argmax_chunk >= 1, f"argmax_chunk must be >= 1, got {self.argmax_chunk}")
        _check(self.position_chunk >= 0,
               f"position_chunk must be >= 0 (0: no packing), got {self.position_chunk}")
        _check(self.draft_vocab_size is None or self.draft_vocab_size >= 0,
               f"draft_vocab_size must be >= 1, or 0 / None (the whole vocabulary), got "
               f"{self.draft_vocab_size}")
        if self.draft_vocab_size == 0:
            object.__setattr__(self, "draft_vocab_size", None)
        _check(self.draft_vocab_size is None or self.targets != "trunk_soft",
               "draft_vocab_size (a softmax over the draft vocabulary) is for hard targets "
               "('gold', 'trunk_argmax'); set loss.draft_vocab_size=None with "
               "targets='trunk_soft'")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    name: str = "adamw"                     # 'adamw' (decoupled decay) | 'adam_l2' (seed: coupled)
    learning_rate: float = 1e-3             # peak learning rate
    schedule: str = "cosine"                # 'cosine' (to end fraction) | 'constant'
    warmup_steps: int = 100                 # linear warm-up from 0
    end_learning_rate_fraction: float = 0.0  # cosine ends at learning_rate * this
    weight_decay: float = 0.0               # decoupled (adamw) or L2 added to grads (adam_l2)
    b1: float = 0.9                         # Adam beta1
    b2: float = 0.999                       # Adam beta2
    eps: float = 1e-8                       # Adam epsilon
    grad_clip_norm: float = 1.0             # global-norm clipping; 0: off

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
    global_batch_size: int = 16             # rows per step over all devices and processes
    num_epochs: float = 1.0                 # passes over the training rows (unless
                                            # num_train_steps is set)
    num_train_steps: Optional[int] = None   # overrides num_epochs
    log_every_steps: int = 10               # console / metrics.jsonl / TensorBoard
    eval_every_steps: int = 500             # 0: evaluate at the end only
    eval_at_start: bool = True              # evaluate the untrained heads first (a baseline)
    checkpoint_every_steps: int = 500       # 0: only at the end and on SIGTERM
    max_checkpoints_to_keep: int = 3        # older checkpoints are deleted
    # Rerun of a workdir whose checkpoint was trained with other optimizer / step-count / loss
    # settings: False refuses it (naming the keys); True resumes with the new ones and records
    # the change (WORKDIR/run.json "resumes", heads.json). Model, head, data never change.
    allow_changed_resume: bool = False

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
    mode: str = "mesh"                      # 'mesh' (jit, NamedSharding) | 'pmap'
    model_axis_size: int = 1                # mesh: trunk sharded over a 'model' axis this size

    def __post_init__(self):
        _check(self.mode in PARALLEL_MODES,
               f"mode must be one of {PARALLEL_MODES}, got {self.mode!r}")
        _check(self.model_axis_size >= 1, "model_axis_size must be >= 1")
        _check(self.mode == "mesh" or self.model_axis_size == 1,
               "model_axis_size > 1 (trunk sharded over 'model') needs mode='mesh'")


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    cache: bool = False                     # compute the frozen trunk's features once, memory-map
    cache_dir: Optional[str] = dataclasses.field(  # None: WORKDIR/feature_cache
        default=None, metadata=PATH)
    dtype: str = "float32"                  # stored hidden states: 'float32' | 'bfloat16'
    build_batch_size: int = 16              # rows per trunk call while building

    def __post_init__(self):
        _check(self.dtype in FEATURE_DTYPES,
               f"dtype must be one of {FEATURE_DTYPES}, got {self.dtype!r}")
        _check(self.build_batch_size >= 1, "build_batch_size must be >= 1")


SECTIONS = {"data": DataSettings, "loss": LossSettings, "optimizer": OptimizerSettings,
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
    def from_config(cls, config: Any, base_dir: Optional[Path] = None) -> "RunSettings":
        """Validated settings; relative paths made absolute against base_dir (default: the
        working directory)."""
        values = _to_dict(config)
        known = list(_SCALARS) + ["head"] + list(SECTIONS)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigKeyError(f"unknown config key(s) {unknown}; known top-level keys: {known}")
        missing = sorted(set(known) - set(values))
        if missing:
            raise ConfigKeyError(f"config lacks key(s) {missing} (start from configs/base.py)")
        head = dict(_to_dict(values["head"]))
        if head.get("offsets") is not None:
            head["offsets"] = tuple(head["offsets"])
        try:
            head_config = HeadConfig.from_dict(head)
        except (HeadConfigError, TypeError) as e:
            raise ConfigKeyError(f"config 'head': {e}") from None
        if values["trunk_dtype"] not in ("float32", "bfloat16", "float16"):
            raise ConfigKeyError(f"trunk_dtype must be float32, bfloat16 or float16, "
                                 f"got {values['trunk_dtype']!r}")
        sections = {name: _section(kind, values[name], name) for name, kind in SECTIONS.items()}
        settings = cls(trunk_checkpoint=str(values["trunk_checkpoint"]),
                       trunk_dtype=values["trunk_dtype"], seed=int(values["seed"]),
                       head=head_config, **sections)
        weights = settings.loss.offset_weights
        if weights is not None and len(weights) != len(head_config.offsets):
            raise ConfigKeyError(f"loss.offset_weights has {len(weights)} entries, head.offsets "
                                 f"{head_config.offsets} has {len(head_config.offsets)}")
        return settings.with_absolute_paths(Path.cwd() if base_dir is None else base_dir)

    def with_absolute_paths(self, base_dir: Path) -> "RunSettings":
        """Every path (the section fields marked 'path', and trunk_checkpoint unless it is
        RANDOM_TINY) absolute, the relative ones taken against base_dir."""
        def absolute(value):
            if isinstance(value, tuple):
                return tuple(absolute_path(v, base_dir) for v in value)
            return absolute_path(value, base_dir)

        changes = {}
        for name in SECTIONS:
            section = getattr(self, name)
            changes[name] = dataclasses.replace(section, **{
                f.name: absolute(getattr(section, f.name))
                for f in dataclasses.fields(section) if f.metadata.get("path")})
        if self.trunk_checkpoint != RANDOM_TINY:
            changes["trunk_checkpoint"] = absolute_path(self.trunk_checkpoint, base_dir)
        return dataclasses.replace(self, **changes)

    @property
    def offset_weights(self) -> tuple:
        """One loss weight per trained offset: loss.offset_weights, or decay**(o-1) with
        loss.offset_weight_decay, else all 1 (step.py divides by their sum)."""
        if self.loss.offset_weight_decay is not None:
            return tuple(float(self.loss.offset_weight_decay) ** (o - 1)
                         for o in self.head.offsets)
        return self.loss.offset_weights or (1.0,) * len(self.head.offsets)

    @property
    def max_offset(self) -> int:
        return max(self.head.offsets)
