"""Base config of MTP head training; every experiment config overrides fields of this one.

The sections data / loss / optimizer / training / parallel / features start from the defaults of
the settings dataclasses in gptk_jax/training/settings.py, their one source (each field is
documented there); this file sets what those cannot know: the trunk, the head and the data paths.
Relative paths are relative to the working directory (run from the repository root); the data
folder is decided here, once, by gptk_jax.data.root ($GPTK_DATA, else ../shared/data). Run with
    python -m gptk_jax.train --config configs/<name>.py --workdir DIR [--config.a.b=value]
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from gptk_jax.data.root import resolve_data_root
from gptk_jax.training.settings import SECTIONS

WMT = f"{resolve_data_root()}/wmt14-de-en"   # absolute, from the working directory at import


def section(cls) -> ml_collections.ConfigDict:
    """The fields of settings dataclass `cls` that have a default, at that default. A None
    default becomes a placeholder of the field's type, so `--config.<section>.<field>=…` can
    set it."""
    hints = typing.get_type_hints(cls)
    out = ml_collections.ConfigDict()
    for field in dataclasses.fields(cls):
        if field.default is dataclasses.MISSING:
            continue                                    # a path: set below
        if field.default is None:
            kind = next(t for t in typing.get_args(hints[field.name]) if t is not type(None))
            out[field.name] = config_dict.placeholder(kind)
        else:
            out[field.name] = field.default
    return out


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # 'random-tiny': a tiny random trunk with a byte tokenizer written into
    # WORKDIR/random-tiny-trunk (tests, smoke runs).
    config.trunk_checkpoint = ".cache/models/smollm2-135m"  # converted folder (python -m convert)
    config.trunk_dtype = "float32"          # compute dtype of the frozen trunk
    config.seed = 0                         # head init, dropout and data shuffle

    # The MTP head: the fields of gptk_jax.heads.HeadConfig (see docs/design.md).
    head = config.head = ml_collections.ConfigDict()
    head.kind = "linear"                    # 'lstm' | 'poma' | 'linear'
    head.k = 3                              # tokens per decoding step (trunk + k-1 drafts)
    head.offsets = config_dict.placeholder(tuple)  # trained offsets; None: (2, ..., k)
    head.dtype = "float32"                  # head compute dtype
    head.param_dtype = "float32"            # head parameter dtype
    head.recipe = "default"                 # 'default' (ours) | 'seed' (the original research
                                            # code's LSTM / PoMa: gptk_jax/heads/config.py)
    head.lstm_layers = 2                    # LSTM: stacked layers (hidden width = trunk width)
    head.lstm_dropout = 0.1                 # LSTM: dropout between layers (training only)
    head.lstm_train_on_drafts = False       # LSTM recipe conditioned: train on its own drafts
    head.lstm_condition_inputs = False      # LSTM recipe conditioned: norm(h_t) in every step input
    head.poma_max_positions = 2048          # PoMa: rows of each position matrix

    for name, cls in SECTIONS.items():
        config[name] = section(cls)
    data = config.data
    data.train_prefixes = (f"{WMT}/train/europarl-v7.first20k",  # PREFIX.{src,tgt}_lang files,
                           f"{WMT}/train/news-commentary.first10k")  # line-aligned, in order
    data.shots_prefix = f"{WMT}/train/news-commentary.first10k"  # where few-shot pairs come from
    data.eval_prefix = f"{WMT}/newstest2013"  # evaluation set ('' : no evaluation)
    return config
