"""One error style for the prompt-taking CLIs (issue 15 item 4): every bad input to
`python -m gptk_jax.generate` and `python -m gptk_jax.evaluate` is exit code 2, one line on
stderr naming the file or flag, no traceback, and no output that looks valid left behind.

Most cases fail before the model loads; a few go through a subprocess (what a user runs), the
rest call `main([...])` directly. The models are tiny random trunks with the real Llama 3
tokenizer; one has a 256-row embedding beside the tokenizer's 128,256 ids (converted with
--allow-small-vocab), so its prompts hold ids it cannot embed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from conftest import DATA
from gptk_jax import artifacts
from gptk_jax.evaluate import main as evaluate_main
from gptk_jax.generate import main as generate_main
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.heads.io import save_heads
from gptk_jax.llama.checkpoint import save_converted
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import init_params
from gptk_jax.tokenizers import write_llama3_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CFG = LlamaConfig(vocab_size=128256, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                  max_seq_len=256, rope_theta=10000.0)
SMALL = LlamaConfig(vocab_size=256, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                    max_seq_len=256, rope_theta=10000.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """name -> folder: "tiny" (a converted trunk), "heads" (PoMa k=3 for it), "small_vocab"
    (256 embedding rows, the Llama 3 tokenizer, conversion.json says allow_small_vocab),
    "empty" (a folder that is not a model), "a_file" (a regular file)."""
    root = tmp_path_factory.mktemp("cli_errors")
    tokenizer_model = artifacts.fetch("llama3_tokenizer_model")
    write_tok = lambda folder: write_llama3_tokenizer(tokenizer_model, folder)  # noqa: E731
    params = init_params(CFG, jax.random.PRNGKey(0))
    tiny = save_converted(root / "tiny", CFG, params, write_tokenizer=write_tok)
    head_config = HeadConfig(kind="poma", k=3)
    heads = save_heads(root / "heads", head_config,
                       init_head_params(make_head(head_config, CFG), params,
                                        jax.random.PRNGKey(1)), CFG, "tiny")
    small = save_converted(root / "small_vocab", SMALL, init_params(SMALL, jax.random.PRNGKey(2)),
                           write_tokenizer=write_tok, provenance={"allow_small_vocab": True})
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a folder\n")
    return {"tiny": tiny, "heads": heads, "small_vocab": small, "empty": root / "empty",
            "a_file": root / "a_file"}


def call(main, argv) -> int:
    """main's return code, or argparse's exit code."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def assert_one_line_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def run_module(module: str, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, timeout=300)


def nothing_written(out: Path) -> bool:
    """Neither OUT nor OUT.partial (generate's) exists."""
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


# --- generate ---------------------------------------------------------------------------------

def _jsonl(tmp_path: Path, name: str, lines: list) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# id -> (argv after --checkpoint (folders by name), needles in the error line)
GENERATE_CASES = {
    "max-new-tokens-0": (["--prompt", "hi", "--max-new-tokens", 0], ["--max-new-tokens"]),
    "batch-size-0": (["--prompt", "hi", "--max-new-tokens", 2, "--batch-size", 0],
                     ["--batch-size"]),
    "bucket-0": (["--prompt", "hi", "--max-new-tokens", 2, "--bucket", 0], ["--bucket"]),
    "mtp-k-0": (["--prompt", "hi", "--max-new-tokens", 2, "--decoding", "mtp", "--heads",
                 "{heads}", "--k", 0], ["--tokens-per-step", ">= 2"]),
    "mtp-k-1": (["--prompt", "hi", "--max-new-tokens", 2, "--decoding", "mtp", "--heads",
                 "{heads}", "--k", 1], ["--tokens-per-step", ">= 2"]),
    "lookup-k-negative": (["--prompt", "hi", "--max-new-tokens", 2, "--decoding", "lookup",
                           "--k", -3], ["--tokens-per-step", ">= 2"]),
    "mtp-without-heads": (["--prompt", "hi", "--max-new-tokens", 2, "--decoding", "mtp"],
                          ["--heads"]),
    "heads-not-a-heads-folder": (["--prompt", "hi", "--max-new-tokens", 2, "--decoding", "mtp",
                                  "--heads", "{empty}"], ["{empty}", "heads.json"]),
    "input-file-missing": (["--input-file", "{tmp}/absent.txt", "--max-new-tokens", 2],
                           ["{tmp}/absent.txt", "no such file"]),
    "input-file-bad-json": (["--input-file", "{bad_json}", "--max-new-tokens", 2],
                            ["{bad_json}:2", "invalid JSON"]),
    "lone-surrogate-in-jsonl": (["--input-file", "{surrogate}", "--max-new-tokens", 2],
                                ["prompt 1", "{surrogate}:2", "UTF-8"]),
    "output-under-a-file": (["--prompt", "hi", "--max-new-tokens", 2, "--output-json",
                             "{a_file}/out.jsonl"], ["--output-json", "{a_file}/out.jsonl"]),
}


