"""LSTM heads on SmolLM2-135M-Instruct (GGUF, converted into .cache/models/smollm2-135m by
`make demo` or `python -m convert --format gguf ...`) for CPU: the settings of
configs/lstm_llama3_2_1b_wmt14.py on a trunk 10x smaller, with the training text Europarl
first20k + News Commentary, the trunk-feature cache on (the trunk runs once, not every epoch) and
fewer pairs so a run takes minutes to an hour on a few CPU cores.
"""

from configs import lstm_llama3_2_1b_wmt14 as family
from configs import base


def get_config():
    config = family.get_config()
    config.trunk_checkpoint = ".cache/models/smollm2-135m"
    config.data.train_prefixes = (f"{base.WMT}/train/europarl-v7.first20k",
                                  f"{base.WMT}/train/news-commentary.first10k")
    config.data.eval_max_sentences = 200
    config.features.cache = True
    config.data.space_with_target = True       # SmolLM2's byte-level BPE: ' {tgt}' after 'en:'
    config.data.max_train_pairs = 2000         # seed: 8,000
    config.training.num_epochs = 3.0           # seed: 10
    config.training.global_batch_size = 16
    config.training.eval_every_steps = 100
    config.training.checkpoint_every_steps = 100
    return config
