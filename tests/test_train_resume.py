"""Resuming a workdir (issue 15 item 5): WORKDIR/run.json refuses a rerun that changes the run
(trunk, head, data), lets an optimizer / step-count change through only with
training.allow_changed_resume and records it (run.json, heads.json), and metrics.jsonl keeps one
row per step and split after a kill and resume. Item 4 for `python -m gptk_jax.train`: bad
flags, configs and refused resumes are one line on stderr with exit status 2."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _train_helpers import with_fields
from conftest import ROOT, WMT

from gptk_jax.training import TrainingError, train_and_evaluate
from gptk_jax.training.run_record import ResumeRefused

STEPS = 6
LR = 3e-3            # configs/tiny.py


def tiny(fields: dict):
    return with_fields(importlib.import_module("configs.tiny").get_config(), fields)


def rows(workdir: Path, split: str) -> list[dict]:
    """The raw rows of metrics.jsonl of one split, in file order (no de-duplication)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def snapshot(workdir: Path) -> dict:
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(workdir.rglob("*"))}


def heads_meta(workdir: Path) -> dict:
    return json.loads((workdir / "heads" / "heads.json").read_text())["metadata"]


def record(workdir: Path) -> dict:
    return json.loads((workdir / "run.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def _in_the_repository_root():
    previous = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(previous)


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    """A finished tiny run (6 steps, checkpoints 2, 4, 6) on a copy of its training text, which
    a test may edit; -> (workdir, the config fields)."""
    base = tmp_path_factory.mktemp("completed")
    for lang in ("de", "en"):
        lines = (WMT / "train" / f"europarl-v7.first20k.{lang}").read_text().splitlines(True)
        (base / f"europarl.{lang}").write_text("".join(lines[:80]))
    fields = {"data.train_prefixes": (str(base / "europarl"),), "data.eval_max_sentences": 4,
              "training.num_train_steps": STEPS, "training.checkpoint_every_steps": 2}
    result = train_and_evaluate(tiny(fields), base / "run", progress=False)
    assert result["status"] == "completed" and result["step"] == STEPS
    assert sorted(os.listdir(base / "run" / "checkpoints")) == ["2", "4", "6"]
    return base / "run", fields


@pytest.fixture
def workdir(completed, tmp_path):
    """A copy of the finished run's workdir."""
    shutil.copytree(completed[0], tmp_path / "run")
    return tmp_path / "run"


def rerun(workdir: Path, fields: dict, changes: dict) -> dict:
    return train_and_evaluate(tiny({**fields, **changes}), workdir, progress=False)


# --------------------------------------------------------------------------------------------
# Refused: another run
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,named", [
    ({"head.kind": "lstm"}, r'head\.kind "linear" -> "lstm"'),
    ({"data.train_prefixes": (str(WMT / "train" / "news-commentary.first10k"),)},
     r"data\.train_prefixes \[.*europarl\"\] -> \[.*news-commentary\.first10k\"\]"),
    ({"trunk_checkpoint": "/elsewhere/other-trunk"},
     r'trunk_checkpoint "random-tiny" -> "/elsewhere/other-trunk"'),
    ({"data.max_len": 128, "data.space_with_target": True},   # a filter, the prompt format
     r"data\.max_len 256 -> 128; data\.space_with_target false -> true"),
    ({"seed": 1, "training.allow_changed_resume": True}, r"seed 0 -> 1"),   # flag or not
])
def test_another_model_head_or_data_is_refused_naming_the_keys(completed, workdir, changes,
                                                               named):
    before = snapshot(workdir)
    with pytest.raises(ResumeRefused, match=rf"at step {STEPS}: .*{named}\. .*new --workdir"):
        rerun(workdir, completed[1], changes)
    assert snapshot(workdir) == before


