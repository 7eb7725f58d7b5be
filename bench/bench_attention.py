"""Attention over the KV cache at decode shapes: the einsum over (b, k) batches that
llama/attention.py used before vs the batched matmul over B*K batches it uses now.

    python bench/bench_attention.py [--context 320] [--output-json bench/results/attention.json]

SmolLM2's attention shapes (30 layers, 3 kv heads, 3 query heads per kv head, head dim 64), one
buffer per layer, random float32 inputs, no mask (all slots valid). Each variant is one jitted
function over the 30 layers (scores, softmax, weighted values); best of 10 calls, ms for all 30
layers. `read` is the floor: summing every key and value once (the bytes both variants read).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LAYERS, KV, GROUPS, HEAD = 30, 3, 3, 64


def einsum_bk(q, keys, values):   # the former formulation: q [B,T,K,G,H], keys/values [B,K,S,H]
    scores = jnp.einsum("btkgh,bksh->bkgts", q, keys) / 8.0
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bksh->btkgh", probs, values)


def batched(q, keys, values):     # llama/attention.py: one batch dimension B*K, rows G*T
    b, t, s = q.shape[0], q.shape[1], keys.shape[2]
    qq = q.transpose(0, 2, 3, 1, 4).reshape(b * KV, GROUPS * t, HEAD)
    kk, vv = keys.reshape(b * KV, s, HEAD), values.reshape(b * KV, s, HEAD)
    scores = jax.lax.dot_general(qq, kk, (((2,), (2,)), ((0,), (0,)))) / 8.0
    probs = jax.nn.softmax(scores, axis=-1)
    out = jax.lax.dot_general(probs, vv, (((2,), (1,)), ((0,), (0,))))
    return out.reshape(b, KV, GROUPS, t, HEAD).transpose(0, 3, 1, 2, 4)


def read(q, keys, values):
    return keys.sum() + values.sum() + q.sum()


def best_ms(fn, args, calls: int = 10) -> float:
    f = jax.jit(lambda qs, ks, vs: sum(fn(q, k, v).sum() for q, k, v in zip(qs, ks, vs)))
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=320, help="cache slots S")
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    results = []
    print("batch | T | einsum (b,k) ms | batched ms | ratio | read floor ms")
    for batch, t in [(1, 1), (8, 1), (8, 4), (16, 5)]:
        arr = lambda *shape: [jnp.asarray(rng.standard_normal(shape, np.float32))
                              for _ in range(LAYERS)]
        inputs = (arr(batch, t, KV, GROUPS, HEAD), arr(batch, KV, args.context, HEAD),
                  arr(batch, KV, args.context, HEAD))
        a, b, floor = (best_ms(fn, inputs) for fn in (einsum_bk, batched, read))
        gap = np.max(np.abs(np.asarray(jax.jit(einsum_bk)(*(x[0] for x in inputs)))
                            - np.asarray(jax.jit(batched)(*(x[0] for x in inputs)))))
        results.append({"batch": batch, "t": t, "einsum_ms": a, "batched_ms": b,
                        "ratio": a / b, "read_ms": floor, "max_abs_diff": float(gap)})
        print(f"{batch} | {t} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {floor:.2f}"
              f"   (max |diff| {gap:.1e})", flush=True)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({"context": args.context, "jax": jax.__version__,
                                                "results": results}, indent=1))
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
