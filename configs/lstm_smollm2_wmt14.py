"""LSTM heads on SmolLM2-135M-Instruct for CPU: the settings of
configs/lstm_llama3_2_1b_wmt14.py on a trunk 10x smaller, with what every SmolLM2 config shares
(configs/smollm2.py: trunk, training text, feature cache, prompt boundary).
"""

from configs import lstm_llama3_2_1b_wmt14 as family
from configs import smollm2


def get_config():
    config = smollm2.apply(family.get_config())
    config.data.max_train_pairs = 2000         # seed: 8,000
    config.training.num_epochs = 3.0           # seed: 10
    return config
