"""`python -m gptk_jax.generate` end to end: a tiny random model with the real Llama 3 tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from gptk_jax import artifacts
from gptk_jax.llama.checkpoint import load_converted, save_converted
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.decoding.greedy import greedy_generate
from gptk_jax.llama.model import init_params
from gptk_jax.tokenizers import write_llama3_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CFG = LlamaConfig(vocab_size=128256, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                  max_seq_len=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer_model = artifacts.fetch("llama3_tokenizer_model")
    out = tmp_path_factory.mktemp("cli") / "tiny-llama3"
    return save_converted(out, CFG, init_params(CFG, jax.random.PRNGKey(3)),
                          write_tokenizer=lambda folder: write_llama3_tokenizer(tokenizer_model,
                                                                                folder))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "gptk_jax.generate", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # three CLI runs in subprocesses (about 10 s)
def test_prompts_and_input_file(checkpoint, tmp_path):
    prompts = ["Guten Morgen", "The quick brown fox jumps over the lazy dog, again and again"]
    out_json = tmp_path / "prompt.jsonl"
    proc = run_cli("--checkpoint", checkpoint, "--prompt", prompts[0], "--prompt", prompts[1],
                   "--max-new-tokens", 5, "--batch-size", 2, "--output-json", out_json)
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out_json)
    assert [r["prompt"] for r in records] == prompts

    model = load_converted(checkpoint)
    tok = model.tokenizer
    ids = [tok.encode(p, bos=True) for p in prompts]
    expected = greedy_generate(model.config, model.params, ids, 5, tok.stop_ids, tok.pad_id)
    for r, want, reason, prompt_ids in zip(records, expected.tokens, expected.stop_reasons, ids):
        assert r["generated_ids"] == want and r["stop_reason"] == reason
        assert r["prompt_tokens"] == len(prompt_ids) and prompt_ids[0] == tok.bos_id
        assert r["text"] == tok.decode(r["generated_ids"])
        assert r["text"] in proc.stdout
        assert r["decoding"] == "greedy" and r["batch"] == 0 and r["batch_size"] == 2
        assert r["prefill_s"] > 0 and r["decode_s"] >= 0 and r["tokens_per_s"] > 0
        assert 1 <= r["num_generated"] <= 5
    assert "tokens/s" in proc.stderr

    # The same prompts from a file (CRLF, a blank line), in batches of 1: same tokens.
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_bytes(f"{prompts[0]}\r\n\n{prompts[1]}\n".encode())
    file_json = tmp_path / "file.jsonl"
    proc = run_cli("--checkpoint", checkpoint, "--input-file", prompt_file, "--max-new-tokens", 5,
                   "--output-json", file_json, "--quiet")
    assert proc.returncode == 0, proc.stderr
    from_file = read_jsonl(file_json)
    assert [r["prompt"] for r in from_file] == prompts
    assert [r["generated_ids"] for r in from_file] == expected.tokens
    assert [r["batch"] for r in from_file] == [0, 1]


@pytest.mark.slow  # two CLI runs in subprocesses
@pytest.mark.parametrize("decoding", ["greedy", "lookup"])
def test_continuous_batching_gives_greedy_tokens(checkpoint, tmp_path, decoding):
    prompts = ["Guten Morgen", "Hallo", "The quick brown fox jumps over the lazy dog",
               "Eins zwei drei vier fünf sechs", "ja"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out_json = tmp_path / "out.jsonl"
    proc = run_cli("--checkpoint", checkpoint, "--input-file", prompt_file, "--max-new-tokens", 6,
                   "--batch-size", 2, "--continuous", "--decoding", decoding, "--k", 3,
                   "--output-json", out_json, "--quiet")
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out_json)
    model = load_converted(checkpoint)
    tok = model.tokenizer
    ids = [tok.encode(p, bos=True) for p in prompts]
    expected = greedy_generate(model.config, model.params, ids, 6, tok.stop_ids, tok.pad_id)
    assert [r["prompt"] for r in records] == prompts
    assert [r["generated_ids"] for r in records] == expected.tokens
    assert [r["stop_reason"] for r in records] == expected.stop_reasons
    assert {(r["batch"], r["batch_size"]) for r in records} == {(0, 2)}
    assert ("verify_steps" in records[0]) == (decoding == "lookup")


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = run_cli("--checkpoint", missing, "--prompt", "hi", "--max-new-tokens", 2)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    proc = run_cli("--checkpoint", not_a_model, "--prompt", "hi", "--max-new-tokens", 2)
    assert proc.returncode != 0
    assert str(not_a_model) in proc.stderr and "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_input_file_is_a_clear_error(checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    proc = run_cli("--checkpoint", checkpoint, "--input-file", empty, "--max-new-tokens", 2)
    assert proc.returncode != 0
    assert "no prompts" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--checkpoint", checkpoint, "--input-file", tmp_path / "absent.txt",
                   "--max-new-tokens", 2)
    assert proc.returncode != 0 and "no such file" in proc.stderr


def test_results_are_appended_as_each_batch_finishes(checkpoint, tmp_path, monkeypatch):
    """OUT.partial holds batch 0's line (flushed) while batch 1 decodes; a run that dies there
    leaves that line in OUT.partial and no OUT; a whole run renames it to OUT."""
    from gptk_jax import generate

    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    seen_while_decoding = []

    def failing_greedy(args, model):
        decode = generate.build_greedy(args, model)

        def decode_or_fail(ids, batch_size):
            if seen_while_decoding or partial.exists() and partial.read_text():
                seen_while_decoding.append(read_jsonl(partial))
                raise RuntimeError("the machine went away")
            return decode(ids, batch_size)
        return decode_or_fail

    argv = ["--checkpoint", str(checkpoint), "--prompt", "Guten Morgen", "--prompt", "Hallo",
            "--max-new-tokens", "3", "--output-json", str(out), "--quiet"]
    monkeypatch.setitem(generate.DECODERS, "greedy", failing_greedy)
    with pytest.raises(RuntimeError):
        generate.main(argv)
    assert [r["index"] for r in seen_while_decoding[0]] == [0]
    assert not out.exists() and [r["index"] for r in read_jsonl(partial)] == [0]
    monkeypatch.setitem(generate.DECODERS, "greedy", generate.build_greedy)
    assert generate.main(argv) == 0
    assert [r["prompt"] for r in read_jsonl(out)] == ["Guten Morgen", "Hallo"]
    assert not partial.exists()


def test_continuous_lines_are_written_as_rows_finish(checkpoint, tmp_path, monkeypatch):
    """--continuous: each prompt's line reaches OUT.partial (flushed) when its row finishes; a
    run that dies while later rows decode leaves the finished ones there, with greedy's tokens,
    and no OUT; a whole run writes OUT in prompt order with the run's timing on every line."""
    from gptk_jax import generate
    from gptk_jax.decoding import engine

    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    prompts = ["Guten Morgen", "Hallo", "Eins zwei drei"]
    real_harvest, seen_while_decoding = engine.harvest, []

    def harvest_then_fail(state, rows):
        if partial.exists() and partial.read_text():   # a row finished and its line is there
            seen_while_decoding.append(read_jsonl(partial))
            raise RuntimeError("the machine went away")
        return real_harvest(state, rows)

    argv = ["--checkpoint", str(checkpoint), *sum((["--prompt", p] for p in prompts), []),
            "--max-new-tokens", "3", "--batch-size", "1", "--continuous",
            "--output-json", str(out), "--quiet"]
    monkeypatch.setattr(engine, "harvest", harvest_then_fail)
    with pytest.raises(RuntimeError):
        generate.main(argv)
    monkeypatch.setattr(engine, "harvest", real_harvest)
    model = load_converted(checkpoint)
    tok = model.tokenizer
    ids = [tok.encode(p, bos=True) for p in prompts]
    expected = greedy_generate(model.config, model.params, ids, 3, tok.stop_ids, tok.pad_id)
    assert [r["index"] for r in seen_while_decoding[0]] == [0]
    assert seen_while_decoding[0][0]["generated_ids"] == expected.tokens[0]
    assert not out.exists() and [r["index"] for r in read_jsonl(partial)] == [0]
    assert generate.main(argv) == 0
    records = read_jsonl(out)
    assert [r["prompt"] for r in records] == prompts
    assert [r["generated_ids"] for r in records] == expected.tokens
    assert all("prefill_s" in r and "tokens_per_s" in r for r in records)
    assert not partial.exists()


def test_bos_follows_the_tokenizer_unless_told(checkpoint, tmp_path):
    """Llama 3's tokenizer says add_bos: BOS by default, --no-bos leaves it out."""
    from gptk_jax.generate import main

    model = load_converted(checkpoint)
    tok = model.tokenizer
    assert tok.add_bos
    counts = {}
    for flags in ([], ["--no-bos"], ["--bos"]):
        out = tmp_path / f"out{len(counts)}.jsonl"
        assert main(["--checkpoint", str(checkpoint), "--prompt", "Guten Morgen",
                     "--max-new-tokens", "2", "--output-json", str(out), "--quiet",
                     *flags]) == 0
        counts[tuple(flags)] = read_jsonl(out)[0]["prompt_tokens"]
    plain = len(tok.encode("Guten Morgen", bos=False))
    assert counts == {(): plain + 1, ("--no-bos",): plain, ("--bos",): plain + 1}