def test_same_paths_with_another_trunk_or_other_rows_are_refused(completed, workdir):
    conversion = workdir / "random-tiny-trunk" / "conversion.json"
    original = conversion.read_text()
    before = snapshot(workdir)
    conversion.write_text(original.replace("{", '{"reconverted": true, ', 1))
    with pytest.raises(ResumeRefused, match=r"inputs\.trunk\.conversion_sha256 \"[0-9a-f]{64}\""):
        rerun(workdir, completed[1], {})
    conversion.write_text(original)
    assert snapshot(workdir).keys() == before.keys()
    text = Path(completed[1]["data.train_prefixes"][0] + ".en")
    lines = text.read_text()
    try:
        text.write_text(lines.replace("the", "a", 1))
        with pytest.raises(ResumeRefused, match=r"inputs\.train_rows\.sha256"):
            rerun(workdir, completed[1], {})
    finally:
        text.write_text(lines)
    assert snapshot(workdir).keys() == before.keys()
    assert record(workdir) == record(completed[0])


# --------------------------------------------------------------------------------------------
# Changed recipe: only with the flag, and recorded
# --------------------------------------------------------------------------------------------

def test_changed_learning_rate_needs_the_flag_and_is_recorded(completed, workdir):
    shutil.rmtree(workdir / "checkpoints" / "6")          # resume from step 4: two steps run
    before = snapshot(workdir)
    with pytest.raises(ResumeRefused, match=r"at step 4 with changed settings: optimizer\."
                       r"learning_rate 0\.003 -> 1\.0\. Pass --config\.training\."
                       r"allow_changed_resume=True"):
        rerun(workdir, completed[1], {"optimizer.learning_rate": 1.0})
    assert snapshot(workdir) == before
    result = rerun(workdir, completed[1], {"optimizer.learning_rate": 1.0,
                                           "training.allow_changed_resume": True})
    assert (result["status"], result["step"], result["steps_run"]) == ("completed", 6, 2)
    resumes = [{"step": 4, "changed": {"optimizer.learning_rate": {"old": LR, "new": 1.0}}}]
    assert record(workdir)["resumes"] == resumes
    assert record(workdir)["settings"]["optimizer"]["learning_rate"] == LR    # steps 1..4
    meta = heads_meta(workdir)
    assert (meta["step"], meta["steps_run"], meta["resumes"]) == (6, 2, resumes)
    assert meta["config"]["optimizer"]["learning_rate"] == 1.0                # steps 5..6
    # steps 5 and 6 replaced their rows: step 6 is the first loss after an lr-1.0 update
    old, new = rows(completed[0], "train"), rows(workdir, "train")
    assert [r["step"] for r in new] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in new[:5]] == [r["loss"] for r in old[:5]]
    assert new[5]["loss"] != old[5]["loss"]
    assert [r["step"] for r in rows(workdir, "eval")] == [6]


def test_lowered_step_count_needs_the_flag_and_runs_no_step(completed, workdir):
    before = snapshot(workdir)
    with pytest.raises(ResumeRefused, match=r"training\.num_train_steps 6 -> 4\."):
        rerun(workdir, completed[1], {"training.num_train_steps": 4})
    assert snapshot(workdir) == before
    result = rerun(workdir, completed[1], {"training.num_train_steps": 4,
                                           "training.allow_changed_resume": True})
    assert (result["status"], result["step"], result["steps_run"]) == ("completed", 6, 0)
    meta = heads_meta(workdir)
    assert (meta["step"], meta["steps_run"], meta["num_steps"]) == (6, 0, 4)
    assert meta["resumes"] == record(workdir)["resumes"] == [
        {"step": 6, "changed": {"training.num_train_steps": {"old": 6, "new": 4}}}]
    assert rows(workdir, "train") == rows(completed[0], "train")
    assert [r["step"] for r in rows(workdir, "eval")] == [6]       # evaluated again: replaced


# --------------------------------------------------------------------------------------------
# metrics.jsonl after a kill
# --------------------------------------------------------------------------------------------

