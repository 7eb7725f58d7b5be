"""The LSTM drafter conditioned on the trunk (recipe 'conditioned', gptk_jax/heads/
lstm_conditioned.py) on SmolLM2-135M-Instruct, trained with soft targets (the trunk's whole
next-token distribution) and offset weights 0.8^(o-1): the design a prototype on the same trunk
took to tau 1.50 at K=4. What every SmolLM2 config shares: configs/smollm2.py.
"""

from configs import base
from configs import smollm2


def get_config():
    config = smollm2.apply(base.get_config())
    config.head.kind = "lstm"
    config.head.recipe = "conditioned"         # h0 = tanh(A norm(h_t)), residual on norm(h_t)
    config.head.k = 4                          # the trunk's token + 3 drafts (offsets 2..4)
    config.head.lstm_layers = 1                # one LSTMCell of width D
    config.head.lstm_dropout = 0.0             # one layer: nothing between layers
    config.head.lstm_train_on_drafts = False   # True: steps > 1 read the head's own argmax
    config.head.lstm_condition_inputs = False  # True: every step reads [embedding, norm(h_t)]

    config.loss.targets = "trunk_soft"         # soft cross-entropy against the trunk
    config.loss.offset_weight_decay = 0.8      # offset o weighs 0.8^(o-1)

    # the feature cache holds what the head reads ('hidden', before the final norm) over the
    # supervised spans only: the head is per position (configs/smollm2.py turns the cache on)

    config.data.max_train_pairs = None         # every training row (~6,500)
    config.training.num_epochs = 2.0
    config.optimizer.learning_rate = 1e-3
    return config
