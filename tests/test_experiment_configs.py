"""The experiment configs (configs/results_smollm2.py, one per family after the colon) load
and validate as the trainer reads them, train what docs/results.md says, and share one cache."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from gptk_jax.cli import configs_module
from gptk_jax.heads import make_head
from gptk_jax.training.inputs import tiny_trunk_config
from gptk_jax.training.optim import make_optimizer
from gptk_jax.training.settings import RunSettings

ROOT = Path(__file__).resolve().parent.parent

configs_module()


def results_config(family):
    return importlib.import_module("configs.results_smollm2").get_config(family)


@pytest.mark.parametrize("family, kind, recipe", [("linear", "linear", "default"),
                                                  ("lstm", "lstm", "conditioned"),
                                                  ("poma", "poma", "default"),
                                                  ("eagle", "eagle", "default")])
def test_results_configs_validate(family, kind, recipe):
    settings = RunSettings.from_config(results_config(family))
    assert (settings.head.kind, settings.head.recipe) == (kind, recipe)
    assert settings.head.k == 4 and tuple(settings.head.offsets) == (2, 3, 4)
    make_head(settings.head, tiny_trunk_config())
    make_optimizer(settings.optimizer, 100)
    # the trunk's own translations, the validation rows held out of training
    assert all("distilled" in f for f in settings.data.train_target_files)
    assert tuple(settings.data.eval_line_range) == (2701, 3000)
    assert settings.data.shots == 2 and settings.data.space_with_target


def test_families_share_one_feature_cache():
    dirs = {results_config(f).features.cache_dir for f in ("linear", "lstm", "poma", "eagle")}
    assert dirs == {"runs/results/feature_cache"}


def test_unknown_family_is_one_line_from_the_trainer(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gptk_jax.train", "--config",
                           str(ROOT / "configs" / "results_smollm2.py") + ":gru",
                           "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown family" in lines[0] and "gru" in lines[0], proc.stderr


def test_demo_config_validates_and_trains_on_distilled_rows():
    """`make demo`'s heads (configs/demo_smollm2.py, what gptk_jax.demo trains): the results
    protocol's linear heads on the trunk's own translations of newstest2013 lines 1-800, the
    validation rows (2701-3000) held out, its cache under the workdir."""
    from gptk_jax import demo

    config = demo.train_config(ROOT / ".cache" / "models" / "smollm2-135m")
    settings = RunSettings.from_config(config)
    assert settings.head.kind == "linear" and settings.head.k == 4
    assert tuple(map(tuple, settings.data.train_line_ranges)) == ((1, 800),)
    assert len(settings.data.train_target_files) == 1
    assert "distilled/newstest2013.2shot" in settings.data.train_target_files[0]
    assert tuple(settings.data.eval_line_range) == (2701, 3000)
    assert settings.loss.targets == "trunk_argmax" and settings.loss.draft_vocab_size == 2048
    assert config.features.cache_dir is None         # WORKDIR/feature_cache
    make_head(settings.head, tiny_trunk_config())
    # --train-steps / --tokens-per-step reach the config
    small = RunSettings.from_config(demo.train_config(ROOT / "m", steps=7, k=3))
    assert small.training.num_train_steps == 7
    assert small.head.k == 3 and tuple(small.head.offsets) == (2, 3)


def test_base_config_lists_every_field_at_its_default():
    """configs/base.py writes every settings field out (a reader sees them all); its values are
    the settings dataclasses' defaults, and no field is missing or unknown."""
    import dataclasses

    from gptk_jax.training.settings import SECTIONS

    config = importlib.import_module("configs.base").get_config()
    for name, cls in SECTIONS.items():
        section = config[name]
        with_default = {f.name: f.default for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING}
        paths = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        assert set(section.keys()) == set(with_default) | (paths & set(section.keys())), name
        for key, default in with_default.items():
            assert section[key] == default, f"configs/base.py {name}.{key}: {section[key]!r} " \
                                            f"!= settings default {default!r}"
    RunSettings.from_config(config)
