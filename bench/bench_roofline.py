"""The memory-bandwidth ceiling of batch-1 decoding on this machine, for the greedy benchmark.

    python bench/bench_roofline.py [--checkpoint .cache/models/smollm2-135m]
        [--output-json bench/results/roofline.json]

A batch-1 decode step reads every weight once, so tokens/s <= bandwidth / weight bytes. This
measures the bandwidth the two matmul libraries reach on a matrix-vector product the size of the
model's unembedding (float32, no cache effects: 2x the largest last-level cache), jax (XLA) and
torch side by side in one process, and the same at 8 rows (the batch-8 benchmark), then prints
the ceiling in tokens/s for the converted model's float32 weights.

With more rows a step is bound by arithmetic, not by reading weights: the second table gives the
float32 FLOP rate of one layer's four products (q|k|v, wo, w1|w3, w2, the decoders' fused
layout) at M rows, jax and torch, and the least time M rows of the whole model's products take at
that rate (2 x matrix parameters x M FLOPs): a batch-8 verify of W tokens is M = 8W rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def best_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def compute_ceiling(config, n_params: int, rows=(1, 8, 16, 32, 64, 512, 2048)) -> list[dict]:
    """GFLOP/s of one layer's products at M rows (jax and torch) and the model's products' least
    ms per step at that rate."""
    rng = np.random.default_rng(1)
    d, f = config.dim, config.ffn_dim
    qkv = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    shapes = ((d, qkv), (config.n_heads * config.head_dim, d), (d, 2 * f), (f, d))
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    wj, wt = [jnp.asarray(w) for w in ws], [torch.from_numpy(w.copy()) for w in ws]
    layer = jax.jit(lambda x, y, z, w: [x @ w[0], y @ w[1], x @ w[2], z @ w[3]])
    flops_row = 2 * sum(a * b for a, b in shapes)
    out = []
    for m in rows:
        xs = [rng.standard_normal((m, k), dtype=np.float32) for k in (d, d, f)]
        xj, xt = [jnp.asarray(x) for x in xs], [torch.from_numpy(x) for x in xs]
        jax_ms = best_ms(lambda: jax.block_until_ready(layer(*xj, wj)), repeats=15)
        with torch.no_grad():
            torch_ms = best_ms(lambda: [xt[0] @ wt[0], xt[1] @ wt[1], xt[0] @ wt[2],
                                        xt[2] @ wt[3]], repeats=15)
        for impl, ms in (("jax (XLA)", jax_ms), ("torch", torch_ms)):
            gflops = flops_row * m / ms / 1e6
            out.append({"rows": m, "impl": impl, "layer_ms": round(ms, 3),
                        "GFLOP_per_s": round(gflops, 1),
                        "model_products_ms": round(2 * n_params * m / gflops / 1e6, 2)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)

    from gptk_jax.llama.checkpoint import load_config
    from gptk_jax.llama.model import abstract_params
    config = load_config(args.checkpoint)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
    weight_bytes = 4 * n_params

    rng = np.random.default_rng(0)
    w = rng.standard_normal((config.dim, 2 * config.vocab_size), dtype=np.float32)
    wj, wt = jnp.asarray(w), torch.from_numpy(w.copy())
    matmul = jax.jit(lambda x, w: x @ w)
    rows = []
    for m in (1, 8):
        xj, xt = jnp.ones((m, config.dim)), torch.ones(m, config.dim)
        jax_ms = best_ms(lambda: matmul(xj, wj).block_until_ready())
        with torch.no_grad():
            torch_ms = best_ms(lambda: xt @ wt)
        for impl, ms in (("jax (XLA)", jax_ms), ("torch", torch_ms)):
            gbs = w.nbytes / ms / 1e6
            rows.append({"rows": m, "impl": impl, "ms": round(ms, 3), "GB_per_s": round(gbs, 1),
                         "ceiling_steps_per_s": round(gbs * 1e9 / weight_bytes, 1),
                         "ceiling_tokens_per_s": round(m * gbs * 1e9 / weight_bytes, 1)})

    print(f"model {args.checkpoint}: {n_params:,} parameters, {weight_bytes / 1e6:.0f} MB float32; "
          f"matrix {w.shape} ({w.nbytes / 1e6:.0f} MB); jax {jax.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} cpus\n")
    print("rows | impl | ms | GB/s | ceiling steps/s | ceiling tokens/s")
    for r in rows:
        print(f"{r['rows']} | {r['impl']} | {r['ms']} | {r['GB_per_s']} | "
              f"{r['ceiling_steps_per_s']} | {r['ceiling_tokens_per_s']}")
    compute = compute_ceiling(config, n_params)
    print("\nrows | impl | one layer's products ms | GFLOP/s | all products at that rate, ms")
    for r in compute:
        print(f"{r['rows']} | {r['impl']} | {r['layer_ms']} | {r['GFLOP_per_s']} | "
              f"{r['model_products_ms']}")
    if args.output_json:
        out = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_average": os.getloadavg()},
               "n_params": n_params, "weight_bytes": weight_bytes, "rows": rows,
               "compute": compute}
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
