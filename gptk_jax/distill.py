"""Self-distillation data: the trunk translates the training sources greedily, and its
translations become the target side the heads train on (what verification will accept).

    python -m gptk_jax.distill --checkpoint DIR --input PREFIX --output FILE \\
        [--max-pairs N] [--batch-size B] [--max-new-tokens 128] [--shots 0] [--src-lang de] ...

Reads the source side PREFIX.{src_lang}; line i of FILE is the trunk's greedy translation of
source line i (its first output line, stripped; empty when the source line is empty), so FILE is
line-aligned with PREFIX and can replace PREFIX.{tgt_lang} in a training config
(`config.data.train_target_files`). Prompts are the training prompts (gptk_jax.data.prompts):
use the same --shots as the training config. Decoding is batched with the jitted greedy decoder
and its KV cache (one gptk_jax.decoding.Decoder for every batch).

Resumable: FILE is appended to after every batch (flushed and fsync-ed); a rerun counts the lines
already there, drops a partial last line left by a crash, and translates only the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from gptk_jax.data.root import add_data_root_argument, resolve_data_root
from gptk_jax.data.testsets import news_commentary


def lines_done(output: Path) -> int:
    """Complete lines already in `output`; a trailing partial line is cut off the file."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(output, "r+b") as f:
            f.truncate(end)
    return data[:end].count(b"\n")


def _one_line(text: str) -> str:
    """The first line of a generation, stripped (and free of characters that split lines)."""
    first = text.split("\n")[0]
    for sep in ("\r", "\x85", "\u2028", "\u2029"):
        first = first.replace(sep, " ")
    return first.strip()


def distill(checkpoint: str | os.PathLike, input_prefix: str, output: str | os.PathLike, *,
            max_pairs: Optional[int] = None, batch_size: int = 16, max_new_tokens: int = 128,
            src_lang: str = "de", tgt_lang: str = "en", shots: int = 0,
            shots_prefix: Optional[str | os.PathLike] = None, space_with_target: bool = False,
            progress: bool = True) -> int:
    """Appends translations of source lines [lines already in output, max_pairs) to `output`;
    returns the number of lines written now. `shots_prefix`: the few-shot pool PREFIX (needed
    when shots > 0; the CLI defaults it to News Commentary under the data root)."""
    from tqdm import tqdm

    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.data.prompts import prompt_format, translation_stop_ids
    from gptk_jax.data.wmt import read_text_lines
    from gptk_jax.decoding import Decoder

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")
    sources = read_text_lines(f"{input_prefix}.{src_lang}")
    if max_pairs is not None:
        sources = sources[:max_pairs]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = lines_done(output)
    if start > len(sources):
        raise ValueError(f"{output} already has {start} lines, more than the {len(sources)} "
                         f"source lines asked for: is it the output of another input?")
    if start == len(sources):
        return 0
    model = load_converted(checkpoint)
    tok = model.tokenizer
    fmt = prompt_format(src_lang, tgt_lang, shots, shots_from=shots_prefix,
                        space_with_target=space_with_target)
    # one decoder for every batch: compiled once per prompt bucket
    decoder = Decoder(model.config, model.params, stop_ids=translation_stop_ids(tok),
                      pad_id=tok.pad_id)
    bos = getattr(tok, "add_bos", True)
    todo = sources[start:]
    written = 0
    with open(output, "a", encoding="utf-8") as out:
        for first in tqdm(range(0, len(todo), batch_size), desc="distill", unit="batch",
                          disable=not progress, initial=0, total=-(-len(todo) // batch_size)):
            chunk = [s.rstrip("\r").strip() for s in todo[first:first + batch_size]]
            texts = [""] * len(chunk)
            real = [i for i, s in enumerate(chunk) if s]
            if real:
                prompts = [tok.encode(fmt.prompt_text(chunk[i]), bos=bos) for i in real]
                result = decoder.generate(prompts, max_new_tokens, batch_size=batch_size)
                for i, ids in zip(real, result.tokens):
                    texts[i] = _one_line(tok.decode(ids))
            out.write("".join(t + "\n" for t in texts))
            out.flush()
            os.fsync(out.fileno())
            written += len(texts)
    return written


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptk_jax.distill",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted model folder (python -m convert)")
    p.add_argument("--input", required=True, help="PREFIX: reads PREFIX.<src-lang>")
    p.add_argument("--output", required=True, help="line-aligned translations (appended to)")
    p.add_argument("--max-pairs", type=int, default=None, help="first N source lines only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--src-lang", default="de")
    p.add_argument("--tgt-lang", default="en")
    p.add_argument("--shots", type=int, default=0, help="few-shot pairs (as in training)")
    p.add_argument("--shots-prefix", default=None,
                   help="few-shot pool PREFIX (default: News Commentary under the data root)")
    add_data_root_argument(p)
    p.add_argument("--space-with-target", action="store_true",
                   help="prompts end at 'en:' (as config.data.space_with_target in training)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from gptk_jax.llama.checkpoint import CheckpointError
    from gptk_jax.data.wmt import DataError
    try:
        written = distill(args.checkpoint, args.input, args.output, max_pairs=args.max_pairs,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          src_lang=args.src_lang, tgt_lang=args.tgt_lang, shots=args.shots,
                          shots_prefix=args.shots_prefix or news_commentary(
                              resolve_data_root(args.data_root)),
                          space_with_target=args.space_with_target,
                          progress=not args.no_progress)
    except (CheckpointError, DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = lines_done(Path(args.output))
    print(f"{written} translations written now, {total} lines in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