def test_kill_and_resume_keeps_one_row_per_step(completed, workdir):
    """Killed after step 6 was logged but before its checkpoint completed, mid-way through
    writing a row: the rerun replays steps 5 and 6, replacing their rows."""
    shutil.rmtree(workdir / "checkpoints" / "6")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tra')
    result = rerun(workdir, completed[1], {"training.max_checkpoints_to_keep": 5})
    assert (result["status"], result["step"], result["steps_run"]) == ("completed", 6, 2)
    old, new = rows(completed[0], "train"), rows(workdir, "train")
    assert [r["step"] for r in new] == list(range(1, STEPS + 1))
    for got, want in zip(new, old):
        assert (got["tokens"], got["loss"]) == (want["tokens"], want["loss"]), got["step"]
    assert [r["step"] for r in rows(workdir, "eval")] == [6]
    assert [r["step"] for r in rows(workdir, "setup")] == [0, 4]
    # a bookkeeping change needs no flag, and is recorded
    assert record(workdir)["resumes"] == [
        {"step": 4, "changed": {"training.max_checkpoints_to_keep": {"old": 3, "new": 5}}}]


# --------------------------------------------------------------------------------------------
# No checkpoint: nothing to resume
# --------------------------------------------------------------------------------------------

def test_a_start_that_fails_writes_no_record_and_without_checkpoints_one_starts_afresh(
        completed, workdir, tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(TrainingError, match=r"cannot read /nonexistent"):
        rerun(fresh, completed[1], {"data.train_prefixes": ("/nonexistent",)})
    assert not (fresh / "run.json").exists()
    shutil.rmtree(workdir / "checkpoints")
    result = rerun(workdir, completed[1], {"seed": 1, "data.eval_prefix": ""})
    assert (result["status"], result["step"], result["steps_run"]) == ("completed", 6, 6)
    assert record(workdir)["settings"]["seed"] == 1
    assert record(workdir)["resumes"] == []
    assert [(r["step"], r["split"]) for r in map(json.loads, (
        workdir / "metrics.jsonl").read_text().splitlines())] == \
        [(0, "setup")] + [(step, "train") for step in range(1, STEPS + 1)]


# --------------------------------------------------------------------------------------------
# The CLI: one line, exit status 2
# --------------------------------------------------------------------------------------------

def cli_stderr(config, args: list) -> list[str]:
    """`python -m gptk_jax.train --config CONFIG ARGS`'s stderr lines; it must exit with 2."""
    proc = subprocess.run([sys.executable, "-m", "gptk_jax.train", "--config", str(config),
                           *args], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, (args, proc.stderr[-3000:])
    return proc.stderr.strip().splitlines()


@pytest.mark.parametrize("case", ["refused", "mistyped key", "bad value", "no workdir",
                                  "positional", "missing config", "config raises"])
def test_cli_errors_are_one_line_and_exit_status_2(completed, workdir, tmp_path, case):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return 1 / 0\n")
    other = ["--workdir", str(tmp_path / "w")]
    config, args, message = {
        "refused": ("configs/tiny.py", [
            "--workdir", str(workdir), "--config.head.kind=lstm",
            "--config.data.train_prefixes=" + completed[1]["data.train_prefixes"][0],
            "--config.data.eval_max_sentences=4"], r'cannot resume .* head\.kind "linear" -> '
                                                   r'"lstm"'),
        "mistyped key": ("configs/tiny.py", other + ["--config.optimizer.lerning_rate=1"],
                         r"lerning_rate.*learning_rate"),
        "bad value": ("configs/tiny.py", other + ["--config.head.k=1"], r"config 'head': k "),
        "no workdir": ("configs/tiny.py", [], r"--workdir must have a value"),
        "positional": ("configs/tiny.py", other + ["extra"], r"unexpected arguments \['extra'\]"),
        "missing config": (tmp_path / "missing.py", other, r"cannot load --config: .*No such"),
        "config raises": (broken, other, r"ZeroDivisionError: .*broken\.py, line 2"),
    }[case]
    lines = cli_stderr(config, args)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines
