"""What the three SmolLM2-135M configs share (they differ only in the head family and its pairs
and epochs): the trunk converted into .cache/models/smollm2-135m by `make demo` or `python -m
convert --format gguf ...`, the training text Europarl first20k + News Commentary, the trunk-
feature cache on (the trunk runs once, not every epoch), prompts ending at 'en:' (SmolLM2's
byte-level BPE attaches a space to the next word: ' {tgt}' goes with the target), fewer pairs
and evaluation sentences so a run takes minutes to an hour on a few CPU cores.
"""

from configs import base


def apply(config):
    config.trunk_checkpoint = ".cache/models/smollm2-135m"
    config.data.train_prefixes = (f"{base.WMT}/train/europarl-v7.first20k",
                                  f"{base.WMT}/train/news-commentary.first10k")
    config.data.eval_max_sentences = 200
    config.data.space_with_target = True
    config.features.cache = True
    config.training.global_batch_size = 16
    config.training.eval_every_steps = 100
    config.training.checkpoint_every_steps = 100
    return config
