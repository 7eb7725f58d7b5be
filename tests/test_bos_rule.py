"""One BOS rule, the tokenizer's (issue 12 item 8): `generate` and `evaluate` prepend BOS exactly
when the tokenizer's `add_bos` says (SmolLM2's GGUF: add_bos_token=false; Llama 3: always), as
training rows do, unless --bos / --no-bos say otherwise.

The slow test runs `python -m gptk_jax.generate` with default flags on the real SmolLM2-135M
GGUF (our conversion) against transformers reading the same GGUF with its own tokenizer and
model: newstest2014 lines 101-103, token for token (with BOS prepended the continuations had
differed from the 4th token on in 3 of 3).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, read_lines
from gptk_jax import artifacts
from gptk_jax.data.prompts import PromptFormat, encode_example
from gptk_jax.data.testsets import TestSet
from gptk_jax.data.wmt import Pair
from gptk_jax.evaluation.config import EvalConfig
from gptk_jax.evaluation.pipeline import build_prompts, evaluation_prompts
from gptk_jax.tokenizers import Llama3Tokenizer, write_gguf_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LINES = slice(100, 103)          # newstest2014 lines 101-103 (1-based)
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """Our tokenizer of the SmolLM2 GGUF (add_bos False, from the file's add_bos_token)."""
    return write_gguf_tokenizer(artifacts.fetch("smollm2_gguf"),
                                tmp_path_factory.mktemp("smollm2_tok"))


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return Llama3Tokenizer(artifacts.fetch("llama3_tokenizer_model"))


def _eval_config(**changes) -> EvalConfig:
    return EvalConfig(checkpoint="unused", heads=None, output="unused", data_root=str(DATA),
                      lookup=True, tokens_per_step=3, **changes)


@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "llama3_tokenizer"])
@pytest.mark.parametrize("space_with_target", [False, True])
def test_evaluation_prompts_start_like_training_rows(tokenizer_name, space_with_target, request,
                                                     wmt_dir):
    """The prompt ids of a training row (encode_example) equal evaluation's prompt ids for the
    same source and format: no BOS for SmolLM2, BOS for Llama 3."""
    tok = request.getfixturevalue(tokenizer_name)
    pairs = [Pair(s, t) for s, t in zip(read_lines(wmt_dir / "newstest2014.de")[:4],
                                        read_lines(wmt_dir / "newstest2014.en")[:4])]
    fmt, bos, record = build_prompts(_eval_config(), tok, space_with_target)
    test_set = TestSet("four", "files", pairs, "de", "en", {}, 0)
    evaluation = evaluation_prompts(fmt, tok, test_set, bos)
    training = [list(encode_example(fmt, tok, p).prompt_ids) for p in pairs]
    assert evaluation == training
    assert bos == (tokenizer_name == "llama3_tokenizer") and record["bos"] == bos
    assert (evaluation[0][0] == tok.bos_id) == bos
    assert fmt == PromptFormat.for_languages("de", "en", space_with_target=space_with_target)


def test_evaluation_bos_flag_overrides_the_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for flag, want in ((None, False), (True, True), (False, False)):
        fmt, bos, record = build_prompts(_eval_config(bos=flag), tok, True)
        assert bos is want and record["bos"] is want
        test_set = TestSet("one", "files", [Pair("Hallo", "Hello")], "de", "en", {}, 0)
        ids = evaluation_prompts(fmt, tok, test_set, bos)[0]
        assert (ids[0] == tok.bos_id) is want


def test_cli_bos_flags():
    from gptk_jax.evaluate import parse_args as evaluate_args
    from gptk_jax.generate import parse_args as generate_args
    base = ["--checkpoint", "x", "--prompt", "p", "--max-new-tokens", "1"]
    assert generate_args(base).bos is None
    assert generate_args(base + ["--bos"]).bos is True
    assert generate_args(base + ["--no-bos"]).bos is False
    base = ["--checkpoint", "x", "--lookup", "--k", "3", "--output", "o", "--data-root",
            str(DATA)]
    assert evaluate_args(base).bos is None
    assert evaluate_args(base + ["--no-bos"]).bos is False
    assert evaluate_args(base + ["--bos"]).bos is True


# --- the real SmolLM2 against transformers --------------------------------------------------

def _generate(checkpoint, prompts_file, out, *flags):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "gptk_jax.generate", "--checkpoint",
                           str(checkpoint), "--input-file", str(prompts_file),
                           "--max-new-tokens", str(NEW_TOKENS), "--output-json", str(out),
                           "--quiet", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow   # the real SmolLM2 (conftest smollm2_dir) against transformers
def test_generate_default_flags_equal_transformers_greedy(smollm2_dir, tmp_path, wmt_dir):
    from transformers import AutoTokenizer

    import _hf_reference as ref

    gguf = artifacts.fetch("smollm2_gguf")
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = ref.hf_from_gguf(gguf)
    prompts = read_lines(wmt_dir / "newstest2014.de")[LINES]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    ours = _generate(smollm2_dir, prompts_file, tmp_path / "default.jsonl")
    with_bos = _generate(smollm2_dir, prompts_file, tmp_path / "bos.jsonl", "--bos")

    stop_ids = {hf_tok.eos_token_id, 0, 2}
    for prompt, row, bos_row in zip(prompts, ours, with_bos):
        hf_ids = hf_tok(prompt).input_ids            # transformers' own BOS rule: none here
        want = ref.hf_greedy(hf_model, [hf_ids], NEW_TOKENS)[0]
        got = row["generated_ids"]
        assert row["prompt_tokens"] == len(hf_ids) and bos_row["prompt_tokens"] == len(hf_ids) + 1
        assert got == want[:len(got)], (prompt, got, want)
        if row["stop_reason"] != "length":          # we stopped where transformers emitted a stop
            assert want[len(got)] in stop_ids
        else:
            assert len(got) == NEW_TOKENS
    # the rule matters here: with BOS prepended the continuations differ from transformers'
    assert any(b["generated_ids"] != r["generated_ids"] for b, r in zip(with_bos, ours))
