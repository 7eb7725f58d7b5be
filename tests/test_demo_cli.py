"""`python -m gptk_jax.demo` on bad inputs: one line on stderr, "error: ...", exit status 2, no
traceback, and nothing loaded or converted (each fails before a model is read)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_demo(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "gptk_jax.demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "demo wall time" not in proc.stdout


def test_a_model_dir_that_is_not_a_converted_model(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    proc = run_demo("--model-dir", str(folder))
    assert_one_line_error(proc, str(folder), "not a converted model")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]   # not converted into


def test_a_converted_folder_with_a_broken_config(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    proc = run_demo("--model-dir", str(folder), "--no-mtp")
    assert_one_line_error(proc, "config.json")


@pytest.mark.parametrize("args, needle", [
    (("--k", "1"), "--tokens-per-step/--k: must be >= 2, got 1"),
    (("--num-sentences", "many"), "--num-sentences: not an integer: 'many'"),
    (("--train-steps", "0"), "--train-steps: must be >= 1, got 0"),
])
def test_bad_numeric_arguments(args, needle):
    assert_one_line_error(run_demo(*args), needle)


def test_speedup_table_lists_the_methods_that_ran(capsys):
    """The demo's table (print_speedups): a row per method that ran (prompt lookup alone only
    with --lookup-alone), τ and speedup as given, the share of the oracle's speedup worked out
    by hand; exit 1 when a run differed from greedy."""
    from gptk_jax.demo import parse_args, print_speedups

    run = lambda tau, speedup, same=True: {"tau": tau, "speedup": speedup,
                                           "identical_to_greedy": same}
    runs = {"mtp/b1": run(1.2, 1.1), "heads+lookup/b1": run(1.8, 1.5),
            "oracle/b1": run(3.8, 2.0)}
    assert print_speedups({"runs": runs}, (1,)) == 0
    out = capsys.readouterr().out
    assert "prompt lookup " not in out
    assert "lookup + heads       1.80    1.50x       75%  yes" in out
    assert "linear heads         1.20    1.10x       55%  yes" in out
    runs["lookup/b1"] = run(1.7, 1.4, same=False)
    assert print_speedups({"runs": runs}, (1,)) == 1
    assert "prompt lookup        1.70    1.40x       70%  NO" in capsys.readouterr().out
    assert parse_args(["--lookup-alone"]).lookup_alone and not parse_args([]).lookup_alone