def _fill(argv, names: dict) -> list:
    return [str(a).format(**names) if isinstance(a, str) else a for a in argv]


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_bad_input_is_one_line_exit_2(case, models, tmp_path, capsys):
    names = {**{k: str(v) for k, v in models.items()}, "tmp": str(tmp_path),
             "bad_json": str(_jsonl(tmp_path, "bad", ['"fine"', '{"prompt": '])),
             "surrogate": str(_jsonl(tmp_path, "surrogate",
                                     ['"fine"', '"\\ud800 oops"', '"third"']))}
    flags, needles = GENERATE_CASES[case]
    out = tmp_path / "out.jsonl"
    argv = ["--checkpoint", models["tiny"], *_fill(flags, names)]
    if "--output-json" not in argv:
        argv += ["--output-json", out]
    assert call(generate_main, argv) == 2
    assert_one_line_error(capsys.readouterr().err, *_fill(needles, names))
    assert nothing_written(out)


def test_generate_checkpoint_that_is_not_a_model(models, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert call(generate_main, ["--checkpoint", models["empty"], "--prompt", "hi",
                                "--max-new-tokens", 2, "--output-json", out]) == 2
    assert_one_line_error(capsys.readouterr().err, str(models["empty"]), "config.json")
    assert nothing_written(out)


def test_generate_prompt_ids_past_the_embedding(models, tmp_path, capsys):
    """A tokenizer larger than the embedding (--allow-small-vocab): the prompt's first id past
    row 255 is named, with the model's bound, before anything is decoded (not NaN logits)."""
    out = tmp_path / "out.jsonl"
    assert call(generate_main, ["--checkpoint", models["small_vocab"], "--prompt", "Guten Tag",
                                "--max-new-tokens", 2, "--output-json", out]) == 2
    assert_one_line_error(capsys.readouterr().err, "prompt 0", "token id 128000",
                          "0..255", "128256")
    assert nothing_written(out)


def test_generate_a_byte_that_is_not_utf8_is_refused_before_decoding(models, tmp_path):
    """`--prompt $'\\xff'` as the third of three prompts: refused with its index before any
    prompt is decoded (it once raised TypeError after decoding two)."""
    out = tmp_path / "out.jsonl"
    proc = run_module("gptk_jax.generate", "--checkpoint", models["tiny"], "--prompt", "Hallo",
                      "--prompt", "Guten Tag", "--prompt", b"\xff".decode("utf-8",
                                                                          "surrogateescape"),
                      "--max-new-tokens", 2, "--output-json", out)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, stderr
    assert_one_line_error(stderr, "prompt 2", "UTF-8")
    assert b"=== [" not in proc.stdout           # nothing was decoded
    assert nothing_written(out)


@pytest.mark.parametrize("k", ["0", "-1"])
def test_generate_mtp_k_below_2_from_the_shell(models, k):
    proc = run_module("gptk_jax.generate", "--checkpoint", models["tiny"], "--prompt", "hi",
                      "--max-new-tokens", 2, "--decoding", "mtp", "--heads", models["heads"],
                      "--k", k)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr.decode(), "--tokens-per-step", ">= 2", f"got {k}")


# --- evaluate ---------------------------------------------------------------------------------

