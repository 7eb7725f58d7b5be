"""Shared by the training tests: set dotted fields of an ml_collections config; a tiny random
trunk; a two-row batch whose supervised (row, position, offset) triples are listed by hand."""

import jax
import numpy as np
import pytest

from gptk_jax.data.prompts import shift_targets
from gptk_jax.llama.model import init_params
from gptk_jax.training.inputs import tiny_trunk_config


def with_fields(config, fields: dict):
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def tiny_trunk():
    config = tiny_trunk_config()
    return config, jax.jit(lambda k: init_params(config, k, stacked=False))(jax.random.PRNGKey(1))


def hand_batch():
    """Two rows, T=8. Row 0: prompt 0..2, target 3..5; row 1: prompt 0..1, target 2..3."""
    tokens = np.array([[10, 11, 12, 20, 21, 22, 0, 0],
                       [13, 14, 23, 24, 0, 0, 0, 0]], np.int32)
    loss_mask = np.zeros((2, 8), bool)
    loss_mask[0, 3:6] = True
    loss_mask[1, 2:4] = True
    token_mask = np.zeros((2, 8), bool)
    token_mask[0, :6] = True
    token_mask[1, :4] = True
    targets, target_mask = shift_targets(tokens, loss_mask, 3)
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)),
            "token_mask": token_mask, "loss_mask": loss_mask, "targets": targets,
            "target_mask": target_mask}


# (row, position, offset) with a target (tokens[t+o]), listed by hand for hand_batch
HAND_ALL = [(0, 2, 1), (0, 3, 1), (0, 4, 1), (1, 1, 1), (1, 2, 1),
            (0, 1, 2), (0, 2, 2), (0, 3, 2), (1, 0, 2), (1, 1, 2),
            (0, 0, 3), (0, 1, 3), (0, 2, 3), (1, 0, 3)]
