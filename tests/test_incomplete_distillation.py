"""Training on an incomplete distillation says so ("14 of 40 lines") and records it in the
workdir's run.json (issue 27, smaller case "training on a distillation of 16 of 40 lines says
nothing")."""

import importlib
import json
import os

import pytest

from _train_helpers import with_fields
from conftest import ROOT, WMT
from gptk_jax.distill import main as distill_main

SOURCES = 40
WRITTEN = 14


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A distillation of 40 sources stopped after 14 lines; -> (prefix, target file)."""
    from gptk_jax.training.inputs import ensure_tiny_trunk
    root = tmp_path_factory.mktemp("incomplete")
    trunk = ensure_tiny_trunk(root / "trunk")
    for lang in ("de", "en"):
        lines = (WMT / "train" / f"europarl-v7.first20k.{lang}").read_text().splitlines(True)
        (root / f"src.{lang}").write_text("".join(lines[:SOURCES]))
    out = root / "d.en"
    assert distill_main(["--checkpoint", str(trunk), "--input", str(root / "src"),
                         "--output", str(out), "--max-new-tokens", "3", "--no-progress",
                         "--stop-after", str(WRITTEN), "--chunk", "7"]) == 0
    return root / "src", out


def test_target_check_warns_with_the_line_counts(distilled):
    from gptk_jax.distillation.record import distillation_status, target_lines_check
    prefix, out = distilled
    logged = []
    target_lines_check(out, f"{prefix}.de", WRITTEN, SOURCES, log=logged.append)
    assert len(logged) == 1
    assert f"{out} is an incomplete distillation: {WRITTEN} of {SOURCES} lines" in logged[0]
    assert distillation_status(out) == {"file": str(out.resolve()), "lines_written": WRITTEN,
                                        "sources": SOURCES, "complete": False}


def test_training_warns_and_records_it(distilled, tmp_path, capsys):
    from gptk_jax.training import train_and_evaluate
    prefix, out = distilled
    config = with_fields(importlib.import_module("configs.tiny").get_config(), {
        "data.train_prefixes": (str(prefix),), "data.train_target_files": (str(out),),
        "data.eval_max_sentences": 4, "training.num_train_steps": 1,
        "training.global_batch_size": 4, "training.checkpoint_every_steps": 1})
    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        result = train_and_evaluate(config, tmp_path / "run", progress=False)
    finally:
        os.chdir(previous)
    assert result["status"] == "completed"
    printed = capsys.readouterr().out
    assert f"{out} is an incomplete distillation: {WRITTEN} of {SOURCES} lines" in printed
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["distilled_targets"] == [{"file": str(out.resolve()),
                                            "lines_written": WRITTEN, "sources": SOURCES,
                                            "complete": False}]
    heads = json.loads((tmp_path / "run" / "heads" / "heads.json").read_text())
    assert heads["metadata"]["distilled_targets"] == record["distilled_targets"]
