"""What drafting adds to a decode step: the whole step (draft, verify, accept; decoding/loop.py
`decode_step` inside a jitted fori_loop, decoding/cost.py `measure_step_seconds`) at W = 1..W
and batch 1 and 8, for trained heads against the oracle, whose drafting is a table read (so its
step is the trunk's verify and the bookkeeping alone). Greedy (W = 1, no drafter) is the base.

    python bench/bench_draft_cost.py --heads runs/results2/eagle/heads \\
        [--checkpoint .cache/models/smollm2-135m] [--batch-sizes 1,8] [--context 96] \\
        [--matmul xla,few_rows] [--drafter-weights float32,bfloat16]
        [--output-json bench/results/draft_cost.json]

Each figure is the best of `--reps` rounds over every W of 8 steps each (a burst of noise hits
every W alike); the drafter uses the heads' own draft vocabulary as evaluation does, its weights
in each of `--drafter-weights` (DecoderSpec.drafter_weights: bfloat16 reaches the few-row
kernels' bfloat16 variants, half the bytes). Compare
within one run only: absolute times move between machines and with other jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gptk_jax.decoding.cost import device_name, measure_step_seconds  # noqa: E402
from gptk_jax.decoding.factory import GREEDY, DecoderSpec, make_decoder  # noqa: E402
from gptk_jax.decoding.oracle import oracle_variables  # noqa: E402
from gptk_jax.heads.io import load_heads  # noqa: E402
from gptk_jax.llama.checkpoint import load_converted  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    p.add_argument("--heads", required=True, help="trained heads folder")
    p.add_argument("--tokens-per-step", type=int, default=None, help="W (default: heads' k)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--context", type=int, default=96, help="prompt tokens before the steps")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--matmul", default="xla,few_rows",
                   help="the trunk's products, each measured in turn: xla, few_rows "
                        "(gptk_jax/kernels/few_rows.py)")
    p.add_argument("--drafter-weights", default="float32",
                   help="the heads' weights, each measured in turn: float32, bfloat16")
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def step_ms(decoder, batch: int, widths, context: int, reps: int, matmul: str
            ) -> dict[int, float]:
    seconds = measure_step_seconds(decoder.config.replace(matmul=matmul), decoder.drafter,
                                   decoder.params,
                                   decoder.drafter_vars, batch, widths, context=context,
                                   reps=reps)
    return {w: 1e3 * s for w, s in seconds.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    model = load_converted(args.checkpoint)
    greedy = make_decoder(model, GREEDY)
    loaded = load_heads(args.heads, model.config)
    weights = args.drafter_weights.split(",")
    drafters = {dw: make_decoder(model, DecoderSpec("mtp", heads=args.heads,
                                                    tokens_per_step=args.tokens_per_step,
                                                    draft_vocab=loaded.draft_vocab,
                                                    drafter_weights=dw),
                                 base=greedy, heads=loaded) for dw in weights}
    w_max = drafters[weights[0]].tokens_per_step
    widths = list(range(1, w_max + 1))
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        rng = np.random.default_rng(0)   # drafts of random tokens: the oracle's cost, not τ
        refs = oracle_variables([rng.integers(1, model.config.vocab_size, 8 * w_max + 2)
                                 .tolist() for _ in range(b)], [args.context] * b, b, w_max - 1)
        oracle = make_decoder(model, DecoderSpec("oracle", tokens_per_step=w_max), base=greedy,
                              references=refs)
        first = None
        for matmul in args.matmul.split(","):
            base = step_ms(greedy, b, [1], args.context, args.reps, matmul)[1]
            first = first or base
            verify = step_ms(oracle, b, widths, args.context, args.reps, matmul)
            for dw, heads in drafters.items():
                drafting = step_ms(heads, b, widths, args.context, args.reps, matmul)
                for w in widths:
                    rows.append({"batch": b, "matmul": matmul, "weights": dw, "W": w,
                                 "greedy_ms": base, "oracle_ms": verify[w],
                                 "heads_ms": drafting[w], "drafting_ms": drafting[w] - verify[w],
                                 "heads_over_greedy": drafting[w] / base,
                                 "oracle_over_greedy": verify[w] / base,
                                 "heads_over_first_greedy": drafting[w] / first})
    vocab = len(loaded.draft_vocab) if loaded.draft_vocab else model.config.vocab_size
    print(f"{args.heads}: {loaded.head_config.kind} heads drafting over {vocab} ids, "
          f"{device_name()}, context {args.context}")
    first = args.matmul.split(",")[0]
    print(f"x greedy: this matmul's greedy step; x {first} greedy: the first --matmul's")
    print(f"| batch | matmul | drafter weights | W | greedy ms | oracle step ms (x greedy) | "
          f"heads step ms (x greedy) | drafting ms | heads x {first} greedy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['matmul']} | {r['weights']} | {r['W']} | "
              f"{r['greedy_ms']:.1f} | "
              f"{r['oracle_ms']:.1f} ({r['oracle_over_greedy']:.2f}x) | {r['heads_ms']:.1f} "
              f"({r['heads_over_greedy']:.2f}x) | {r['drafting_ms']:.1f} | "
              f"{r['heads_over_first_greedy']:.2f}x |")
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"heads": str(args.heads), "device": device_name(),
                                   "context": args.context, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
