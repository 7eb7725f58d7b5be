"""The greedy pick over the vocabulary: `jnp.argmax` against kernels/argmax.py `first_argmax`
(a max, then the first index equal to it), alone and inside a verify call of the trunk.

    python bench/bench_argmax.py [--checkpoint .cache/models/smollm2-135m] [--rows 1,4,8,32]
        [--batch-sizes 1,8] [--tokens 1,4] [--rounds 3]
        [--output-json bench/results/argmax.json]

Alone: logits [rows, 49152] float32, median of 50 calls each. In a verify call: the trunk over
T new tokens at batch B with logits at every token and the pick fed back, 8 calls in one jitted
loop (bench_verify_cost.py's `trunk_loop`, decoders' few-row kernels and fused projections),
the two picks alternated call by call in each round, best round each. Both picks give the same
tokens (checked here on the logits of each shape). Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_mtp import _per_iteration  # noqa: E402
from bench_verify_cost import decoder_trunk, filled_cache, trunk_loop  # noqa: E402
from gptk_jax.decoding.cost import device_name  # noqa: E402
from gptk_jax.files import atomic_write_text  # noqa: E402
from gptk_jax.kernels.argmax import first_argmax  # noqa: E402

PICKS = {"jnp.argmax": lambda x: jnp.argmax(x, -1).astype(jnp.int32),
         "first_argmax": first_argmax}


def _median_ms(f, x, calls: int = 50) -> float:
    f(x).block_until_ready()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def alone(rows_list, vocab: int) -> list[dict]:
    results = []
    for rows in rows_list:
        x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, vocab), np.float32))
        fns = {name: jax.jit(f) for name, f in PICKS.items()}
        a, b = (np.asarray(f(x)) for f in fns.values())
        assert (a == b).all(), f"picks differ at {rows} rows"
        ms = {name: _median_ms(f, x) for name, f in fns.items()}
        results.append({"rows": rows, **{f"{n} ms": v for n, v in ms.items()}})
        print(f"alone rows {rows:3d}: jnp.argmax {ms['jnp.argmax']:.3f} ms, first_argmax "
              f"{ms['first_argmax']:.3f} ms ({ms['first_argmax'] / ms['jnp.argmax']:.2f}x)",
              flush=True)
    return results


def in_verify(checkpoint: Path, batch_sizes, tokens, rounds: int, context: int = 92):
    config, params = decoder_trunk(checkpoint)
    best = {}
    for _ in range(rounds):
        for batch in batch_sizes:
            cache = filled_cache(config, batch, context)
            for t in tokens:
                for name, pick in PICKS.items():
                    s = _per_iteration(trunk_loop(config, context, "all", pick=pick), params,
                                       cache, jnp.ones((batch, t), jnp.int32), iterations=8,
                                       reps=3)
                    key = (batch, t, name)
                    best[key] = min(best.get(key, float("inf")), 1e3 * s)
    results = []
    for batch in batch_sizes:
        for t in tokens:
            a, b = best[(batch, t, "jnp.argmax")], best[(batch, t, "first_argmax")]
            results.append({"batch": batch, "t": t, "jnp.argmax ms": a, "first_argmax ms": b})
            print(f"verify batch {batch} T={t}: jnp.argmax {a:.2f} ms, first_argmax {b:.2f} ms "
                  f"({b / a:.3f}x)", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m")
    p.add_argument("--rows", default="1,4,8,32")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--tokens", default="1,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]
    report = {"device": device_name(), "alone": alone(ints(args.rows), 49152)}
    if ints(args.batch_sizes):
        report["verify"] = in_verify(args.checkpoint, ints(args.batch_sizes), ints(args.tokens),
                                     args.rounds)
    if args.output_json:
        atomic_write_text(args.output_json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
