"""Greedy vs self-speculative (MTP) decoding of one model on a WMT test set.

    python -m gptk_jax.evaluate --checkpoint DIR --heads DIR --split newstest2014 \\
        --max-sentences N --batch-sizes 1,8 --output DIR [--k K] [--max-new-tokens 128] \\
        [--lookup] [--oracle] [--continuous]

For each batch size: greedy, then MTP with the trained heads, over the same prompts. Reported:
BLEU and chrF (sacreBLEU, signatures printed) — identical for greedy and MTP by construction,
and checked token for token; τ (tokens per verify step, the bonus token included), the
accepted-length histogram, per-offset conditional acceptance, tokens/s (compilation excluded)
and MTP's speedup over greedy. Writes DIR/report.json, DIR/report.md, DIR/acceptance.png and
DIR/translations.jsonl (one line per sentence: source, reference, hypothesis, per-step
acceptance). `--continuous` adds, for batch sizes > 1, the same methods through continuously
refilled slots (`<method>/b<B>/continuous`; speedups there are over continuous greedy).

Prompts use the research format of gptk_jax.data.prompts (`de: {src}; en: `, optional few-shot
lines); a translation ends at the first newline, so pure-newline tokens are stop ids next to the
tokenizer's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("GPTK_DATA", ROOT.parent / "shared" / "data"))
SPLITS = ("newstest2013", "newstest2014")


@dataclasses.dataclass
class EvalConfig:
    checkpoint: str
    heads: Optional[str]
    output: str
    split: str = "newstest2014"
    src_lang: str = "de"
    tgt_lang: str = "en"
    max_sentences: Optional[int] = None
    batch_sizes: tuple = (1, 8)
    k: Optional[int] = None               # tokens per verify step; default: the heads' k
    max_new_tokens: int = 128
    shots: int = 0                        # few-shot lines from the News Commentary head
    space_with_target: Optional[bool] = None  # prompt ends 'en:' (byte-level BPE models,
                                              # SmolLM2); None: as the heads were trained, else False
    bucket: int = 32                      # prompt length bucket (fewer compilations)
    dtype: Optional[str] = None           # compute dtype (exactness is promised for float32)
    oracle: bool = False                  # also run the oracle drafter (upper bound for K)
    lookup: bool = False                  # also run prompt-lookup drafting: alone ("lookup")
                                          # and in front of the heads ("heads+lookup")
    lookup_k: Optional[int] = None        # tokens per step of the lookup runs (default: K)
    lookup_max_ngram: int = 3
    draft_vocab_size: Optional[int] = None  # heads draft over the N most frequent target tokens
    draft_vocab_from: Optional[str] = None  # of this text file (default: News Commentary .en)
    continuous: bool = False              # batch sizes > 1 also run with continuous batching
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Data, prompts, stop ids, text
# --------------------------------------------------------------------------------------------

def load_split(split: str, src_lang: str, tgt_lang: str, max_sentences: Optional[int]):
    from gptk_jax.data.wmt import read_parallel_text
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return read_parallel_text(DATA / "wmt14-de-en" / split, src_lang, tgt_lang,
                              max_pairs=max_sentences).pairs


def prompt_format(src_lang: str, tgt_lang: str, shots: int, space_with_target: bool = False):
    from gptk_jax.data.prompts import PromptFormat, few_shot_from
    from gptk_jax.data.wmt import read_parallel_text
    pool = ()
    if shots:
        train = read_parallel_text(DATA / "wmt14-de-en" / "train" / "news-commentary.first10k",
                                   src_lang, tgt_lang)
        pool = few_shot_from(train.pairs, shots)
    return PromptFormat.for_languages(src_lang, tgt_lang, shots=pool,
                                      space_with_target=space_with_target)


def translation_stop_ids(tokenizer) -> list[int]:
    """The tokenizer's stop ids plus every token that is only whitespace holding a newline."""
    newline = set()
    for i in range(tokenizer.vocab_size):
        try:
            text = tokenizer.decode([i])
        except Exception:  # special or unused ids some tokenizers cannot decode alone
            continue
        if "\n" in text and not text.strip():
            newline.add(i)
    return sorted(set(tokenizer.stop_ids) | newline)


DRAFT_VOCAB_TEXT = DATA / "wmt14-de-en" / "train" / "news-commentary.first10k.en"


