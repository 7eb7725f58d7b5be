"""Linear heads on SmolLM2-135M-Instruct for CPU: the settings of
configs/linear_llama3_2_1b_wmt14.py on a trunk 10x smaller, with what every SmolLM2 config shares
(configs/smollm2.py: trunk, the trunk's own 2-shot translations as training data, validation
rows, feature cache, prompt format).
"""

from configs import linear_llama3_2_1b_wmt14 as family
from configs import smollm2


def get_config():
    config = smollm2.apply(family.get_config())
    config.head.k = 4                          # the trunk's token + 3 drafts (offsets 2..4)
    config.data.max_train_pairs = None         # every training row (~6,500)
    config.training.num_epochs = 2.0
    return config