def _evaluate_argv(models, out, **overrides) -> list:
    flags = {"--checkpoint": models["tiny"], "--heads": models["heads"],
             "--split": "newstest2014", "--data-root": DATA, "--max-sentences": 2,
             "--batch-sizes": "1", "--max-new-tokens": 2, "--output": out, **overrides}
    argv = ["--no-progress"]
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, value]
    return argv


# id -> (flag overrides (folders by name), needles)
EVALUATE_CASES = {
    "max-sentences-0": ({"--max-sentences": 0}, ["--max-sentences", ">= 1"]),
    "max-sentences-negative": ({"--max-sentences": -1}, ["--max-sentences", ">= 1"]),
    "batch-sizes-0": ({"--batch-sizes": "0"}, ["--batch-sizes"]),
    "batch-sizes-not-numbers": ({"--batch-sizes": "1,x"}, ["--batch-sizes", "'1,x'"]),
    "k-1": ({"--k": 1}, ["--tokens-per-step", ">= 2"]),
    "max-new-tokens-0": ({"--max-new-tokens": 0}, ["--max-new-tokens"]),
    "shots-negative": ({"--shots": -2}, ["--shots"]),
    "checkpoint-not-a-model": ({"--checkpoint": "{empty}"}, ["{empty}", "config.json"]),
    "checkpoint-missing": ({"--checkpoint": "{tmp}/nope"}, ["{tmp}/nope", "no such folder"]),
    "heads-not-a-heads-folder": ({"--heads": "{empty}"}, ["{empty}", "heads.json"]),
    "output-is-a-file": ({"--output": "{a_file}"}, ["--output", "{a_file}", "not a folder"]),
    "output-under-a-file": ({"--output": "{a_file}/report"}, ["--output", "{a_file}/report"]),
    "unknown-split": ({"--split": "wmt99"}, ["'wmt99'"]),
    "continuous-repeats-0": ({"--continuous-repeats": 0}, ["--continuous-repeats", ">= 1"]),
    "continuous-repeats-alone": ({"--continuous-repeats": 3},
                                 ["--continuous-repeats", "--continuous", "--interleave"]),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_bad_input_is_one_line_exit_2(case, models, tmp_path, capsys):
    names = {**{k: str(v) for k, v in models.items()}, "tmp": str(tmp_path)}
    overrides, needles = EVALUATE_CASES[case]
    overrides = {k: v.format(**names) if isinstance(v, str) else v for k, v in overrides.items()}
    out = tmp_path / "report"
    assert call(evaluate_main, _evaluate_argv(models, out, **overrides)) == 2
    assert_one_line_error(capsys.readouterr().err, *_fill(needles, names))
    assert not out.exists()
    assert models["a_file"].read_text() == "not a folder\n"


def test_evaluate_checks_its_output_before_loading_the_model(models, tmp_path, capsys,
                                                             monkeypatch):
    import gptk_jax.llama.checkpoint as checkpoint

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(checkpoint, "load_converted", must_not_load)
    assert call(evaluate_main, _evaluate_argv(
        models, models["a_file"] / "report")) == 2
    assert_one_line_error(capsys.readouterr().err, str(models["a_file"] / "report"))


def test_evaluate_prompt_ids_past_the_embedding(models, tmp_path, capsys):
    out = tmp_path / "report"
    argv = _evaluate_argv(models, out, **{"--checkpoint": models["small_vocab"],
                                          "--heads": None, "--lookup": None})
    assert call(evaluate_main, argv + ["--lookup", "--k", "3"]) == 2
    assert_one_line_error(capsys.readouterr().err, str(models["small_vocab"]), "token id",
                          "0..255")
    assert not out.exists()


@pytest.mark.slow   # the CLI in a subprocess
def test_evaluate_bad_input_from_the_shell(models, tmp_path):
    out = tmp_path / "report"
    proc = run_module("gptk_jax.evaluate", *_evaluate_argv(models, out, **{
        "--max-sentences": 0}))
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr.decode(), "--max-sentences")
    assert not out.exists()
    proc = run_module("gptk_jax.evaluate", *_evaluate_argv(models, out, **{
        "--checkpoint": models["empty"]}))
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr.decode(), str(models["empty"]), "config.json")
    assert not out.exists()
