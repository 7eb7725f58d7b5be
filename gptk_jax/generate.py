"""python -m gptk_jax.generate: continue prompts with a converted model; text out, JSON lines out.

    python -m gptk_jax.generate --checkpoint .cache/models/smollm2-135m \\
        --prompt "The capital of France is" --max-new-tokens 32
    python -m gptk_jax.generate --checkpoint DIR --input-file prompts.txt --batch-size 8 \\
        --max-new-tokens 64 --output-json out.jsonl
    python -m gptk_jax.generate --checkpoint DIR --decoding mtp --heads HEADS_DIR \\
        [--tokens-per-step 3] --input-file prompts.txt --batch-size 8 --max-new-tokens 64 \\
        --output-json out.jsonl
    python -m gptk_jax.generate --checkpoint DIR --decoding lookup [--heads HEADS_DIR] \\
        [--tokens-per-step 6] …
    python -m gptk_jax.generate … --input-file prompts.txt --batch-size 8 --continuous

`--input-file`: one prompt per line (split on '\\n' only, '\\r' stripped, blank lines skipped), or a
`.jsonl` file whose lines are JSON strings or objects with a "prompt" field (for prompts that hold
newlines). Prompts are encoded under the tokenizer's own BOS rule (`add_bos`; SmolLM2: none,
Llama 3: BOS), `--bos` / `--no-bos` override it. Every prompt is encoded and checked against the
model's vocabulary before anything is decoded: one that cannot be encoded (not valid UTF-8 text,
a lone surrogate) or holds an id the embedding lacks is refused with its index, exit code 2.

Each JSON line has the prompt, the generated ids (stop token excluded), their text, why the row
stopped and its batch's timing (prefill s, decode s, tokens/s over prefill + decode; compilation
reported apart). Lines are appended (and flushed) to OUT.partial as each batch finishes, and
OUT.partial becomes OUT when every prompt is done: a run that fails leaves OUT.partial (the
prompts finished so far), never an OUT that looks complete. `--continuous` serves all prompts
through `--batch-size` slots refilled as rows finish (decoding/continuous.py): each prompt's line
goes to OUT.partial as its row finishes (in finishing order, without timing: the run is one
batch, timed at its end); when all are done OUT is written whole, in prompt order, every line
with the run's timing.

Decoders are looked up in DECODERS by `--decoding`: a builder (args, model) -> decode function
(prompt ids, batch_size) -> result with the fields of `decoding.GenerationResult`; each builder
holds one `decoding.Decoder`, made by `decoding.factory.make_decoder` from the run's
`DecoderSpec` (`decoder_spec`: the flags), so every batch of a run reuses its executables.
`--tokens-per-step` (alias `--k`) is W, the tokens per verify step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from gptk_jax.cli import OneLineParser, use_compilation_cache
from gptk_jax.errors import CLI_ERRORS, GptkError
from gptk_jax.data.prompt_files import encode_all, read_prompt_lines
from gptk_jax.files import JsonLines

# (prompt ids, batch_size, on_row=None) -> GenerationResult-like; with --continuous, on_row(i,
# RowRecord) is called as prompt i (of this call) finishes
DecodeFn = Callable[..., object]


def decoder_spec(args: argparse.Namespace):
    """The run's `DecoderSpec` (decoding/factory.py) from the flags: --decoding lookup with
    --heads is 'mtp+lookup' (the heads draft where the lookup finds nothing); flags another
    method does not use are ignored."""
    from gptk_jax.decoding.factory import DecoderSpec

    method = args.decoding
    if method == "mtp" and not args.heads:
        raise UsageError("--decoding mtp needs --heads DIR (heads saved by gptk_jax.heads.io)")
    if method == "lookup" and args.heads:
        method = "mtp+lookup"
    if method == "greedy":
        return DecoderSpec("greedy")
    lookup = {"lookup_max_ngram": args.lookup_max_ngram} if "lookup" in method else {}
    return DecoderSpec(method, tokens_per_step=args.tokens_per_step,
                       heads=str(args.heads) if args.heads else None, **lookup)


def build_decoder(args: argparse.Namespace, model) -> DecodeFn:
    """One Decoder (decoding/engine.py, made by decoding.factory.make_decoder) for the whole
    run: it compiles once per batch shape. mtp: self-speculative decoding with trained heads
    (greedy's tokens, fewer trunk calls; rows also carry verify steps and accepted drafts per
    step); lookup: prompt-lookup drafts (decoding/lookup.py) in the same draft-verify loop,
    drafts being the tokens that followed the latest earlier occurrence of the last n tokens
    (prompt included); with --heads, offsets the lookup cannot fill come from the heads."""
    from gptk_jax.decoding import factory

    return _decode_fn(args, factory.make_decoder(model, decoder_spec(args)))


def _decode_fn(args: argparse.Namespace, decoder) -> DecodeFn:
    """Static batches, or with --continuous every prompt through `batch_size` continuously
    refilled slots (with a progress bar over prompts)."""
    def decode(prompt_ids: list, batch_size: int, on_row=None):
        if not args.continuous:
            return decoder.generate(prompt_ids, args.max_new_tokens, padding=args.padding,
                                    bucket=args.bucket, batch_size=batch_size)
        from tqdm import tqdm
        with tqdm(total=len(prompt_ids), desc=args.decoding, unit="prompt", file=sys.stderr,
                  disable=len(prompt_ids) < 2) as bar:
            return decoder.generate_continuous(prompt_ids, args.max_new_tokens,
                                               batch_size=batch_size, padding=args.padding,
                                               bucket=args.bucket, on_finished=bar.update,
                                               on_row=on_row)
    return decode


build_greedy = build_decoder   # one builder for every --decoding (decoder_spec reads it)

DEFAULT_LOOKUP_TOKENS_PER_STEP = 4   # decoding.factory's (not imported here: it loads JAX)
DECODERS: dict[str, Callable[[argparse.Namespace, object], DecodeFn]] = {
    "greedy": build_decoder, "mtp": build_decoder, "lookup": build_decoder}


class UsageError(GptkError):
    """Bad command-line input (reported as one line, exit code 2)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m gptk_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted model folder (python -m convert)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--input-file", type=Path, help="prompts: one per line, or .jsonl")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per decoding batch")
    p.add_argument("--continuous", action="store_true",
                   help="continuous batching: --batch-size slots, each refilled with the next "
                        "prompt as soon as its row finishes (same tokens; more throughput)")
    p.add_argument("--output-json", type=Path,
                   help="one JSON line per prompt: OUT.partial while decoding, OUT when done")
    p.add_argument("--decoding", choices=sorted(DECODERS), default="greedy")
    p.add_argument("--heads", type=Path, default=None,
                   help="--decoding mtp: trained heads folder (gptk_jax.heads.io); "
                        "--decoding lookup: heads that draft where the lookup finds nothing")
    p.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=int, default=None,
                   help="tokens per verify step W, >= 2 (--decoding mtp: default and maximum the "
                        f"heads' k; --decoding lookup: default {DEFAULT_LOOKUP_TOKENS_PER_STEP})")
    p.add_argument("--lookup-max-ngram", type=int, default=3,
                   help="--decoding lookup: longest n-gram matched")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--padding", choices=["left", "right"], default="left")
    p.add_argument("--bucket", type=int, default=32,
                   help="round prompt lengths up to a multiple of this (fewer compilations)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend the BOS token (default: the tokenizer's own rule, add_bos)")
    p.add_argument("--quiet", action="store_true", help="no per-prompt text on stdout")
    from gptk_jax.llama.weight_checks import add_verify_weights_argument
    add_verify_weights_argument(p)
    args = p.parse_args(argv)
    for name, value, least in (("--max-new-tokens", args.max_new_tokens, 1),
                               ("--batch-size", args.batch_size, 1), ("--bucket", args.bucket, 1),
                               ("--lookup-max-ngram", args.lookup_max_ngram, 1)):
        if value < least:
            p.error(f"{name} must be >= {least}, got {value}")
    if args.tokens_per_step is not None and args.tokens_per_step < 2:
        p.error(f"--tokens-per-step (--k) must be >= 2 (the trunk's token + at least one draft "
                f"per verify step), got {args.tokens_per_step}; leave it out for the default")
    return args


