"""The CLIs' persistent XLA compilation cache (gptk_jax.cli.use_compilation_cache): on by default
under GPTK_CACHE/xla, GPTK_XLA_CACHE picks the folder or (empty) turns it off, a
JAX_COMPILATION_CACHE_DIR already set wins; a program compiled in one process is read back in
the next one, with the same result. Each case in a fresh process (jax reads its config once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from gptk_jax.cli import use_compilation_cache
folder = use_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
x = jnp.arange(12.0).reshape(3, 4)
y = jax.jit(lambda a: jnp.tanh(a @ a.T) * 3.0)(x)
print(json.dumps({"folder": folder, "config": jax.config.jax_compilation_cache_dir,
                  "y": y.tolist()}))
"""


def _run(tmp_path, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("JAX_COMPILATION_CACHE_DIR", "GPTK_XLA_CACHE", "GPTK_CACHE")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, timeout=300,
                         env=dict(base, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **env))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(folder: Path) -> set:
    return {p.name for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def test_default_folder_under_gptk_cache_and_reused_by_the_next_process(tmp_path):
    first = _run(tmp_path, GPTK_CACHE=str(tmp_path))
    folder = tmp_path / "xla"
    assert first["folder"] == first["config"] == str(folder)
    written = _entries(folder)
    assert written, "nothing was written to the compilation cache"
    again = _run(tmp_path, GPTK_CACHE=str(tmp_path))
    assert _entries(folder) == written          # the same program: read back, nothing new
    assert again["y"] == first["y"]


@pytest.mark.parametrize("setting", ["folder", "off", "jax_wins"])
def test_environment_picks_the_folder_or_turns_it_off(tmp_path, setting):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    env = {"GPTK_CACHE": str(tmp_path / "default")}
    env["GPTK_XLA_CACHE"] = "" if setting == "off" else str(mine)
    if setting == "jax_wins":
        env["JAX_COMPILATION_CACHE_DIR"] = str(theirs)
    out = _run(tmp_path, **env)
    expected = {"folder": mine, "off": None, "jax_wins": theirs}[setting]
    assert out["folder"] == (None if expected is None else str(expected))
    assert not _entries(tmp_path / "default")
    assert bool(_entries(mine)) == (setting == "folder")
    assert bool(_entries(theirs)) == (setting == "jax_wins")