def build_draft_vocab(tokenizer, size: int, space_with_target: bool,
                      path: Optional[str] = None) -> tuple[tuple[int, ...], Path]:
    """The `size` most frequent target-side tokens of training text (never the test set; default
    News Commentary English), stop ids included -> (ids, the text's path)."""
    from gptk_jax.data.wmt import read_text_lines
    from gptk_jax.decoding.draft_vocab import frequent_token_ids
    path = Path(path or DRAFT_VOCAB_TEXT)
    if not path.is_file():
        raise FileNotFoundError(f"--draft-vocab-from {path}: no such file")
    ids = frequent_token_ids(tokenizer, read_text_lines(path), size,
                             prefix=" " if space_with_target else "",
                             always=translation_stop_ids(tokenizer))
    print(f"draft vocabulary: the {len(ids)} most frequent tokens of {path} (stop ids included)",
          flush=True)
    return ids, path


def hypothesis_text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids)).split("\n")[0].strip()


# --------------------------------------------------------------------------------------------
# Decoding runs
# --------------------------------------------------------------------------------------------

def decode_all(generate: Callable, prompts: list, batch: int, desc: str, progress: bool):
    """generate(chunk, batch_size) -> GenerationResult for each chunk of `batch` prompts."""
    from tqdm import tqdm
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    return [generate(c, batch) for c in tqdm(chunks, desc=desc, disable=not progress,
                                             unit="batch", leave=False)]


def pooled(results: list) -> dict:
    """Totals of a list of GenerationResult / MTPResult."""
    tokens = sum(r.total_generated for r in results)
    seconds = sum(r.prefill_seconds + r.decode_seconds for r in results)
    return {"tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "compile_seconds": sum(r.compile_seconds for r in results),
            "trunk_calls": sum(r.num_steps for r in results)}


def mtp_summary(results: list, k: int) -> dict:
    from gptk_jax.decoding.acceptance import acceptance_stats
    accepted = [a for r in results for row in r.stats["accepted_per_row"] for a in row]
    emitted = [e for r in results for row in r.stats["emitted_per_row"] for e in row]
    return acceptance_stats(accepted, emitted, num_drafts=k - 1)


def score(hyps: list[str], refs: list[str]) -> dict:
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def resolve_space_with_target(given: Optional[bool], heads_metadata: Optional[dict]) -> bool:
    """The prompt boundary to decode with: the flag when given, else what the heads were trained
    with (heads.json records the training config), else False. Prints the choice and warns when
    the flag contradicts the heads (drafts then start from a shifted boundary: low acceptance)."""
    trained = None
    if heads_metadata:
        trained = ((heads_metadata.get("config") or {}).get("data") or {}).get(
            "space_with_target")
    if given is None:
        chosen = bool(trained) if trained is not None else False
        why = "as the heads were trained (heads.json)" if trained is not None else "default"
    else:
        chosen, why = bool(given), "flag"
        if trained is not None and bool(trained) != chosen:
            print(f"warning: --{'' if chosen else 'no-'}space-with-target, but the heads were "
                  f"trained with space_with_target={bool(trained)}", flush=True)
    print(f"prompt: space_with_target={chosen} ({why})", flush=True)
    return chosen