def run(args: argparse.Namespace, prompts: list[str], ids: list[list[int]], model,
        decode: DecodeFn, out=sys.stdout, on_record: Callable[[dict], None] = lambda r: None
        ) -> list[dict]:
    """Decodes the encoded prompts in batches; returns one record per prompt. Each is given
    to `on_record` as soon as its batch is done; with --continuous, as its row finishes (then
    without the run's timing, known only at the end: the returned records have it)."""
    from tqdm import tqdm

    from gptk_jax.decoding.records import batch_records, row_record

    how = {"decoding": args.decoding, "batch_size": args.batch_size,
           "continuous": args.continuous}

    def show(record):
        if not args.quiet:
            print(f"=== [{record['index']}] {record['prompt']}\n{record['text']}", file=out,
                  flush=True)

    if args.continuous:   # one call serves every prompt through batch_size slots
        stop_set = set(model.tokenizer.stop_ids)

        def on_row(i, row):
            record = row_record(i, prompts, ids, model.tokenizer, row, stop_set,
                                decoding=args.decoding, batch_size=args.batch_size)
            on_record(record)
            show(record)

        rows = list(range(len(prompts)))
        result = decode(ids, args.batch_size, on_row=on_row)
        return batch_records(0, rows, prompts, ids, model.tokenizer, result, **how)
    records = []
    batches = [list(range(i, min(i + args.batch_size, len(prompts))))
               for i in range(0, len(prompts), args.batch_size)]
    for batch_index, rows in enumerate(tqdm(batches, desc=args.decoding, unit="batch",
                                            file=sys.stderr, disable=len(batches) < 2)):
        result = decode([ids[i] for i in rows], args.batch_size)
        for record in batch_records(batch_index, rows, prompts, ids, model.tokenizer, result,
                                    **how):
            records.append(record)
            on_record(record)
            show(record)
    return records


