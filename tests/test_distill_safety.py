"""Issue 27, findings 1-3: `distill` writes only to a file it created (a user's file given as
--output is refused untouched), one writer per output and per workdir (real second processes
hold the lock), and a resume checks content (changed sources, damaged lines: refused naming the
first line that differs; --redo-damaged translates the damaged chunk again)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

from gptk_jax.distill import main as distill_main

SOURCES = ["Guten Morgen.", "", "Das Haus ist klein.", "Ja.", "Wir danken Ihnen.",
           "Die Katze schläft.", "Es regnet heute.", "Guten Morgen."]

HOLDER = ("import sys, time; from pathlib import Path; from gptk_jax.locks import exclusive_lock\n"
          "with exclusive_lock(Path(sys.argv[1]), 'test'):\n"
          "    print('held', flush=True); time.sleep(600)\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gptk_jax.training.inputs import ensure_tiny_trunk
    root = tmp_path_factory.mktemp("distill-safety")
    trunk = ensure_tiny_trunk(root / "trunk")
    (root / "src.de").write_text("".join(s + "\n" for s in SOURCES))
    whole = root / "whole.en"               # an uninterrupted distillation
    assert distill_main(_args(root / "src", trunk, whole, "--chunk", "2")) == 0
    return root, trunk, whole.read_text()


def _args(prefix, trunk, output, *extra):
    return ["--checkpoint", str(trunk), "--input", str(prefix), "--output", str(output),
            "--max-new-tokens", "5", "--no-progress", *extra]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _holder(lock: Path):
    """A second process holding `lock` (as a running distill / train does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)        # no cleanup: the lock file stays behind
    proc.wait()


# -- 1. a file distill did not create is never written -------------------------------------

@pytest.mark.parametrize("content", [b"do-not-lose-this", b"first line\nsecond, unfinished",
                                     b"", b"a\nb\n"])
def test_a_users_file_is_refused_untouched(data, tmp_path, capsys, content):
    root, trunk, _ = data
    out = tmp_path / "x.txt"
    out.write_bytes(content)
    assert distill_main(_args(root / "src", trunk, out, "--max-pairs", "4")) == 2
    err = _one_error(capsys)
    assert str(out) in err and "no record" in err
    assert out.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_a_foreign_record_or_a_folder_is_refused_untouched(data, tmp_path, capsys):
    root, trunk, _ = data
    out = tmp_path / "x.txt"
    out.write_bytes(b"mine\npartial")
    (tmp_path / "x.txt.json").write_text('{"something": "else"}\n')
    assert distill_main(_args(root / "src", trunk, out)) == 2
    assert "not a distillation record" in _one_error(capsys)
    assert out.read_bytes() == b"mine\npartial"
    assert (tmp_path / "x.txt.json").read_text() == '{"something": "else"}\n'
    folder = tmp_path / "folder"
    folder.mkdir()
    assert distill_main(_args(root / "src", trunk, folder)) == 2
    assert "is not a file" in _one_error(capsys)
    assert list(folder.iterdir()) == []


# -- 2. one writer per output and per workdir ----------------------------------------------

def test_a_second_distill_on_one_output_is_refused_and_a_stale_lock_cleared(data, tmp_path,
                                                                            capsys):
    root, trunk, whole = data
    out = tmp_path / "d.en"
    holder = _holder(tmp_path / "d.en.lock")
    try:
        assert distill_main(_args(root / "src", trunk, out)) == 2
        err = _one_error(capsys)
        assert f"PID {holder.pid}, started " in err and str(out) in err
        assert not out.exists() and not (tmp_path / "d.en.json").exists()
    finally:
        _kill(holder)
    assert (tmp_path / "d.en.lock").exists()            # left by the killed holder
    assert distill_main(_args(root / "src", trunk, out)) == 0
    said = capsys.readouterr().out
    assert f"cleared a stale lock {tmp_path / 'd.en.lock'} of PID {holder.pid}" in said
    assert out.read_text() == whole
    assert not (tmp_path / "d.en.lock").exists()        # released at the end


def test_a_shard_is_locked_on_its_own_file(data, tmp_path, capsys):
    root, trunk, _ = data
    out = tmp_path / "s.en"
    holder = _holder(tmp_path / "s.en.shard1-of-2.lock")
    try:
        assert distill_main(_args(root / "src", trunk, out, "--num-shards", "2",
                                  "--shard-index", "1")) == 2
        assert f"PID {holder.pid}" in _one_error(capsys)
        assert distill_main(_args(root / "src", trunk, out, "--num-shards", "2",
                                  "--shard-index", "0")) == 0     # another shard: free
    finally:
        _kill(holder)


def test_a_second_trainer_on_one_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = _holder(workdir / "train.lock")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gptk_jax.train", "--config", "configs/tiny.py",
             "--workdir", str(workdir), "--config.training.num_train_steps=1"],
            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
            text=True, timeout=300)
    finally:
        _kill(holder)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and f"PID {holder.pid}, started " in err[0] and str(workdir) in err[0]
    assert sorted(p.name for p in workdir.iterdir()) == ["train.lock"]   # nothing written


