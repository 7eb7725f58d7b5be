"""Linear heads on SmolLM2-135M-Instruct for CPU: the settings of
configs/linear_llama3_2_1b_wmt14.py on a trunk 10x smaller, with what every SmolLM2 config shares
(configs/smollm2.py: trunk, training text, feature cache, prompt boundary).
"""

from configs import linear_llama3_2_1b_wmt14 as family
from configs import smollm2


def get_config():
    config = smollm2.apply(family.get_config())
    config.data.max_train_pairs = 4000
    config.training.num_epochs = 2.0
    return config
