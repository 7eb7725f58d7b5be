"""Greedy vs self-speculative (MTP) decoding of one model on a test set.

    python -m gptk_jax.evaluate --checkpoint DIR --heads DIR --output DIR
        [--split newstest2014 | --split wmt13 | --source FILE --reference FILE]
        [--data-root DIR] [--src-lang de] [--tgt-lang en] [--max-sentences N]
        [--batch-sizes 1,8] [--k K] [--max-new-tokens 128] [--lookup] [--oracle] [--continuous]

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
lines from News Commentary); a translation ends at the end of its line
(gptk_jax.data.prompts.translation_stop_ids). The work is done by gptk_jax.evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptk_jax.data.root import add_data_root_argument, resolve_data_root, sacrebleu_cache
from gptk_jax.evaluation import EvalConfig, markdown, run_evaluation, write_reports

DEFAULT_SPLIT = "newstest2014"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptk_jax.evaluate",
                                description=__doc__.split("\n\n")[0])
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
    p.add_argument("--k", type=int, default=None, help="tokens per step (default: heads' k)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--space-with-target", action=argparse.BooleanOptionalAction, default=None,
                   help="end prompts at 'en:' (the space goes with the target): for byte-level "
                        "BPE models such as SmolLM2 (default: what the heads were trained with, "
                        "read from heads.json; without heads: off)")
    p.add_argument("--bucket", type=int, default=32)
    p.add_argument("--dtype", default=None)
    p.add_argument("--oracle", action="store_true", help="also run the oracle drafter")
    p.add_argument("--lookup", action="store_true",
                   help="also run prompt-lookup drafting (decoding/lookup.py): alone, and in "
                        "front of the heads when --heads is given")
    p.add_argument("--lookup-k", type=int, default=None,
                   help="tokens per verify step of the lookup runs (default: K)")
    p.add_argument("--lookup-max-ngram", type=int, default=3)
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="heads draft over the N most frequent target-side tokens only (a "
                        "cheaper projection; the output is unchanged)")
    p.add_argument("--draft-vocab-from", default=None,
                   help="text whose tokens are counted (default: News Commentary's target side, "
                        "DATA_ROOT/wmt14-de-en/train/news-commentary.first10k.<tgt-lang>)")
    p.add_argument("--continuous", action="store_true",
                   help="batch sizes > 1 also run with continuous batching (slots refilled as "
                        "rows finish): greedy and each drafter but the oracle")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--output", required=True, help="report folder")
    return p


def parse_args(argv=None) -> EvalConfig:
    p = _parser()
    a = p.parse_args(argv)
    if (a.source is None) != (a.reference is None):
        p.error("--source and --reference go together")
    if a.source is not None and a.split is not None:
        p.error("give --split or --source/--reference, not both")
    data_root = resolve_data_root(a.data_root)
    cache = sacrebleu_cache(data_root)
    try:
        return EvalConfig(
            checkpoint=a.checkpoint, heads=a.heads, output=a.output, data_root=str(data_root),
            split=None if a.source else (a.split or DEFAULT_SPLIT), source=a.source,
            reference=a.reference, sacrebleu_cache=str(cache) if cache else None,
            src_lang=a.src_lang, tgt_lang=a.tgt_lang, max_sentences=a.max_sentences,
            batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")), k=a.k,
            max_new_tokens=a.max_new_tokens, shots=a.shots,
            space_with_target=a.space_with_target, bucket=a.bucket, dtype=a.dtype,
            oracle=a.oracle, lookup=a.lookup, lookup_k=a.lookup_k,
            lookup_max_ngram=a.lookup_max_ngram, draft_vocab_size=a.draft_vocab_size,
            draft_vocab_from=a.draft_vocab_from, continuous=a.continuous,
            progress=not a.no_progress)
    except ValueError as e:
        p.error(str(e))


def _exactness_code(report: dict) -> int:
    """0, or 1 when MTP's output differs from greedy in float32 (where exactness is promised)."""
    if report["all_identical_to_greedy"] and report["scores_identical"]:
        return 0
    differing = {name: f"{r['rows_differing_from_greedy']}/{report['num_sentences']}"
                 for name, r in report["runs"].items() if "rows_differing_from_greedy" in r}
    if report["dtype"] != "float32":
        print(f"note: in {report['dtype']}, rows whose MTP tokens differ from greedy: "
              f"{differing} (a K-token verify step rounds differently from 1-token steps)")
        return 0
    print(f"ERROR: MTP output differs from greedy in float32: {differing}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    from gptk_jax.data.wmt import DataError
    from gptk_jax.heads.io import HeadsError
    from gptk_jax.llama.checkpoint import CheckpointError

    cfg = parse_args(argv)
    try:
        report = run_evaluation(cfg)
    except (DataError, FileNotFoundError, CheckpointError, HeadsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_reports(report, Path(cfg.output))
    print(markdown(report))
    print(f"wrote {cfg.output}/report.json, report.md, acceptance.png, translations.jsonl")
    return _exactness_code(report)


if __name__ == "__main__":
    sys.exit(main())
