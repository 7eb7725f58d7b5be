"""Two sources of the few-row kernels (gptk_jax/kernels/small_matmul.cc) timed against each other
in whole trunk calls: a git revision's source (A) and the working tree's (B).

    python bench/bench_kernel_ab.py [--base HEAD] [--pairs 2] [--rounds 4]
        [--shapes 1x1,1x4,8x1,2x4] [--output-json bench/results/kernel_ab.json]

Each worker is a fresh process built on one source (`GPTK_FEW_ROWS_SOURCE`); workers alternate
A, B, A, B, ... (`--pairs` pairs), so drift of this machine between runs hits both alike. A
worker times the trunk's call at each batch x T shape (logits at every token, the pick fed back,
8 calls in one jitted loop: bench_verify_cost.py's `trunk_loop`, decoders' settings: kernels
from 2 rows, fused projections; context 92), best of `--rounds` rounds. Printed: per pair B / A
per shape, and the best of each over all pairs. Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SOURCE = "gptk_jax/kernels/small_matmul.cc"


def worker(shapes, rounds: int, checkpoint: Path) -> dict:
    import jax.numpy as jnp
    from bench_mtp import _per_iteration
    from bench_verify_cost import decoder_trunk, filled_cache, trunk_loop
    from gptk_jax.kernels.argmax import first_argmax

    config, params = decoder_trunk(checkpoint)
    context, best, loops = 92, {}, {}
    for _ in range(rounds):
        for batch, t in shapes:
            cache = filled_cache(config, batch, context)
            loop = loops.setdefault((batch, t), trunk_loop(config, context, "all",
                                                           pick=first_argmax))
            s = _per_iteration(loop, params, cache, jnp.ones((batch, t), jnp.int32),
                               iterations=8, reps=3)
            key = f"{batch}x{t}"
            best[key] = min(best.get(key, float("inf")), 1e3 * s)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision of source A")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--shapes", default="1x1,1x4,8x1,2x4", help="batch x T, comma-separated")
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m")
    p.add_argument("--output-json", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.worker:
        print(json.dumps(worker(shapes, args.rounds, args.checkpoint)))
        return 0
    base_text = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "small_matmul.cc"
        base.write_text(base_text)
        sources = {"A": str(base), "B": str(ROOT / SOURCE)}
        runs = []
        for pair in range(args.pairs):
            row = {}
            for name, source in sources.items():
                env = dict(os.environ, GPTK_FEW_ROWS_SOURCE=source)
                out = subprocess.run([sys.executable, __file__, "--worker", "--rounds",
                                      str(args.rounds), "--shapes", args.shapes,
                                      "--checkpoint", str(args.checkpoint)], env=env,
                                     check=True, capture_output=True, text=True).stdout
                row[name] = json.loads(out.strip().splitlines()[-1])
            runs.append(row)
            print(f"pair {pair}: " + ", ".join(
                f"{k}: A {row['A'][k]:.2f} ms, B {row['B'][k]:.2f} ms "
                f"({row['B'][k] / row['A'][k]:.3f}x)" for k in row["A"]), flush=True)
    print(f"\nA = {args.base}:{SOURCE}, B = the working tree's; best over {args.pairs} pairs")
    print("| batch x T | A ms | B ms | B / A |\n|---|---|---|---|")
    summary = []
    for key in runs[0]["A"]:
        a, b = (min(r[n][key] for r in runs) for n in "AB")
        summary.append({"shape": key, "a_ms": a, "b_ms": b})
        print(f"| {key} | {a:.2f} | {b:.2f} | {b / a:.3f}x |")
    if args.output_json:
        from gptk_jax.files import atomic_write_text
        atomic_write_text(args.output_json, json.dumps(
            {"base": args.base, "pairs": runs, "best": summary}, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
