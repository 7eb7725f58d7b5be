"""Continuous batching vs static batches, greedy and MTP, on the real model and newstest2014.

    python bench/bench_continuous.py [--checkpoint .cache/models/smollm2-135m]
        [--num-sentences 50] [--batch-size 8] [--tokens-per-step 4] [--rounds 2]
        [--output-json bench/results/continuous.json]

The first --num-sentences newstest2014 sentences (0-shot prompt ending at 'en:', stop at a
newline, 64 new tokens) through B slots, every method in one process and in each of --rounds
rounds (this machine's timings drift; the table shows the best round per method):
- static: consecutive batches of B prompts, each running until its slowest row is done
  (`Decoder.generate`);
- continuous: B slots refilled from the queue as rows finish (`Decoder.generate_continuous`;
  greedy is its W = 1 case, one token per step).
The drafter is prompt lookup (the best measured here; docs/benchmarks.md). Every method's
tokens must equal static greedy's for every prompt (the script fails otherwise). Compilation is
excluded (timed apart); tokens/s counts prefill and decoding (and, for continuous, the host's
bookkeeping between loop runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptk_jax.data.prompts import encode_prompts  # noqa: E402
from gptk_jax.data.prompts import prompt_format, translation_stop_ids  # noqa: E402
from gptk_jax.data.root import add_data_root_argument, resolve_data_root  # noqa: E402
from gptk_jax.data.testsets import load_test_set  # noqa: E402


def static_run(generate, prompts, batch):
    """Consecutive batches of `batch` prompts -> (tokens per prompt, summary)."""
    tokens, iterations, prefill, decode, compile_s, steps, emitted = [], 0, 0.0, 0.0, 0.0, 0, 0
    for i in range(0, len(prompts), batch):
        out = generate(prompts[i:i + batch])
        tokens += out.tokens
        iterations += out.num_steps - 1
        prefill, decode = prefill + out.prefill_seconds, decode + out.decode_seconds
        compile_s += out.compile_seconds
        if out.tokens_per_step > 1:     # draft-and-verify
            steps += out.stats["verify_steps"]
            emitted += out.stats["tokens_from_verify_steps"]
    return tokens, {"loop_iterations": iterations, "prefill_s": prefill, "decode_s": decode,
                    "compile_s": compile_s, "tau": emitted / steps if steps else None}


def continuous_run(generate, prompts):
    out = generate(prompts)
    tau = out.stats["tau"] if out.tokens_per_step > 1 else None
    return out.tokens, {"loop_iterations": out.loop_iterations, "prefill_s": out.prefill_seconds,
                        "decode_s": out.decode_seconds, "compile_s": out.compile_seconds,
                        "tau": tau, "prefill_calls": out.prefill_calls}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    add_data_root_argument(p)
    p.add_argument("--num-sentences", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=int, default=4,
                   help="W, tokens per verify step of the lookup decoder")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args(argv)

    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.decoding.factory import GREEDY, DecoderSpec, make_decoder

    model = load_converted(args.checkpoint)
    config, params, tok = model.config, model.params, model.tokenizer
    fmt = prompt_format("de", "en", 0, space_with_target=True)
    pairs = load_test_set("newstest2014", resolve_data_root(args.data_root),
                          max_sentences=args.num_sentences).pairs
    prompts = encode_prompts(fmt, tok, [pair.src for pair in pairs])   # the tokenizer's BOS rule
    stop_ids, pad, m, b, k = translation_stop_ids(tok), tok.pad_id, args.max_new_tokens, \
        args.batch_size, args.tokens_per_step

    # one decoder per method, held over the rounds: each compiles once per shape
    greedy = make_decoder(model, GREEDY, stop_ids=stop_ids, pad_id=pad)
    decoders = {"greedy": greedy,
                "lookup": make_decoder(model, DecoderSpec("lookup", tokens_per_step=k),
                                       base=greedy)}
    methods = {}
    for name, decoder in decoders.items():
        methods[(name, "static")] = (lambda d=decoder: static_run(
            lambda c: d.generate(c, m, batch_size=b), prompts, b))
        methods[(name, "continuous")] = (lambda d=decoder: continuous_run(
            lambda ps: d.generate_continuous(ps, m, batch_size=b), prompts))

    load_before = os.getloadavg()
    reference, rounds = None, {key: [] for key in methods}
    for r in range(args.rounds):
        for key, fn in methods.items():
            tokens, summary = fn()
            if reference is None:
                reference = tokens
            mismatched = [i for i, (a, c) in enumerate(zip(tokens, reference)) if a != c]
            if mismatched:
                raise SystemExit(f"{key}: prompts {mismatched} differ from static greedy")
            summary["generated"] = sum(len(t) for t in tokens)
            summary["tokens_per_s"] = summary["generated"] / (summary["prefill_s"] +
                                                              summary["decode_s"])
            rounds[key].append(summary)
            print(f"round {r + 1} {key[0]:>12} {key[1]:>10}: {summary['tokens_per_s']:.1f} "
                  f"tokens/s, {summary['loop_iterations']} iterations", flush=True)
    load_after = os.getloadavg()

    best = {key: max(rs, key=lambda s: s["tokens_per_s"]) for key, rs in rounds.items()}
    base = best[("greedy", "static")]
    print(f"\n{len(prompts)} newstest2014 sentences, 0-shot, batch {b}, W = {k}, at most {m} new "
          f"tokens; best of {args.rounds} rounds; every method token-identical to static greedy")
    header = (f"{'drafter':>12} {'schedule':>10} {'tau':>5} {'iterations':>10} {'prefill s':>9} "
              f"{'decode s':>8} {'tokens/s':>8} {'vs greedy static':>16} "
              f"{'vs greedy same schedule':>23} {'decode-only vs same':>19}")
    print(header)
    for key, s in best.items():
        same = best[("greedy", key[1])]
        tau = f"{s['tau']:.2f}" if s["tau"] else "-"
        print(f"{key[0]:>12} {key[1]:>10} {tau:>5} {s['loop_iterations']:>10} "
              f"{s['prefill_s']:>9.2f} {s['decode_s']:>8.2f} {s['tokens_per_s']:>8.1f} "
              f"{s['tokens_per_s'] / base['tokens_per_s']:>15.2f}x "
              f"{s['tokens_per_s'] / same['tokens_per_s']:>22.2f}x "
              f"{same['decode_s'] / s['decode_s']:>18.2f}x")
    if args.output_json:
        report = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                  "date": time.strftime("%Y-%m-%dT%H:%M"), "num_sentences": len(prompts),
                  "batch_size": b, "k": k, "max_new_tokens": m,
                  "load_average_before": load_before, "load_average_after": load_after,
                  "identical_to_greedy": True,
                  "rounds": {f"{d}/{s}": rs for (d, s), rs in rounds.items()}}
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