def test_lock_module_refuses_a_second_process_and_clears_a_stale_lock(tmp_path):
    from gptk_jax.locks import LockHeld, exclusive_lock
    lock = tmp_path / "x.lock"
    holder = _holder(lock)
    try:
        with pytest.raises(LockHeld, match=f"PID {holder.pid}, started "):
            with exclusive_lock(lock, "x"):
                pass
    finally:
        _kill(holder)
    said = []
    with exclusive_lock(lock, "x", log=said.append):
        assert lock.read_text().startswith(f"pid={os.getpid()} ")
    assert len(said) == 1 and f"PID {holder.pid}" in said[0] and not lock.exists()
    with exclusive_lock(lock, "x", log=said.append):      # a clean release: nothing stale
        pass
    assert len(said) == 1



def test_a_refusal_between_lock_and_pid_still_names_the_holder(tmp_path):
    """The holder writes its PID just after taking the lock; a second writer refused in that
    window waits for the PID instead of saying "PID not yet written" (CI, stop 41)."""
    from gptk_jax.locks import LockHeld, exclusive_lock
    lock = tmp_path / "x.lock"
    late = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(0.3)\n"
            "os.pwrite(fd, f'pid={os.getpid()} started=now\\n'.encode(), 0)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", late, str(lock)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert lock.read_text() == ""                   # the refusal below lands in the window
        with pytest.raises(LockHeld, match=f"PID {proc.pid}, started now"):
            with exclusive_lock(lock, "x"):
                pass
    finally:
        _kill(proc)

# -- 3. a resume checks content --------------------------------------------------------------

def test_changed_sources_are_refused_naming_the_first_line(data, tmp_path, capsys):
    root, trunk, _ = data
    prefix = tmp_path / "src"
    (tmp_path / "src.de").write_text("".join(s + "\n" for s in SOURCES))
    out = tmp_path / "d.en"
    assert distill_main(_args(prefix, trunk, out, "--stop-after", "4")) == 0
    before = out.read_bytes(), (tmp_path / "d.en.json").read_bytes()
    (tmp_path / "src.de").write_text("".join(s + "\n" for s in ["Neu."] + SOURCES))
    capsys.readouterr()
    assert distill_main(_args(prefix, trunk, out)) == 2
    err = _one_error(capsys)
    assert "source line 1 of" in err and "line 1 of " + str(out) in err
    assert (out.read_bytes(), (tmp_path / "d.en.json").read_bytes()) == before
    # an edit further down names that line
    edited = list(SOURCES)
    edited[2] = "Das Haus ist groß."
    (tmp_path / "src.de").write_text("".join(s + "\n" for s in edited))
    assert distill_main(_args(prefix, trunk, out)) == 2
    assert "source line 3 of" in _one_error(capsys)


def test_damaged_output_is_refused_and_redone_with_the_flag(data, tmp_path, capsys):
    root, trunk, whole = data
    out = tmp_path / "d.en"
    assert distill_main(_args(root / "src", trunk, out, "--chunk", "2", "--stop-after",
                              "6")) == 0
    lines = out.read_text().split("\n")[:-1]
    assert len(lines) == 6 and lines[3]
    lines[3] = lines[3][:-1]                  # line 4 shortened, its newline kept
    damaged = "".join(line + "\n" for line in lines)
    out.write_text(damaged)
    record = (tmp_path / "d.en.json").read_bytes()
    capsys.readouterr()
    assert distill_main(_args(root / "src", trunk, out, "--chunk", "2")) == 2
    err = _one_error(capsys)
    assert f"line 4 of {out}" in err and "--redo-damaged" in err
    assert out.read_text() == damaged and (tmp_path / "d.en.json").read_bytes() == record
    assert distill_main(_args(root / "src", trunk, out, "--chunk", "2", "--redo-damaged")) == 0
    assert out.read_text() == whole
    rec = json.loads((tmp_path / "d.en.json").read_text())
    assert rec["sessions"][-1]["first_line"] == 2       # from the damaged chunk (lines 3-4)
    assert rec["lines_written"] == len(SOURCES) == sum(c["lines"] for c in rec["chunks"])
    # a file cut short (a lost last line) is damage too
    out.write_text("".join(whole.splitlines(keepends=True)[:-1]))
    assert distill_main(_args(root / "src", trunk, out)) == 2
    assert f"line {len(SOURCES)} of {out}" in _one_error(capsys)


def test_a_merge_is_resumable_and_its_record_fingerprints_it(data, tmp_path, capsys):
    root, trunk, whole = data
    out = tmp_path / "m.en"
    for i in (0, 1, 2):
        assert distill_main(_args(root / "src", trunk, out, "--num-shards", "3",
                                  "--shard-index", str(i), "--chunk", "2")) == 0
    assert out.read_text() == whole
    rec = json.loads((tmp_path / "m.en.json").read_text())
    assert [c["lines"] for c in rec["chunks"]] == [len(SOURCES)]
    assert distill_main(_args(root / "src", trunk, out)) == 0      # nothing left to do
    assert out.read_text() == whole
    assert "0 lines now" in capsys.readouterr().out
    edited = whole.replace("\n", "\nX", 1)     # line 2 changed in the merged file
    out.write_text(edited)
    assert distill_main(_args(root / "src", trunk, out)) == 2
    assert f"line 2 of {out}" in _one_error(capsys)
