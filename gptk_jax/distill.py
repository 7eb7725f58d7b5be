"""Self-distillation data: the trunk's own greedy translations of the training sources.

    python -m gptk_jax.distill --checkpoint DIR --input PREFIX --output FILE \\
        [--max-pairs N] [--batch-size 16] [--tokens-per-step 4] [--chunk 256] \\
        [--max-new-tokens 128] [--shots 0] [--shots-prefix PREFIX] [--space-with-target] \\
        [--bos/--no-bos] [--num-shards N --shard-index I] [--redo-damaged]
    python -m gptk_jax.distill --output FILE --num-shards N --merge [--input PREFIX]

Line i of FILE is the trunk's greedy translation of line i of PREFIX.{src_lang}, so FILE can
replace PREFIX.{tgt_lang} in a training config (`config.data.train_target_files`); FILE.json
records the prompt format, model, decoding and progress (gptk_jax/distillation/). Use the
prompt format (--shots, --space-with-target, BOS) the heads will be trained and decoded with.
Decoding is exact: continuous batching over --batch-size slots with prompt-lookup drafts, W
tokens per verify step (--tokens-per-step, alias --k; 1: plain greedy; the decoder comes from
gptk_jax.decoding.factory). Resumable: a rerun continues where it stopped, once it has checked
that the sources and the lines written are those FILE.json fingerprints (else refused, naming the
first line that differs; --redo-damaged translates damaged lines again). FILE is written only if
this command created it (an existing FILE without its record is refused, untouched), and by one
run at a time: FILE.lock names the run holding it (a second one is refused with its PID).

Scale-out: N runs of the same command with --num-shards N and --shard-index 0..N-1 (one per host,
or one per accelerator: CUDA_VISIBLE_DEVICES=I) translate source lines I, I+N, I+2N, ... each,
into FILE.shardI-of-N with its own record FILE.shardI-of-N.json, and each resumes on its own. The
run that finds all N shards complete merges them into FILE and FILE.json, the file and record a
one-process run writes (its record adds the shards' sessions and "merged_from"); --merge does it
by hand and names a shard that is missing or incomplete, with its line counts
(gptk_jax/distillation/shards.py). --num-shards 1 is the one-process run.
Errors: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from gptk_jax.cli import OneLineParser, use_compilation_cache
from gptk_jax.data.root import add_data_root_argument, resolve_data_root
from gptk_jax.data.testsets import news_commentary
from gptk_jax.errors import CLI_ERRORS


def distill(checkpoint, input_prefix: str, output, *, max_pairs: Optional[int] = None,
            batch_size: int = 16, tokens_per_step: int = 4, chunk: int = 256,
            max_new_tokens: int = 128,
            src_lang: str = "de", tgt_lang: str = "en", shots: int = 0,
            shots_prefix=None, space_with_target: bool = False, bos: Optional[bool] = None,
            progress: bool = True, stop_after: Optional[int] = None,
            command: Sequence[str] = (), num_shards: int = 1,
            shard_index: Optional[int] = None, redo_damaged: bool = False,
            verify_weights: bool = True) -> dict:
    """Appends the translations of source lines [lines already in output, max_pairs) to
    `output`, holding its lock (FILE.lock) for the run; returns the record (FILE.json); with
    verify_weights False the checkpoint's tensor digests are not checked. num_shards N > 1:
    only lines shard_index, shard_index + N, ... into FILE.shardI-of-N (merged by the caller)."""
    from gptk_jax.data.prompts import prompt_format
    from gptk_jax.data.wmt import read_text_lines
    from gptk_jax.distillation.record import DistillError, output_lock, record_path
    from gptk_jax.distillation.shards import (check_shard_arguments, shard_path,
                                                  shard_sources)

    for name, value, low in (("--batch-size", batch_size, 1),
                             ("--tokens-per-step (--k)", tokens_per_step, 1),
                             ("--chunk", chunk, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--shots", shots, 0)):
        if value < low:
            raise DistillError(f"{name} must be >= {low}, got {value}")
    if max_pairs is not None and max_pairs < 1:
        raise DistillError(f"--max-pairs must be >= 1, got {max_pairs}")
    check_shard_arguments(num_shards, shard_index)
    source_path = f"{input_prefix}.{src_lang}"
    if Path(source_path).is_dir():
        raise DistillError(f"--input {input_prefix}: {source_path} is a folder; --input is the "
                           f"PREFIX of PREFIX.{src_lang}, a text file of source lines")
    sources = read_text_lines(source_path)
    if max_pairs is not None:
        sources = sources[:max_pairs]
    shard, all_sources = None, None
    if num_shards > 1:
        shard, all_sources = {"index": shard_index, "count": num_shards}, len(sources)
        sources = shard_sources(sources, shard_index, num_shards)
        output = shard_path(Path(output), shard_index, num_shards)
    output = Path(output)
    if output.exists() and not output.is_file():
        raise DistillError(f"--output {output} is not a file: choose a file for the translations")
    if record_path(output).exists() and not record_path(output).is_file():
        raise DistillError(f"{record_path(output)} is a folder, where distill keeps the record "
                           f"of --output {output}: remove it or choose another --output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from gptk_jax.files import os_error_text
        raise DistillError(os_error_text(e, output, "--output")) from None
    fmt = prompt_format(src_lang, tgt_lang, shots, space_with_target, shots_from=shots_prefix)
    with output_lock(output):
        return _distill_locked(checkpoint, fmt, source_path, sources, output, shard,
                               all_sources, bos=bos, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, tokens_per_step=tokens_per_step,
                               chunk=chunk, command=command, progress=progress,
                               stop_after=stop_after, redo_damaged=redo_damaged,
                               verify_weights=verify_weights)


def _distill_locked(checkpoint, fmt, source_path, sources, output, shard, all_sources, *, bos,
                    max_new_tokens, batch_size, tokens_per_step, chunk, command, progress,
                    stop_after, redo_damaged, verify_weights=True) -> dict:
    from gptk_jax.data.prompts import prompt_record, translation_stop_ids
    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.llama.weight_checks import verify_digests_arg
    from gptk_jax.distillation.generate import distill_sources
    from gptk_jax.distillation.record import (DistillPlan, check_resume, model_fingerprint,
                                              record_path)
    import hashlib

    if output.exists() and not record_path(output).is_file():   # refused before the model
        check_resume(None, output, sources)                      # loads, nothing changed
    model = load_converted(checkpoint, verify_digests=verify_digests_arg(verify_weights))
    stops = ",".join(map(str, translation_stop_ids(model.tokenizer)))
    plan = DistillPlan(
        input=str(Path(source_path).resolve()), sources=len(sources),
        prompt_format=prompt_record(fmt, model.tokenizer, bos),
        model=model_fingerprint(Path(checkpoint)), max_new_tokens=max_new_tokens,
        stop_ids_sha256=hashlib.sha256(stops.encode()).hexdigest()[:16],
        decoding={"batch_size": batch_size,
                  "drafter": "lookup" if tokens_per_step > 1 else "none",
                  "k": tokens_per_step, "chunk": chunk, "continuous": True},   # "k": W
        shard=shard, all_sources=all_sources)
    return distill_sources(model, fmt, sources, output, plan, batch_size=batch_size,
                           tokens_per_step=tokens_per_step, chunk=chunk, bos=bos,
                           command=command, progress=progress, stop_after=stop_after,
                           redo_damaged=redo_damaged)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m gptk_jax.distill",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="converted model folder (python -m convert)")
    p.add_argument("--input", help="PREFIX: reads PREFIX.<src-lang>")
    p.add_argument("--output", required=True, help="line-aligned translations (appended to)")
    p.add_argument("--max-pairs", type=int, default=None, help="first N source lines only")
    p.add_argument("--batch-size", type=int, default=16, help="decoding slots")
    p.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=int, default=4,
                   help="W, tokens per verify step with prompt-lookup drafts (1: plain greedy)")
    p.add_argument("--chunk", type=int, default=256,
                   help="sources per continuous run (written and recorded after each)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--src-lang", default="de")
    p.add_argument("--tgt-lang", default="en")
    p.add_argument("--shots", type=int, default=0, help="few-shot pairs (as in training)")
    p.add_argument("--shots-prefix", default=None,
                   help="few-shot pool PREFIX (default: News Commentary under the data root)")
    add_data_root_argument(p)
    p.add_argument("--space-with-target", action="store_true",
                   help="prompts end at 'en:' (as config.data.space_with_target in training)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend BOS to prompts (default: the tokenizer's add_bos)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many lines in this session (resume later)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--num-shards", type=int, default=1,
                   help="N runs share the work: this one translates every N-th source line")
    p.add_argument("--shard-index", type=int, default=None,
                   help="this run's shard, 0..N-1 (lines I, I+N, ... into OUTPUT.shardI-of-N)")
    p.add_argument("--redo-damaged", action="store_true",
                   help="translate again the chunk holding the first line of OUTPUT that "
                        "differs from what the record says was written (and those after it)")
    p.add_argument("--merge", action="store_true",
                   help="only merge the N complete shards of OUTPUT into OUTPUT (no model)")
    from gptk_jax.llama.weight_checks import add_verify_weights_argument
    add_verify_weights_argument(p)
    args = p.parse_args(argv)
    if args.merge and args.shard_index is not None:
        p.error("--merge merges every shard: drop --shard-index")
    if not args.merge:
        missing = [f"--{name}" for name in ("checkpoint", "input") if getattr(args, name) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def _merge(args) -> int:
    from gptk_jax.distillation.shards import merge_shards
    input_path = None if args.input is None else f"{args.input}.{args.src_lang}"
    record = merge_shards(Path(args.output), args.num_shards, input_path)
    print(f"merged {args.num_shards} shards into {args.output}: {record['lines_written']} "
          f"lines ({record['generated_tokens']} tokens, {record['seconds']:.0f} s of decoding)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    use_compilation_cache()
    from gptk_jax.distillation.shards import all_complete, read_shards, shard_path
    try:
        if args.merge:
            return _merge(args)
        shots_prefix = args.shots_prefix or (news_commentary(resolve_data_root(args.data_root))
                                             if args.shots else None)
        record = distill(args.checkpoint, args.input, args.output, max_pairs=args.max_pairs,
                         batch_size=args.batch_size, tokens_per_step=args.tokens_per_step,
                         chunk=args.chunk,
                         max_new_tokens=args.max_new_tokens, src_lang=args.src_lang,
                         tgt_lang=args.tgt_lang, shots=args.shots, shots_prefix=shots_prefix,
                         space_with_target=args.space_with_target, bos=args.bos,
                         progress=not args.no_progress, stop_after=args.stop_after,
                         command=["python", "-m", "gptk_jax.distill", *argv],
                         num_shards=args.num_shards, shard_index=args.shard_index,
                         redo_damaged=args.redo_damaged, verify_weights=args.verify_weights)
        session = record["sessions"][-1]
        rate = session["generated_tokens"] / max(session["seconds"], 1e-9)
        written = args.output if args.num_shards == 1 else \
            shard_path(Path(args.output), args.shard_index, args.num_shards)
        print(f"{session['lines']} lines now ({session['generated_tokens']} tokens, "
              f"{session['seconds']:.0f} s, {rate:.1f} tokens/s); {record['lines_written']} of "
              f"{record['sources']} lines in {written}")
        if args.num_shards > 1:
            if all_complete(Path(args.output), args.num_shards):
                from gptk_jax.locks import LockHeld
                try:
                    return _merge(args)
                except LockHeld as e:      # another shard's run is merging them right now
                    print(f"not merged here: {e}")
                    return 0
            waiting = [s.index for s in read_shards(Path(args.output), args.num_shards)
                       if s.record is None or s.lines_written() != s.expected(args.num_shards)]
            print(f"shards {waiting} of {args.num_shards} are not complete yet: the run that "
                  f"completes the last one merges them into {args.output} (or --merge)")
    except CLI_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
