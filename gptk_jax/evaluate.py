"""Greedy vs self-speculative (MTP) decoding of one model on a test set.

    python -m gptk_jax.evaluate --checkpoint DIR --heads DIR --output DIR
        [--split newstest2014 | --split wmt13 | --source FILE --reference FILE]
        [--data-root DIR] [--src-lang de] [--tgt-lang en] [--max-sentences N]
        [--batch-sizes 1,8] [--tokens-per-step W] [--max-new-tokens 128] [--lookup [--tree]]
        [--oracle] [--continuous] [--interleave [--continuous-repeats N]] [--choose-width]

For each batch size: greedy, then MTP with the trained heads, over the same prompts. Reported:
BLEU and chrF (sacreBLEU, signatures printed) — identical for greedy and MTP by construction,
and checked token for token; τ (tokens per verify step, the bonus token included), the
accepted-length histogram, per-offset conditional acceptance, tokens/s (compilation excluded)
and MTP's speedup over greedy. Writes DIR/report.json, DIR/report.md, DIR/acceptance.png and
DIR/translations.jsonl (one line per sentence: source, reference, hypothesis, per-step
acceptance). `--continuous` adds, for batch sizes > 1, the same methods through continuously
refilled slots (`<method>/b<B>/continuous`; speedups there are over continuous greedy).

Test sets: `--split` newstest2013 / newstest2014 (DATA_ROOT/wmt14-de-en/<split>.{de,en}) or any
sacreBLEU test set name (wmt12, wmt13, wmt14/full, ...: read through sacreBLEU from $SACREBLEU,
else DATA_ROOT/sacrebleu, else ~/.sacrebleu); or `--source FILE --reference FILE`, a user's
line-aligned pair. The data root: --data-root, else $GPTK_DATA, else ../shared/data from the
working directory. The report names what was evaluated (`test_set`).

Prompts use the research format of gptk_jax.data.prompts (`de: {src}; en: `, optional few-shot
lines from News Commentary), with BOS exactly when the tokenizer's rule says (`add_bos`: what
training rows start with; `--bos` / `--no-bos` override it); report.json records the prompt format
and a warning names what differs from the format heads.json recorded. A translation ends at the
end of its line (gptk_jax.data.prompts.translation_stop_ids). The work is done by
gptk_jax.evaluation.

The report folder is checked writable before anything loads; each run (method x batch size) is
written to DIR/runs/ as it finishes, and a rerun with the same settings reuses those files
(gptk_jax.evaluation.store says what "same" covers). Bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from gptk_jax.cli import OneLineParser, use_compilation_cache
from gptk_jax.data.root import add_data_root_argument, resolve_data_root, sacrebleu_cache
from gptk_jax.errors import CLI_ERRORS
from gptk_jax.evaluation import EvalConfig, markdown, run_evaluation, write_reports
from gptk_jax.evaluation.config import AT_LEAST

DEFAULT_SPLIT = "newstest2014"
ALIASES = {"--tokens-per-step": "--k", "--lookup-tokens-per-step": "--lookup-k"}  # still accepted


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m gptk_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted trunk folder")
    p.add_argument("--heads", default=None, help="trained heads folder (heads_io)")
    p.add_argument("--split", default=None,
                   help=f"newstest2013 or newstest2014 (files in the data root), or a sacreBLEU "
                        f"test set name such as wmt13, wmt14/full (default: {DEFAULT_SPLIT})")
    p.add_argument("--source", default=None, help="your own source file (one segment a line)")
    p.add_argument("--reference", default=None, help="its line-aligned reference file")
    add_data_root_argument(p)
    p.add_argument("--src-lang", default="de")
    p.add_argument("--tgt-lang", default="en")
    p.add_argument("--max-sentences", type=int, default=None)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=int, default=None,
                   help="W, tokens per verify step (default: the heads' k)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--space-with-target", action=argparse.BooleanOptionalAction, default=None,
                   help="end prompts at 'en:' (the space goes with the target): for byte-level "
                        "BPE models such as SmolLM2 (default: what the heads were trained with, "
                        "read from heads.json; without heads: off)")
    p.add_argument("--bucket", type=int, default=32)
    p.add_argument("--dtype", default=None)
    _drafter_arguments(p)
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend the BOS token (default: the tokenizer's own rule, add_bos, "
                        "as training does)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--output", required=True, help="report folder")
    from gptk_jax.llama.weight_checks import add_verify_weights_argument
    add_verify_weights_argument(p)
    return p


def _drafter_arguments(p: argparse.ArgumentParser) -> None:
    """Which drafters run beside the heads, and how W is chosen."""
    p.add_argument("--oracle", action="store_true", help="also run the oracle drafter")
    p.add_argument("--lookup", action="store_true",
                   help="also run prompt-lookup drafting (decoding/lookup.py): alone, and in "
                        "front of the heads when --heads is given")
    p.add_argument("--lookup-tokens-per-step", "--lookup-k", dest="lookup_tokens_per_step",
                   type=int, default=None,
                   help="tokens per verify step of the lookup runs (default: --tokens-per-step)")
    p.add_argument("--lookup-max-ngram", type=int, default=3)
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="run only these of the drafting methods the other flags ask for, "
                        "comma-separated: mtp, lookup, heads+lookup, heads+lookup-tree "
                        "(greedy always runs; e.g. --lookup --tree --only heads+lookup-tree)")
    p.add_argument("--tree", action="store_true",
                   help="with --lookup and --heads: also verify the lookup's and the heads' "
                        "drafts together, two branches per step (decoding/tree.py), the "
                        "heads at their W, the lookup at --lookup-tokens-per-step "
                        "('heads+lookup-tree')")
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="heads draft over the N most frequent target-side tokens only (a "
                        "cheaper projection; the output is unchanged)")
    p.add_argument("--draft-vocab-from", default=None,
                   help="text whose tokens are counted (default: News Commentary's target side, "
                        "DATA_ROOT/wmt14-de-en/train/news-commentary.first10k.<tgt-lang>)")
    p.add_argument("--continuous", action="store_true",
                   help="batch sizes > 1 also run with continuous batching (slots refilled as "
                        "rows finish): greedy and each drafter but the oracle")
    p.add_argument("--interleave", action="store_true",
                   help="static batches in turns: greedy's batch, then each drafter's on the "
                        "same prompts, then the next batch (a machine whose speed drifts "
                        "slows every method alike; the oracle still runs after); with "
                        "--continuous, greedy's continuous run also runs before and after "
                        "each drafter's, and the drafter is timed against their mean")
    p.add_argument("--continuous-repeats", type=int, default=1, metavar="N",
                   help="with --interleave --continuous: each drafter's continuous run and "
                        "greedy's after it N times; its speedup is the mean of the N bracketed "
                        "ratios, reported with their sd (one comparison moves by several %%)")
    p.add_argument("--choose-width", action="store_true",
                   help="the drafters (not the oracle) choose W per step, 1 .. --tokens-per-step,"
                        " by expected tokens per second from measured step costs "
                        "(gptk_jax/decoding/width.py)")
    p.add_argument("--verify-cost", default=None,
                   help="with --choose-width: a step-cost table (bench/bench_verify_cost.py "
                        "--calibration-json); default: measured at start")
    p.add_argument("--score-bins", type=int, default=8,
                   help="with --choose-width: W reads each draft's score (heads: its softmax "
                        "probability; lookup: found or not) in this many bins, calibrated "
                        "against what verification accepts; 1: scores ignored (pooled "
                        "acceptance)")
    p.add_argument("--drafter-weights", choices=("float32", "bfloat16"), default="float32",
                   help="the heads' weights while decoding: bfloat16 halves the bytes a draft "
                        "step reads (the few-row kernels widen them as they load them); the "
                        "output is greedy's either way (the trunk verifies in float32)")


def parse_args(argv=None) -> EvalConfig:
    p = _parser()
    a = p.parse_args(argv)
    if (a.source is None) != (a.reference is None):
        p.error("--source and --reference go together")
    if a.source is not None and a.split is not None:
        p.error("give --split or --source/--reference, not both")
    for flag, value in (("--max-sentences", a.max_sentences),
                        ("--tokens-per-step", a.tokens_per_step),
                        ("--max-new-tokens", a.max_new_tokens), ("--shots", a.shots),
                        ("--bucket", a.bucket),
                        ("--lookup-tokens-per-step", a.lookup_tokens_per_step),
                        ("--lookup-max-ngram", a.lookup_max_ngram),
                        ("--draft-vocab-size", a.draft_vocab_size),
                        ("--continuous-repeats", a.continuous_repeats)):
        least = AT_LEAST[flag[2:].replace("-", "_")]
        if value is not None and value < least:
            alias = ALIASES.get(flag)
            p.error(f"{flag}{f' ({alias})' if alias else ''} must be >= {least}, got {value}")
    if a.tree and not (a.lookup and a.heads):
        p.error("--tree verifies the lookup's and the heads' drafts together: give --lookup and "
                "--heads too")
    batch_sizes = _batch_sizes(p, a.batch_sizes)
    data_root = resolve_data_root(a.data_root)
    cache = sacrebleu_cache(data_root)
    try:
        return EvalConfig(
            checkpoint=a.checkpoint, heads=a.heads, output=a.output, data_root=str(data_root),
            split=None if a.source else (a.split or DEFAULT_SPLIT), source=a.source,
            reference=a.reference, sacrebleu_cache=str(cache) if cache else None,
            src_lang=a.src_lang, tgt_lang=a.tgt_lang, max_sentences=a.max_sentences,
            batch_sizes=batch_sizes, tokens_per_step=a.tokens_per_step,
            max_new_tokens=a.max_new_tokens, shots=a.shots,
            space_with_target=a.space_with_target, bucket=a.bucket, dtype=a.dtype,
            oracle=a.oracle, lookup=a.lookup, lookup_tokens_per_step=a.lookup_tokens_per_step,
            tree=a.tree, only=None if a.only is None else tuple(
                name.strip() for name in a.only.split(",") if name.strip()),
            lookup_max_ngram=a.lookup_max_ngram, draft_vocab_size=a.draft_vocab_size,
            draft_vocab_from=a.draft_vocab_from, continuous=a.continuous, bos=a.bos,
            choose_width=a.choose_width, verify_cost=a.verify_cost, interleave=a.interleave,
            continuous_repeats=a.continuous_repeats,
            score_bins=a.score_bins, drafter_weights=a.drafter_weights,
            progress=not a.no_progress,
            verify_weights=a.verify_weights,
            command=" ".join(["python -m gptk_jax.evaluate"] + [shlex.quote(x) for x in (
                sys.argv[1:] if argv is None else argv)]))
    except ValueError as e:
        p.error(str(e))


def _batch_sizes(p: argparse.ArgumentParser, text: str) -> tuple:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        p.error(f"--batch-sizes must be positive integers separated by commas, got {text!r}")
    if min(sizes) < 1:
        p.error(f"--batch-sizes must be >= 1 each, got {text!r}")
    return sizes


def _exactness_code(report: dict) -> int:
    """0, or 1 when MTP's output differs from greedy in float32 (where exactness is promised)."""
    if report["all_identical_to_greedy"] and report["scores_identical"]:
        return 0
    differing = {name: f"{r['rows_differing_from_greedy']}/{report['num_sentences']}"
                 for name, r in report["runs"].items() if "rows_differing_from_greedy" in r}
    if report["dtype"] != "float32":
        print(f"note: in {report['dtype']}, rows whose MTP tokens differ from greedy: "
              f"{differing} (a W-token verify step rounds differently from 1-token steps)")
        return 0
    print(f"ERROR: MTP output differs from greedy in float32: {differing}", file=sys.stderr)
    return 1


def check_inputs(cfg: EvalConfig) -> None:
    """The cheap checks, before any model loads: the report folder can be written, the
    checkpoint is a converted model, the heads folder is one."""
    from gptk_jax.evaluation.store import check_output_folder
    from gptk_jax.heads.io import read_heads_meta
    from gptk_jax.llama.checkpoint import load_config

    check_output_folder(cfg.output)
    load_config(cfg.checkpoint)
    if cfg.heads:
        read_heads_meta(cfg.heads)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    use_compilation_cache()
    try:
        check_inputs(cfg)
        report = run_evaluation(cfg)
        write_reports(report, Path(cfg.output))
    except CLI_ERRORS as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"wrote {cfg.output}/report.json, report.md, acceptance.png, translations.jsonl "
          f"(runs: {cfg.output}/runs/)")
    return _exactness_code(report)


if __name__ == "__main__":
    sys.exit(main())
