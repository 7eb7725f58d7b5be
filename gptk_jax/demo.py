"""`make demo`: the real SmolLM2-135M-Instruct (GGUF) translating newstest2014 German with our
jitted greedy decoder, on CPU.

    python -m gptk_jax.demo [--num-sentences 8] [--shots 3] [--max-new-tokens 64] [--batch-size 8]

Steps: fetch the GGUF (`gptk_jax.artifacts`), convert it once into .cache/models/smollm2-135m
(`python -m convert --format gguf`), build few-shot prompts (instruction, newstest2013 pairs as
shots, then the query; gptk_jax.data.prompts), decode greedily stopping at the tokenizer's stop ids
and at any token holding a newline, and print source, translation, reference and tokens/s.
Data come from ../shared/data/wmt14-de-en (or $GPTK_DATA/wmt14-de-en), else from sacreBLEU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = ROOT / ".cache" / "models" / "smollm2-135m"
DATA_DIR = Path(os.environ.get("GPTK_DATA", ROOT.parent / "shared" / "data")) / "wmt14-de-en"
DISCLAIMER = ("Note: SmolLM2-135M is a weak translator (135M parameters, trained mostly on "
              "English); this demo shows the mechanics and speed of decoding, not translation "
              "quality.")


def ensure_converted(model_dir: Path) -> Path:
    """The converted SmolLM2 folder, converting the fetched GGUF first if it is not there yet."""
    if (model_dir / "config.json").is_file():
        return model_dir
    from gptk_jax import artifacts

    gguf = artifacts.fetch("smollm2_gguf")
    print(f"converting {gguf} -> {model_dir}", flush=True)
    cmd = [sys.executable, "-m", "convert", "--format", "gguf", "--input", str(gguf),
           "--output", str(model_dir)]
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"error: conversion failed (exit code {proc.returncode}): {' '.join(cmd)}")
    return model_dir


def load_pairs(num_sentences: int, num_shots: int):
    """(test pairs from newstest2014, few-shot pairs from newstest2013)."""
    from gptk_jax.data.prompts import few_shot_from
    from gptk_jax.data.wmt import read_parallel_text, read_sacrebleu

    if DATA_DIR.is_dir():
        test = read_parallel_text(DATA_DIR / "newstest2014", max_pairs=num_sentences)
        shots = read_parallel_text(DATA_DIR / "newstest2013")
    else:  # sacreBLEU's cache ($SACREBLEU / ~/.sacrebleu), downloading where a network exists
        test = read_sacrebleu("wmt14/full", max_pairs=num_sentences)
        shots = read_sacrebleu("wmt13")
    return test.pairs, few_shot_from(shots.pairs, num_shots), test.source


def newline_token_ids(tokenizer) -> set[int]:
    """Every vocabulary id whose text holds a newline: generation ends at the end of the line."""
    return {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptk_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--num-sentences", type=int, default=8)
    p.add_argument("--shots", type=int, default=3, help="newstest2013 pairs in the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--strip-query-space", action="store_true",
                   help="end the prompt at 'en:' instead of 'en: ' (byte-level BPE attaches the "
                        "space to the next word, so the research format's trailing space is an "
                        "unusual token boundary for SmolLM2)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    model_dir = ensure_converted(args.model_dir)

    from gptk_jax.checkpoint import load_converted
    from gptk_jax.data.prompts import PromptFormat
    from gptk_jax.decoding.greedy import greedy_generate

    model = load_converted(model_dir)
    tok = model.tokenizer
    pairs, shots, source = load_pairs(args.num_sentences, args.shots)
    fmt = PromptFormat.for_languages("de", "en", shots=shots)
    stop_ids = set(tok.stop_ids) | newline_token_ids(tok)
    print(f"model {model_dir} ({model.config.n_layers} layers, dim {model.config.dim}, "
          f"vocab {model.config.vocab_size}); {len(pairs)} sentences from {source}, "
          f"{len(shots)}-shot prompts; greedy, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens\n")

    results, tokens, seconds, compile_seconds = [], 0, 0.0, 0.0
    start = time.perf_counter()
    for b in range(0, len(pairs), args.batch_size):
        batch = pairs[b:b + args.batch_size]
        texts = [fmt.prompt_text(p.src) for p in batch]
        if args.strip_query_space:
            texts = [t.rstrip(" ") for t in texts]
        prompt_ids = [tok.encode(t, bos=True) for t in texts]
        result = greedy_generate(model.config, model.params, prompt_ids, args.max_new_tokens,
                                 stop_ids, tok.pad_id, batch_size=args.batch_size)
        tokens += result.total_generated
        seconds += result.prefill_seconds + result.decode_seconds
        compile_seconds += result.compile_seconds
        for pair, ids in zip(batch, result.tokens):
            results.append((pair, tok.decode(ids).split("\n")[0].strip()))
    wall = time.perf_counter() - start

    for i, (pair, translation) in enumerate(results):
        print(f"[{i}] de:  {pair.src}\n    out: {translation}\n    ref: {pair.tgt}\n")
    rate = tokens / seconds if seconds > 0 else float("nan")
    print(f"{tokens} tokens generated in {seconds:.2f}s: {rate:.1f} tokens/s "
          f"(prefill + decode; compilation {compile_seconds:.1f}s apart, wall {wall:.1f}s)")
    print(DISCLAIMER)
    if not args.strip_query_space:
        print("The prompt ends with 'en: ' (the research format); --strip-query-space often gives "
              "SmolLM2 a better start.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
