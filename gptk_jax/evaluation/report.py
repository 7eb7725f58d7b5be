"""The evaluation report: scores, per-sentence translations, report.json / report.md /
acceptance.png / translations.jsonl.

`build_report` turns the runs and outputs of gptk_jax.evaluation.runs into one dict: the header
(checkpoint, heads, what was evaluated: `split` and `test_set`, W, prompt, dtype, platform),
`quality` (BLEU / chrF per run, sacreBLEU signatures), `runs`, the exactness flags and
`translations` (kept out of report.json, written one line per sentence).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gptk_jax.data.prompts import hypothesis_text


def score(hyps: list[str], refs: list[str]) -> dict:
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def build_report(header: dict, test_set, tokenizer, runs: dict, outputs: dict,
                 first_batch: int, main_method: str) -> dict:
    """`outputs[name]`: runs.Output; translations show greedy's text at `first_batch` with
    `main_method`'s per-step acceptance."""
    refs = [p.tgt for p in test_set.pairs]
    greedy_hyps = [hypothesis_text(tokenizer, t) for t in outputs[f"greedy/b{first_batch}"].tokens]
    quality = {}
    for name, output in outputs.items():
        hyps = [hypothesis_text(tokenizer, t) for t in output.tokens]
        quality[name] = {**score(hyps, refs), "identical_text": hyps == greedy_hyps}
    records = outputs[f"{main_method}/b{first_batch}"].records
    translations = [{"index": i, "source": p.src, "reference": p.tgt, "hypothesis": h,
                     "verify_steps": rec["verify_steps"],
                     "accepted_per_step": rec["accepted_per_step"]}
                    for i, (p, h, rec) in enumerate(zip(test_set.pairs, greedy_hyps, records))]
    return {**header, "test_set": test_set.describe(), "num_sentences": len(test_set.pairs),
            "quality": quality, "runs": runs,
            "all_identical_to_greedy": all(r.get("identical_to_greedy", True)
                                           for r in runs.values()),
            "scores_identical": len({(q["bleu"], q["chrf"]) for q in quality.values()}) == 1,
            "translations": translations}


def describe_test_set(test_set: dict) -> str:
    """What was evaluated, in words (report.md, the CLI's first line)."""
    what = {"files": f"split {test_set['name']}: `{test_set.get('source')}` / "
                     f"`{test_set.get('reference')}`",
            "pair": f"`{test_set.get('source')}` / `{test_set.get('reference')}`",
            "sacrebleu": f"sacreBLEU {test_set['name']} ({test_set.get('langpair')}, cache "
                         f"`{test_set.get('sacrebleu_cache')}`)"}[test_set["kind"]]
    return (f"Test set: {what}; {test_set['num_sentences']} sentences "
            f"{test_set['src_lang']}→{test_set['tgt_lang']}"
            + (f"; pairs dropped for an empty side: {test_set['dropped_empty']}"
               if test_set.get("dropped_empty") else ""))


def spread(run: dict) -> str:
    """' ± sd (n runs)' after a speedup that is the mean of repeated continuous runs, else ''."""
    if run.get("repeats", 1) > 1:
        return f" ± {run['speedup_sd']:.2f} ({run['repeats']} runs)"
    return ""


def _run_row(name: str, run: dict, q: dict) -> str:
    tau = f"{run['tau']:.2f}" if run.get("tau") else "–"
    differing = (f" ({run['rows_differing_from_greedy']})"
                 if "rows_differing_from_greedy" in run else "")
    return (f"| {name} | {run.get('k', 1)} | {q['bleu']:.2f} | {q['chrf']:.2f} | "
            f"{run['tokens_per_second']:.1f} | {run.get('speedup', 1.0):.2f}{spread(run)} | "
            f"{run.get('speedup_vs_static_greedy', run.get('speedup', 1.0)):.2f} | {tau} | "
            f"{run.get('accepted_histogram', '–')} | "
            f"{run.get('identical_to_greedy', '–')}{differing} |")


def markdown(report: dict) -> str:
    test_set = report["test_set"]
    lines = [f"# Greedy vs MTP: {Path(report['checkpoint']).name} on {test_set['name']} "
             f"({report['num_sentences']} sentences, W={report['k']}, {report['platform']}, "
             f"{report['dtype']})", "", describe_test_set(test_set), "",
             "| run | W | BLEU | chrF | tokens/s | speedup | over static greedy | τ | "
             "accepted histogram | identical (rows differing) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_run_row(name, run, report["quality"][name]) for name, run in report["runs"].items()]
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
    """translations.jsonl, acceptance.png, report.md, then report.json, each written to a
    temporary name and renamed: report.json exists only beside a whole set."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in report.items() if k != "translations"}
    lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in report["translations"])
    _replace(out_dir / "translations.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    _replace(out_dir / "acceptance.png", lambda tmp: plot(report, tmp))
    _replace(out_dir / "report.md", lambda tmp: tmp.write_text(markdown(report)))
    _replace(out_dir / "report.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")   # keeps the suffix (matplotlib)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
