"""Would verifying several prompt-lookup candidates per step (a token tree) raise τ? Measured
before building it.

    python bench/lookup_candidates.py [--checkpoint .cache/models/smollm2-135m]
        [--num-sentences 50] [--ks 4,8] [--max-candidates 3]
        [--output-json bench/results/lookup_candidates.json]

Runs the real jitted prompt-lookup decoder (`LookupDrafter`, one candidate) on the first
--num-sentences newstest2014 sentences (0-shot, the research prompt ending at 'en:', stop at a
newline, 64 new tokens, batch 8) and keeps its token-identical-to-greedy outputs. Then replays
every sequence in plain Python: at each verify step the candidates are all earlier matches of the
last n = 3, 2, 1 tokens, ranked longest n first, latest first (the drafter's own rule), keeping
candidates whose first token differs; a step accepts the longest prefix any of the top C
candidates shares with the true continuation, plus the bonus token. C = 1 must reproduce the
jitted loop's τ exactly (a check of the replay); C = 2, 3 is what a tree of C branches would get
(the verify pass would then hold 1 + C*(W-1) tokens). Also printed: the batch-8 decode-loop
iterations of greedy and lookup with static batches vs ideal continuous batching.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptk_jax.data.prompts import encode_prompts  # noqa: E402
from gptk_jax.data.prompts import prompt_format, translation_stop_ids  # noqa: E402
from gptk_jax.data.root import add_data_root_argument, resolve_data_root  # noqa: E402
from gptk_jax.data.testsets import load_test_set  # noqa: E402


def ranked_candidates(seq: list, known: int, k: int, max_ngram: int) -> list:
    """Continuations (<= k-1 tokens, within the known seq[:known]) of earlier matches of the
    last n known tokens, n = max_ngram..1, latest match first."""
    out = []
    for n in range(max_ngram, 0, -1):
        if known < n + 1:
            continue
        query = seq[known - n:known]
        for end in range(known - 1, n - 1, -1):       # a match seq[end-n:end], strictly earlier
            if seq[end - n:end] == query:
                out.append(seq[end:min(end + k - 1, known)])
    return [c for c in out if c]


def replay(prompt: list, generated: list, k: int, candidates: int, max_ngram: int) -> tuple:
    """-> (verify steps, tokens emitted by them) for one row; generated[0] came from prefill."""
    seq = prompt + generated
    known, done, steps, emitted = len(prompt) + 1, 1, 0, 0
    while done < len(generated):
        chosen = []
        for c in ranked_candidates(seq, known, k, max_ngram):
            if all(c[0] != d[0] for d in chosen):
                chosen.append(c)
            if len(chosen) == candidates:
                break
        best = 0
        for c in chosen:
            a = 0
            while a < len(c) and done + a < len(generated) and c[a] == generated[done + a]:
                a += 1
            best = max(best, a)
        step = min(best + 1, len(generated) - done)
        done, known, steps, emitted = done + step, known + step, steps + 1, emitted + step
    return steps, emitted


def batch_iterations(rows: list, batch: int) -> dict:
    """Decode-loop iterations of greedy (one per token after the prefill's) and of MTP (one per
    verify step) for consecutive batches of `batch` rows, and their ideal continuous-batching
    counts (every slot always busy: the sums over `batch`)."""
    steps = [r["verify_steps"] for r in rows]
    tokens = [r["num_generated"] - 1 for r in rows]
    spans = range(0, len(rows), batch)
    return {"greedy_static": sum(max(tokens[i:i + batch]) for i in spans),
            "mtp_static": sum(max(steps[i:i + batch]) for i in spans),
            "greedy_continuous": sum(tokens) / batch, "mtp_continuous": sum(steps) / batch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    add_data_root_argument(p)
    p.add_argument("--num-sentences", type=int, default=50)
    p.add_argument("--ks", default="4,8")
    p.add_argument("--max-candidates", type=int, default=3)
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args(argv)

    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.decoding.factory import GREEDY, DecoderSpec, make_decoder

    model = load_converted(args.checkpoint)
    tok = model.tokenizer
    fmt = prompt_format("de", "en", 0, space_with_target=True)
    pairs = load_test_set("newstest2014", resolve_data_root(args.data_root),
                          max_sentences=args.num_sentences).pairs
    prompts = encode_prompts(fmt, tok, [pair.src for pair in pairs])   # the tokenizer's BOS rule
    greedy = make_decoder(model, GREEDY, stop_ids=translation_stop_ids(tok))
    report = {"num_sentences": len(prompts), "max_ngram": args.max_ngram, "ks": {}}
    print(f"{len(prompts)} newstest2014 sentences, 0-shot, batch 8; tau = tokens per verify "
          "step, bonus token included")
    print(f"{'W':>3} {'jitted lookup tau':>18} " + " ".join(
        f"{f'replay C={c}':>12}" for c in range(1, args.max_candidates + 1)))
    for k in (int(x) for x in args.ks.split(",")):
        rows, per_row, steps, emitted = [], [], 0, 0
        lookup = make_decoder(model, DecoderSpec("lookup", tokens_per_step=k,
                                                 lookup_max_ngram=args.max_ngram), base=greedy)
        for i in range(0, len(prompts), 8):
            chunk = prompts[i:i + 8]
            out = lookup.generate(chunk, args.max_new_tokens, batch_size=8)
            for j, prompt in enumerate(chunk):
                stop = out.stop_tokens[j]
                rows.append((prompt, list(out.tokens[j]) + ([stop] if stop is not None else [])))
            for r in out.row_records():
                steps += r["verify_steps"]
                emitted += sum(r["emitted_per_step"])
                per_row.append({"verify_steps": r["verify_steps"],
                                "num_generated": r["num_generated"]})
        replays = {}
        for c in range(1, args.max_candidates + 1):
            s = e = 0
            for prompt, generated in rows:
                row_steps, row_emitted = replay(prompt, generated, k, c, args.max_ngram)
                s, e = s + row_steps, e + row_emitted
            replays[c] = e / s
        if abs(replays[1] - emitted / steps) > 1e-9:
            raise SystemExit(f"W={k}: the replay with one candidate gives tau {replays[1]:.4f}, "
                             f"the jitted decoder {emitted / steps:.4f}: the replay does not "
                             "model the drafter; its other numbers would mean nothing")
        report["ks"][k] = {"jitted_tau": emitted / steps, "replay_tau": replays,
                           "batch8_loop_iterations": batch_iterations(per_row, 8),
                           "rows": per_row}
        print(f"{k:>3} {emitted / steps:>18.3f} " + " ".join(f"{replays[c]:>12.3f}"
                                                          for c in replays), flush=True)
    print("\nbatch 8, loop iterations (from the rows' verify steps and lengths): static batches "
          "run until their slowest row is done; continuous batching (finished rows refilled at "
          "once) would need about sum / 8")
    for k, d in report["ks"].items():
        it = d["batch8_loop_iterations"]
        print(f"W={k}: greedy {it['greedy_static']} vs lookup {it['mtp_static']} static "
              f"({it['greedy_static'] / it['mtp_static']:.2f}x fewer); continuous "
              f"{it['greedy_continuous']:.0f} vs {it['mtp_continuous']:.0f} "
              f"({it['greedy_continuous'] / it['mtp_continuous']:.2f}x fewer)")
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