def run_evaluation(cfg: EvalConfig) -> dict:
    import jax

    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.decoding.greedy import greedy_generate
    from gptk_jax.decoding.lookup import LookupDrafter
    from gptk_jax.decoding.mtp import mtp_generate
    from gptk_jax.heads.io import head_drafter, load_heads

    model = load_converted(cfg.checkpoint, dtype=cfg.dtype)
    config, params, tok = model.config, model.params, model.tokenizer
    trunk_name = Path(cfg.checkpoint).name
    drafters = {}   # name -> (drafter, variables, K)
    k = cfg.k
    if cfg.heads:
        heads = load_heads(cfg.heads, config, trunk_name)
        k = k or heads.head_config.k
    space_with_target = resolve_space_with_target(cfg.space_with_target,
                                                  heads.metadata if cfg.heads else None)
    draft_vocab = draft_vocab_path = None
    if cfg.draft_vocab_size:
        draft_vocab, draft_vocab_path = build_draft_vocab(tok, cfg.draft_vocab_size,
                                                          space_with_target, cfg.draft_vocab_from)
    if cfg.heads:
        drafters["mtp"] = head_drafter(heads.head_config, heads.params, config, params, k,
                                       draft_vocab=draft_vocab) + (k,)
    if k is None:
        raise ValueError("give --heads (K defaults to the heads' k) or --k with --oracle or "
                         "--lookup")
    if cfg.lookup:
        lk = cfg.lookup_k or k
        drafters["lookup"] = (LookupDrafter(lk - 1, max_ngram=cfg.lookup_max_ngram),
                              LookupDrafter.variables(), lk)
        if cfg.heads:
            fallback, fallback_vars, _ = drafters["mtp"]
            drafters["heads+lookup"] = (LookupDrafter(lk - 1, max_ngram=cfg.lookup_max_ngram,
                                                      fallback=fallback),
                                        LookupDrafter.variables(fallback_vars), lk)
    if not drafters and not cfg.oracle:
        raise ValueError("nothing to compare: give --heads, --lookup and/or --oracle")

    pairs = load_split(cfg.split, cfg.src_lang, cfg.tgt_lang, cfg.max_sentences)
    fmt = prompt_format(cfg.src_lang, cfg.tgt_lang, cfg.shots, space_with_target)
    prompts = [tok.encode(fmt.prompt_text(p.src), bos=True) for p in pairs]
    refs = [p.tgt for p in pairs]
    stop_ids = translation_stop_ids(tok)
    common = dict(max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids, pad_id=tok.pad_id)
    print(f"{trunk_name}: {len(pairs)} sentences of {cfg.split} {cfg.src_lang}->{cfg.tgt_lang}, "
          f"K={k}, {len(stop_ids)} stop ids, {jax.devices()[0].platform}, dtype {config.dtype}",
          flush=True)

    runs, outputs = {}, {}   # outputs: run name -> (tokens per prompt, row records or None)
    for batch in cfg.batch_sizes:
        greedy = decode_all(lambda c, b: greedy_generate(
            config, params, c, bucket=cfg.bucket, batch_size=b, **common),
            prompts, batch, f"greedy b={batch}", cfg.progress)
        greedy_tokens = [t for r in greedy for t in r.tokens]
        runs[f"greedy/b{batch}"] = {"method": "greedy", "batch_size": batch, **pooled(greedy)}
        outputs[f"greedy/b{batch}"] = (greedy_tokens, None)
        methods = dict(drafters)
        if cfg.oracle:
            methods["oracle"] = None
        known_stop_tokens = None
        for name, drafter in methods.items():
            if name == "oracle":
                results = decode_all(_oracle_generate(config, params, greedy, known_stop_tokens,
                                                      k, cfg, common),
                                     prompts, batch, f"oracle b={batch}", cfg.progress)
            else:
                results = decode_all(lambda c, b, d=drafter: mtp_generate(
                    config, params, d[0], d[1], c, num_tokens_per_step=d[2], bucket=cfg.bucket,
                    batch_size=b, **common), prompts, batch, f"{name} b={batch}", cfg.progress)
                known_stop_tokens = [r.stop_tokens for r in results]
            tokens = [t for r in results for t in r.tokens]
            stats = pooled(results)
            method_k = k if drafter is None else drafter[2]
            runs[f"{name}/b{batch}"] = {
                "method": name, "batch_size": batch, "k": method_k, **stats,
                "speedup": stats["tokens_per_second"] / runs[f"greedy/b{batch}"][
                    "tokens_per_second"],
                "identical_to_greedy": tokens == greedy_tokens,
                "rows_differing_from_greedy": sum(a != b for a, b in zip(tokens, greedy_tokens)),
                **mtp_summary(results, method_k)}
            outputs[f"{name}/b{batch}"] = (tokens, [rec for r in results
                                                    for rec in r.row_records()])
        if cfg.continuous and batch > 1:
            _continuous_runs(config, params, prompts, batch, drafters, greedy_tokens, runs,
                             outputs, cfg, common)

    first = cfg.batch_sizes[0]
    greedy_hyps = [hypothesis_text(tok, t) for t in outputs[f"greedy/b{first}"][0]]
    quality = {}
    for name, (tokens, _) in outputs.items():
        hyps = [hypothesis_text(tok, t) for t in tokens]
        quality[name] = {**score(hyps, refs), "identical_text": hyps == greedy_hyps}
    main_method = next(iter(drafters), "oracle")
    records = outputs[f"{main_method}/b{first}"][1]
    translations = [{"index": i, "source": p.src, "reference": p.tgt, "hypothesis": h,
                     "verify_steps": rec["verify_steps"],
                     "accepted_per_step": rec["accepted_per_step"]}
                    for i, (p, h, rec) in enumerate(zip(pairs, greedy_hyps, records))]
    all_identical = all(r.get("identical_to_greedy", True) for r in runs.values())
    return {"checkpoint": str(cfg.checkpoint), "heads": cfg.heads, "split": cfg.split,
            "num_sentences": len(pairs), "k": k, "max_new_tokens": cfg.max_new_tokens,
            "shots": cfg.shots, "space_with_target": space_with_target,
            "draft_vocab_size": len(draft_vocab) if draft_vocab else None,
            "draft_vocab_from": str(draft_vocab_path) if draft_vocab else None,
            "dtype": config.dtype, "platform": jax.devices()[0].platform,
            "quality": quality, "runs": runs, "all_identical_to_greedy": all_identical,
            "scores_identical": len({(q["bleu"], q["chrf"]) for q in quality.values()}) == 1,
            "translations": translations}