def load_prompts(args: argparse.Namespace) -> tuple[list[str], Optional[list[str]]]:
    """The prompts and, from --input-file, where each one is (FILE:LINE)."""
    if args.prompt:
        return list(args.prompt), None
    lines = read_prompt_lines(args.input_file)
    return [p for _, p in lines], [f"{args.input_file}:{n}" for n, _ in lines]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    use_compilation_cache()
    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.llama.weight_checks import verify_digests_arg

    output = None
    try:
        prompts, where = load_prompts(args)
        output = JsonLines(args.output_json)
        start = time.perf_counter()
        model = load_converted(args.checkpoint, dtype=args.dtype,
                               verify_digests=verify_digests_arg(args.verify_weights))
        print(f"loaded {model.path} in {time.perf_counter() - start:.1f}s "
              f"({model.config.n_layers} layers, dim {model.config.dim}, "
              f"compute {model.config.dtype})", file=sys.stderr)
        ids = encode_all(prompts, model, args.bos, where)
        decode = DECODERS[args.decoding](args, model)
        records = run(args, prompts, ids, model, decode, on_record=output.write)
        output.finish(records if args.continuous else None)   # continuous: OUT in prompt order
    except CLI_ERRORS as e:
        kept = output.abandon() if output is not None else ""
        print(f"error: {e}{kept}".replace("\n", " "), file=sys.stderr)
        return 2
    except BaseException:   # a bug or ^C: its traceback, and no empty OUT.partial left behind
        if output is not None:
            output.abandon()
        raise
    from gptk_jax.decoding.records import summarize
    print(summarize(records), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
