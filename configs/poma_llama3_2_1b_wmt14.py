"""PoMa heads on Llama 3.2 1B, WMT14 de->en: the original research code's settings (faithful).

Trunk: as configs/lstm_llama3_2_1b_wmt14.py (converted with `--rope-scaling-factor 0`, RoPE
scaling off as in the seed).

Seed: position matrices per offset (normal init) + fresh RMSNorms (ones), K=3 (offsets 1..3),
Adam lr 3e-4 with coupled L2 1e-2, batch 8, one pass over the first 20,000 training pairs with
5-shot prompts, only the first 3 target tokens supervised.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.trunk_checkpoint = "models/llama3.2-1b-norope"

    config.head.kind = "poma"
    config.head.k = 3
    config.head.offsets = (1, 2, 3)
    config.head.recipe = "seed"                # normal(0.02) position matrices, fresh norms

    config.data.train_prefixes = (f"{base.WMT}/train/europarl-v7.first20k",)
    config.data.max_train_pairs = 20000
    config.data.shots = 5
    config.data.max_len = 768                  # five shots + query + target

    config.loss.first_target_tokens_only = True

    config.optimizer.name = "adam_l2"
    config.optimizer.learning_rate = 3e-4
    config.optimizer.weight_decay = 1e-2
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = 0.0

    config.training.global_batch_size = 8
    config.training.num_epochs = 1.0
    config.training.eval_every_steps = 500
    config.training.checkpoint_every_steps = 500
    return config
