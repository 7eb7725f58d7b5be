"""LSTM heads on Llama 3.2 1B, WMT14 de->en: the original research code's settings (faithful).

Trunk: Meta's Llama 3.2 1B converted with RoPE scaling OFF, as the seed ran it:
    python -m convert --format meta --input ~/llama/Llama3.2-1B \
        --output models/llama3.2-1b-norope --rope-scaling-factor 0
(factor 0 turns Llama 3 RoPE frequency scaling off; the sequences here are far shorter than the
8192 positions where scaling matters, but logits differ slightly from the scaled model.)

Seed: 2-layer LSTM, hidden 2048 (= trunk width), dropout 0.1, its own Linear(2048 -> 128256, bias)
vocabulary projection, K=3 (offsets 1..3), argmax step inputs, Adam lr 1e-3 with coupled L2 0.05,
batch 32, 10 epochs over the first 8,000 training pairs, only the first 3 target tokens
supervised (`first_target_tokens_only`: the last prompt token predicts target tokens 1..3).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.trunk_checkpoint = "models/llama3.2-1b-norope"

    config.head.kind = "lstm"
    config.head.k = 3
    config.head.offsets = (1, 2, 3)            # seed trains the trunk's own offset too
    config.head.lstm_layers = 2
    config.head.lstm_dropout = 0.1
    config.head.recipe = "seed"                # own Linear(2048 -> 128256, bias); each step
                                               # reads the previous step's argmax, step 2 the
                                               # head's own offset-1 argmax

    config.data.train_prefixes = (f"{base.WMT}/train/europarl-v7.first20k",)  # WMT14 train order
    config.data.max_train_pairs = 8000
    config.data.shots = 0

    config.loss.first_target_tokens_only = True

    config.optimizer.name = "adam_l2"          # torch Adam(weight_decay=0.05): coupled L2
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.05
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = 0.0      # the seed did not clip

    config.training.global_batch_size = 32
    config.training.num_epochs = 10.0
    config.training.eval_every_steps = 250
    config.training.checkpoint_every_steps = 250
    return config
