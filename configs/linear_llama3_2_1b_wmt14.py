"""Linear (blockwise-parallel) heads on Llama 3.2 1B, WMT14 de->en: this project's defaults
rather than the seed's: offsets 2..3 (the trunk's own token is exact), every target position
supervised against the trunk's own argmax (self-distillation: what verification accepts),
AdamW with warm-up + cosine and clipping.

Trunk: as configs/lstm_llama3_2_1b_wmt14.py (`--rope-scaling-factor 0`); the same heads fit a
scaled conversion only approximately.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.trunk_checkpoint = "models/llama3.2-1b-norope"

    config.head.kind = "linear"
    config.head.k = 3

    config.data.max_train_pairs = 30000        # all of Europarl first20k + News Commentary

    config.loss.targets = "trunk_argmax"

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 100

    config.training.global_batch_size = 32
    config.training.num_epochs = 2.0
    config.training.eval_every_steps = 250
    config.training.checkpoint_every_steps = 250
    return config
