"""Tiny config for tests and smoke runs: a random 2-layer width-32 trunk with a byte tokenizer
(created on the fly in WORKDIR/random-tiny-trunk), a few short real WMT pairs, a handful of steps.

    python -m gptk_jax.train --config configs/tiny.py --workdir /tmp/tiny
    python -m gptk_jax.train --config configs/tiny.py:lstm ...   # head family: lstm|poma|linear
"""

from configs import base


def get_config(kind: str = "linear"):
    config = base.get_config()
    config.trunk_checkpoint = "random-tiny"

    config.head.kind = kind or "linear"
    config.head.k = 3
    config.head.lstm_dropout = 0.0             # deterministic across device layouts

    config.data.train_prefixes = (f"{base.WMT}/train/europarl-v7.first20k",)
    config.data.max_train_pairs = 64
    config.data.max_len = 256                  # bytes: prompt (~40) + a sentence
    config.data.truncate = "truncate_target"
    config.data.eval_max_sentences = 16

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 0

    config.training.global_batch_size = 8
    config.training.num_train_steps = 6
    config.training.log_every_steps = 1
    config.training.eval_every_steps = 0
    config.training.eval_at_start = False
    config.training.checkpoint_every_steps = 2

    config.features.build_batch_size = 8
    return config