def _continuous_runs(config, params, prompts, batch, drafters, greedy_tokens, runs, outputs,
                     cfg, common):
    """Greedy and each drafter (not the oracle: its references are per batch row) through
    `batch` continuously refilled slots (decoding/continuous.py). Runs are named
    `<method>/b<batch>/continuous`; `speedup` is over continuous greedy (the same scheduler),
    `speedup_vs_static_greedy` over `greedy/b<batch>`."""
    from tqdm import tqdm

    from gptk_jax.decoding.continuous import continuous_generate
    static_greedy = runs[f"greedy/b{batch}"]["tokens_per_second"]
    methods = {"greedy": (None, (), 1), **drafters}
    for name, (drafter, variables, method_k) in methods.items():
        key = f"{name}/b{batch}/continuous"
        with tqdm(total=len(prompts), desc=key, disable=not cfg.progress, unit="prompt",
                  leave=False) as bar:
            result = continuous_generate(config, params, prompts, batch_size=batch,
                                         drafter=drafter, drafter_vars=variables,
                                         num_tokens_per_step=method_k, bucket=cfg.bucket,
                                         on_finished=bar.update, **common)
        stats = pooled([result])
        run = {"method": name, "batch_size": batch, "schedule": "continuous", **stats,
               "loop_iterations": result.loop_iterations,
               "prefill_calls": result.prefill_calls,
               "speedup_vs_static_greedy": stats["tokens_per_second"] / static_greedy,
               "identical_to_greedy": result.tokens == greedy_tokens,
               "rows_differing_from_greedy": sum(a != b for a, b in zip(result.tokens,
                                                                         greedy_tokens))}
        if drafter is not None:
            run.update(k=method_k, speedup=stats["tokens_per_second"] /
                       runs[f"greedy/b{batch}/continuous"]["tokens_per_second"],
                       **mtp_summary([result], method_k))
        runs[key] = run
        outputs[key] = (result.tokens, result.row_records() if drafter is not None else None)


