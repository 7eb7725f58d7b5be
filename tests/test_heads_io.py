"""Trained heads on disk (gptk_jax/heads/io.py): round trip, and heads for another trunk refused."""

import json
import re

import jax
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.heads import HeadConfig, init_head_params, make_head, seed_config
from gptk_jax.decoding.heads import head_drafter
from gptk_jax.heads.io import HeadsError, load_heads, save_heads
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
    with pytest.raises(HeadsError, match="W=4 .* offsets \\(2, 3\\)"):
        head_drafter(HEAD, head_params, CFG, trunk_params, tokens_per_step=4)
    drafter, _ = head_drafter(HEAD, head_params, CFG, trunk_params, tokens_per_step=2)
    assert drafter.max_drafts == 2


# heads.json's head_config before `recipe`: the six options it replaced, at their old defaults
PRE_RECIPE = dict(lstm_vocab_projection="trunk", lstm_step_inputs="teacher",
                  lstm_first_input="next_token", poma_position_init="zeros",
                  poma_position_init_std=0.02, poma_norm_init="trunk")


def _as_pre_recipe(folder, **options):
    """Rewrites folder/heads.json as it was written before `recipe` existed."""
    meta_file = folder / "heads.json"
    meta = json.loads(meta_file.read_text())
    del meta["head_config"]["recipe"]
    meta["head_config"].update(PRE_RECIPE, **options)
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta_file


def test_pre_recipe_heads_load(tmp_path, saved, trunk_params):
    _as_pre_recipe(saved)
    assert load_heads(saved, CFG, "tiny-trunk").head_config == HEAD
    seed_head = seed_config("lstm", lstm_layers=1)
    seed_params = init_head_params(make_head(seed_head, CFG), trunk_params, jax.random.PRNGKey(2))
    seed_dir = save_heads(tmp_path / "seed", seed_head, seed_params, CFG, "tiny-trunk")
    _as_pre_recipe(seed_dir, lstm_vocab_projection="own", lstm_step_inputs="argmax",
                   lstm_first_input="own_argmax")
    loaded = load_heads(seed_dir, CFG, "tiny-trunk")
    assert loaded.head_config == seed_head and loaded.head_config.recipe == "seed"
    assert loaded.params["vocab_proj"]["kernel"].shape == (CFG.dim, CFG.vocab_size)


def test_pre_recipe_heads_that_mix_recipes_are_refused(saved):
    meta_file = _as_pre_recipe(saved, lstm_step_inputs="argmax")
    with pytest.raises(HeadsError, match=re.escape(str(meta_file)) + ": .*for recipe 'default' set "
                       r"lstm_step_inputs='teacher'; or for recipe 'seed' set "
                       r"lstm_first_input='own_argmax', lstm_vocab_projection='own'"):
        load_heads(saved, CFG, "tiny-trunk")


def test_heads_saved_with_a_draft_vocab_still_load(saved):
    """heads.json from before the draft vocabulary moved to decoding: `draft_vocab` is dropped
    (a list: with a warning that says where it went), the heads load as they were saved."""
    meta_file = saved / "heads.json"
    meta = json.loads(meta_file.read_text())
    meta["head_config"]["draft_vocab"] = None       # what to_dict wrote by default
    meta_file.write_text(json.dumps(meta))
    assert load_heads(saved, CFG, "tiny-trunk").head_config == HEAD
    meta["head_config"]["draft_vocab"] = [3, 5, 7]
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"draft_vocab \(3 ids\) is ignored.*head_drafter"):
        assert load_heads(saved, CFG, "tiny-trunk").head_config == HEAD
