"""Decode-loop time per step of the greedy decoder, for A/B comparisons between two checkouts.

    python bench/bench_decode_steps.py [--root CHECKOUT] [--checkpoint .cache/models/smollm2-135m]

Imports gptk_jax from --root (default: this checkout), so two versions can be timed alternately
on the same machine, e.g. against an older commit in a git worktree:

    git worktree add /tmp/base <commit>
    for r in /tmp/base . /tmp/base .; do python bench/bench_decode_steps.py --root $r; done

Prompts: 8 rows of random token ids, 200-260 tokens (seeded), 64 new tokens, no stop ids (every
row runs all 63 decode steps). Batch 1 runs the first 4 prompts one by one, batch 8 all at once.
Prints the best of --repeats of the decode loop's wall time per step (compilation excluded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="checkout whose gptk_jax is timed")
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    import jax

    from gptk_jax.llama.checkpoint import load_converted

    model = load_converted(args.checkpoint)
    params = jax.device_put(model.params)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(100, 40000, size=int(n)))
               for n in rng.integers(200, 260, size=8)]
    try:   # one Decoder holds its executables (checkouts before it: a module-global cache)
        from gptk_jax.decoding import Decoder
        decoder = Decoder(model.config, params, stop_ids=[-5], pad_id=0)
        run = lambda rows: decoder.generate(rows, 64).decode_seconds
    except ImportError:
        from gptk_jax.decoding.greedy import greedy_generate
        run = lambda rows: greedy_generate(model.config, params, rows, 64, [-5], 0).decode_seconds
    for batch in (1, 8):
        best = min(sum(run([q]) for q in prompts[:4]) if batch == 1 else run(prompts)
                   for _ in range(args.repeats))
        steps = 4 * 63 if batch == 1 else 63
        print(f"{args.root.resolve()} batch {batch}: {1e3 * best / steps:.1f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