def _oracle_generate(config, params, greedy_results, known_stop_tokens, k, cfg, common):
    """The oracle drafts each chunk's greedy continuation plus the stop id the row ended on
    (from an earlier MTP run of the same chunk; without one, an untimed oracle pass finds it),
    so every draft is accepted."""
    from gptk_jax.decoding.mtp import mtp_generate
    from gptk_jax.decoding.oracle import OracleDrafter, oracle_variables
    drafter = OracleDrafter(k - 1, config.vocab_size)
    chunk_index = iter(range(len(greedy_results)))

    def run(chunk, batch, conts):
        conts = [(c + [0] * cfg.max_new_tokens)[:cfg.max_new_tokens] for c in conts]
        variables = oracle_variables(conts, [len(p) for p in chunk], batch, k - 1)
        return mtp_generate(config, params, drafter, variables, chunk, num_tokens_per_step=k,
                            bucket=cfg.bucket, batch_size=batch, **common)

    def generate(chunk, batch):
        i = next(chunk_index)
        stops = known_stop_tokens[i] if known_stop_tokens else run(chunk, batch,
                                                                   [[0]] * len(chunk)).stop_tokens
        conts = [t + [s] if s is not None else t
                 for t, s in zip(greedy_results[i].tokens, stops)]
        return run(chunk, batch, conts)
    return generate


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"# Greedy vs MTP: {Path(report['checkpoint']).name} on {report['split']} "
             f"({report['num_sentences']} sentences, K={report['k']}, {report['platform']}, "
             f"{report['dtype']})", "",
             "| run | K | BLEU | chrF | tokens/s | speedup | over static greedy | τ | "
             "accepted histogram | identical (rows differing) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in report["runs"].items():
        q = report["quality"][name]
        tau = f"{run['tokens_per_step']:.2f}" if run.get("tokens_per_step") else "–"
        lines.append(f"| {name} | {run.get('k', 1)} | {q['bleu']:.2f} | {q['chrf']:.2f} | "
                     f"{run['tokens_per_second']:.1f} | {run.get('speedup', 1.0):.2f} | "
                     f"{run.get('speedup_vs_static_greedy', run.get('speedup', 1.0)):.2f} | {tau} | "
                     f"{run.get('accepted_histogram', '–')} | "
                     f"{run.get('identical_to_greedy', '–')}"
                     + (f" ({run['rows_differing_from_greedy']})"
                        if "rows_differing_from_greedy" in run else "") + " |")
    any_q = next(iter(report["quality"].values()))
    lines += ["", f"BLEU signature: `{any_q['bleu_signature']}`",
              f"chrF signature: `{any_q['chrf_signature']}`", "",
              "τ = tokens per verify step, the bonus token included (the prefill's token is not "
              "counted). tokens/s excludes compilation. speedup: over greedy with the same batch "
              "size and schedule (static batches, or `/continuous`: slots refilled as rows "
              "finish).", ""]
    for name, run in report["runs"].items():
        if "per_offset_acceptance" in run:
            rates = ", ".join(f"offset {o}: {'–' if v is None else f'{v:.3f}'}"
                              for o, v in run["per_offset_acceptance"].items())
            lines.append(f"- {name} per-offset conditional acceptance: {rates}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mtp_runs = {n: r for n, r in report["runs"].items() if "accepted_histogram" in r}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in mtp_runs.items():
        hist = np.asarray(run["accepted_histogram"], float)
        axes[0].plot(np.arange(len(hist)), hist / max(hist.sum(), 1), marker="o", label=name)
        offsets = [int(o) for o in run["per_offset_acceptance"]]
        rates = [np.nan if v is None else v for v in run["per_offset_acceptance"].values()]
        axes[1].plot(offsets, rates, marker="o", label=name)
    axes[0].set(title="accepted drafts per verify step", xlabel="drafts accepted",
                ylabel="fraction of steps")
    axes[1].set(title="conditional acceptance per offset", xlabel="offset", ylabel="P(accept)",
                ylim=(0, 1.05))
    names = list(report["runs"])
    axes[2].bar(range(len(names)), [report["runs"][n]["tokens_per_second"] for n in names])
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[2].set(title="tokens/s (compilation excluded)")
    for ax in axes[:2]:
        if mtp_runs:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    translations = report["translations"]
    summary = {k: v for k, v in report.items() if k != "translations"}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(markdown(report))
    with open(out_dir / "translations.jsonl", "w", encoding="utf-8") as f:
        for t in translations:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    plot(report, out_dir / "acceptance.png")


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted trunk folder")
    p.add_argument("--heads", default=None, help="trained heads folder (heads_io)")
    p.add_argument("--split", default="newstest2014", choices=SPLITS)
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
                   help=f"text whose tokens are counted (default: {DRAFT_VOCAB_TEXT})")
    p.add_argument("--continuous", action="store_true",
                   help="batch sizes > 1 also run with continuous batching (slots refilled as "
                        "rows finish): greedy and each drafter but the oracle")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--output", required=True, help="report folder")
    a = p.parse_args(argv)
    return EvalConfig(checkpoint=a.checkpoint, heads=a.heads, output=a.output, split=a.split,
                      src_lang=a.src_lang, tgt_lang=a.tgt_lang, max_sentences=a.max_sentences,
                      batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")), k=a.k,
                      max_new_tokens=a.max_new_tokens, shots=a.shots,
                      space_with_target=a.space_with_target, bucket=a.bucket,
                      dtype=a.dtype, oracle=a.oracle, lookup=a.lookup, lookup_k=a.lookup_k,
                      lookup_max_ngram=a.lookup_max_ngram,
                      draft_vocab_size=a.draft_vocab_size, draft_vocab_from=a.draft_vocab_from,
                      continuous=a.continuous, progress=not a.no_progress)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    report = run_evaluation(cfg)
    write_reports(report, Path(cfg.output))
    print(markdown(report))
    print(f"wrote {cfg.output}/report.json, report.md, acceptance.png, translations.jsonl")
    if not (report["all_identical_to_greedy"] and report["scores_identical"]):
        differing = {name: f"{r['rows_differing_from_greedy']}/{report['num_sentences']}"
                     for name, r in report["runs"].items() if "rows_differing_from_greedy" in r}
        if report["dtype"] != "float32":   # exactness is promised in float32 only: report it
            print(f"note: in {report['dtype']}, rows whose MTP tokens differ from greedy: "
                  f"{differing} (a K-token verify step rounds differently from 1-token steps)")
            return 0
        print(f"ERROR: MTP output differs from greedy in float32: {differing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
