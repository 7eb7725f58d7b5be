"""Trained heads on disk (gptk_jax/heads/io.py): round trip, and heads for another trunk refused."""

import jax
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.heads.io import HeadsError, head_drafter, load_heads, save_heads
from gptk_jax.llama.model import init_params

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
HEAD = HeadConfig(kind="lstm", k=3, lstm_layers=1)


@pytest.fixture(scope="module")
def trunk_params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def head_params(trunk_params):
    return init_head_params(make_head(HEAD, CFG), trunk_params, jax.random.PRNGKey(1))


@pytest.fixture
def saved(tmp_path, head_params):
    return save_heads(tmp_path / "heads", HEAD, head_params, CFG, "tiny-trunk",
                      metadata={"steps": 3})


def test_round_trip(saved, head_params):
    loaded = load_heads(saved, CFG, "tiny-trunk")
    assert loaded.head_config == HEAD
    assert loaded.trunk == {"name": "tiny-trunk", "dim": 32, "vocab_size": 61, "n_layers": 2}
    assert loaded.metadata == {"steps": 3}
    for a, b in zip(jax.tree.leaves(head_params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(head_params) == jax.tree.structure(loaded.params)


@pytest.mark.parametrize("change, message", [
    (dict(dim=64, n_heads=4, n_kv_heads=2), "dim 32 \\(heads\\) != 64 \\(trunk\\)"),
    (dict(vocab_size=99), "vocab_size 61 \\(heads\\) != 99 \\(trunk\\)"),
    (dict(n_layers=3), "n_layers 2 \\(heads\\) != 3 \\(trunk\\)"),
])
def test_heads_for_another_trunk_are_refused(saved, change, message):
    with pytest.raises(HeadsError, match="trained for trunk 'tiny-trunk'.*" + message):
        load_heads(saved, CFG.replace(**change), "other-trunk")


def test_other_trunk_name_only_warns(saved):
    with pytest.warns(UserWarning, match="tiny-trunk"):
        load_heads(saved, CFG, "renamed-folder")


def test_params_that_do_not_fit_the_config_are_refused(tmp_path, head_params):
    with pytest.raises(HeadsError, match="do not match the HeadConfig"):
        save_heads(tmp_path / "bad", HEAD.replace(lstm_layers=2), head_params, CFG, "t")
    assert not (tmp_path / "bad").exists()


def test_not_a_heads_folder(tmp_path):
    with pytest.raises(HeadsError, match="not a heads folder"):
        load_heads(tmp_path, CFG)


def test_existing_folder_is_not_overwritten_silently(saved, head_params):
    with pytest.raises(HeadsError, match="already exists"):
        save_heads(saved, HEAD, head_params, CFG, "tiny-trunk")
    save_heads(saved, HEAD, head_params, CFG, "tiny-trunk", overwrite=True)


def test_k_beyond_the_heads_is_refused(head_params, trunk_params):
    with pytest.raises(HeadsError, match="K=4 .* offsets \\(2, 3\\)"):
        head_drafter(HEAD, head_params, CFG, trunk_params, num_tokens_per_step=4)
    drafter, _ = head_drafter(HEAD, head_params, CFG, trunk_params, num_tokens_per_step=2)
    assert drafter.max_drafts == 2
