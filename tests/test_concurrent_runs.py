"""Issue 27, finding 2 with real processes: two `python -m gptk_jax.distill` on one --output, and
two `python -m gptk_jax.train` on one workdir, started together. Exactly one runs to the end;
the other exits 2 with one line naming the first's PID; the distillation's lines are those of
an uninterrupted run and metrics.jsonl holds each logged step once.

Both processes are started back to back. To make their overlap certain on a loaded machine,
the one that took the lock (its PID in the lock file) is paused with SIGSTOP, still holding
the lock, until the other has exited, then continued: the second process always meets a live
holder, as it would when the first is busy loading or decoding."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

# the tiny trunk, PREFIX.de and an uninterrupted distillation of it (whole.en)
from test_distill_safety import SOURCES, _args, data  # noqa: F401 (a fixture)

ENV = dict(os.environ, JAX_PLATFORMS="cpu")
TIMEOUT = 600
TRAIN_STEPS = 3


def _start_two(command: list) -> list:
    return [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]


def _holder_pid(lock: Path, procs: list) -> int:
    """The PID the lock file names, as soon as one of `procs` holds the lock."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            found = re.search(r"pid=(\d+) ", lock.read_text())
        except OSError:
            found = None
        if found:
            return int(found.group(1))
        if all(p.poll() is not None for p in procs):
            raise AssertionError("neither process took the lock: " + " | ".join(
                p.stderr.read()[-1500:] for p in procs))
        time.sleep(0.01)
    raise AssertionError(f"no lock {lock} after {TIMEOUT} s")


def _race(command: list, lock: Path):
    """Starts `command` twice at once; -> (holder, (rc, out, err)), (other, (rc, out, err))."""
    procs = _start_two(command)
    try:
        pid = _holder_pid(lock, procs)
        assert pid in (procs[0].pid, procs[1].pid), pid
        holder, other = procs if procs[0].pid == pid else procs[::-1]
        os.kill(holder.pid, signal.SIGSTOP)          # keeps the lock held, whatever the load
        try:
            other_out, other_err = other.communicate(timeout=TIMEOUT)
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        holder_out, holder_err = holder.communicate(timeout=TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return ((holder, (holder.returncode, holder_out, holder_err)),
            (other, (other.returncode, other_out, other_err)))


def _refused_naming(result, holder, what: str) -> None:
    rc, _, err = result
    assert rc == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"PID {holder.pid}, started " in lines[0] and what in lines[0], lines[0]


@pytest.mark.slow   # two distill processes
def test_two_distills_on_one_output(data, tmp_path):
    root, trunk, whole = data
    out = tmp_path / "d.en"
    command = [sys.executable, "-m", "gptk_jax.distill",
               *_args(root / "src", trunk, out, "--chunk", "2")]
    (holder, done), (other, refused) = _race(command, tmp_path / "d.en.lock")
    assert done[0] == 0, done[2][-2000:]
    assert f"{len(SOURCES)} of {len(SOURCES)} lines" in done[1]
    _refused_naming(refused, holder, str(out))
    assert refused[1] == ""                         # the refused run wrote and said nothing
    # the lines of one uninterrupted run: each line i the translation of source i, once
    assert out.read_text() == whole
    record = json.loads((tmp_path / "d.en.json").read_text())
    assert record["lines_written"] == len(SOURCES) == sum(c["lines"] for c in record["chunks"])
    assert len(record["sessions"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.en", "d.en.json"]  # lock released


@pytest.mark.slow   # two trainer processes
def test_two_trainers_on_one_workdir(tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "gptk_jax.train", "--config", "configs/tiny.py",
               "--workdir", str(workdir), f"--config.training.num_train_steps={TRAIN_STEPS}",
               "--config.training.log_every_steps=1"]
    (holder, done), (other, refused) = _race(command, workdir / "train.lock")
    assert done[0] == 0, done[2][-3000:]
    _refused_naming(refused, holder, str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    per_step = collections.Counter((r["split"], r["step"]) for r in rows)
    assert per_step and set(per_step.values()) == {1}, per_step     # each step written once
    assert sorted(s for split, s in per_step if split == "train") == \
        list(range(1, TRAIN_STEPS + 1))
    assert not (workdir / "train.lock").exists()
