"""Self-distillation data: the trunk's own greedy translations of the training sources.

    python -m gptk_jax.distill --checkpoint DIR --input PREFIX --output FILE \\
        [--max-pairs N] [--batch-size 16] [--tokens-per-step 4] [--chunk 256] \\
        [--max-new-tokens 128] [--shots 0] [--shots-prefix PREFIX] [--space-with-target] \\
        [--bos/--no-bos] [--num-shards N --shard-index I] [--redo-damaged]
    python -m gptk_jax.distill --output FILE --num-shards N --merge [--input PREFIX]

Line i of FILE is the trunk's greedy translation of line i of PREFIX.{src_lang}, so FILE can
replace PREFIX.{tgt_lang} in a training config (`config.data.train_target_files`); FILE.json
records the prompt format, model, decoding and progress (gptk_jax/distillation/; this command
parses flags and calls gptk_jax.distillation.run.distill). Use the prompt format (--shots,
--space-with-target, BOS) the heads will be trained and decoded with.
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
from gptk_jax.distillation.run import distill
from gptk_jax.errors import CLI_ERRORS


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m gptk_jax.distill", description=__doc__.split("\n")[0])
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
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
