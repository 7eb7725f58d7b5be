"""Few-row products: XLA:CPU's against the kernels of gptk_jax/kernels/few_rows.py, per weight
shape of SmolLM2-135M, at M = 1..16 rows (a decode step at batch B and W tokens has M = B x W).

    python bench/bench_few_rows.py [--rows 1,2,3,4,8,16] [--copies 30]
        [--output-json bench/results/few_rows.json]

Each shape is a chain of `--copies` different matrices (30 layers' worth, beyond the caches), so
every call streams its weights from memory as a decode step does; the tied unembedding
(x @ E.T, E [49152, 576]) runs 4 times. Median of 15 calls, both implementations in one
process; GB/s is weight bytes over time. Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptk_jax.decoding.cost import device_name  # noqa: E402
from gptk_jax.kernels import few_rows  # noqa: E402

# (name, K, N, transposed): SmolLM2-135M's products (D 576, F 1536, kv 3 x 64, V 49152)
SHAPES = [("wq, wo", 576, 576, False), ("wk, wv", 576, 192, False),
          ("w1, w3", 576, 1536, False), ("w2", 1536, 576, False),
          ("tied unembedding", 576, 49152, True)]


def median_ms(fn, *args, n: int = 15) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def chain(product, weights):
    def f(x, weights):
        return sum(product(x, w)[0, 0] for w in weights)
    return jax.jit(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,8,16")
    p.add_argument("--copies", type=int, default=30)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if not few_rows.available():
        print("the few-row kernels are not available here (see the warning above)")
        return 1
    rng = np.random.default_rng(0)
    rows = []
    for name, k, n, transposed in SHAPES:
        copies = 4 if transposed else args.copies
        shape = (n, k) if transposed else (k, n)
        weights = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(copies)]
        if transposed:
            xla = chain(lambda x, w: x @ w.T, weights)
            kernel = chain(few_rows.matmul_nt, weights)
        else:
            xla = chain(lambda x, w: x @ w, weights)
            kernel = chain(few_rows.matmul_nn, weights)
        mb = copies * k * n * 4 / 1e6
        for m in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            a, b = median_ms(xla, x, weights), median_ms(kernel, x, weights)
            rows.append({"weights": name, "K": k, "N": n, "copies": copies, "rows": m,
                         "xla_ms": a, "kernel_ms": b, "xla_gb_s": mb / a, "kernel_gb_s": mb / b,
                         "xla_over_kernel": a / b})
            print(f"{name:17s} {k}x{n} x{copies} rows {m:2d}: xla {a:7.2f} ms "
                  f"({mb / a:5.1f} GB/s)  kernel {b:7.2f} ms ({mb / b:5.1f} GB/s)  "
                  f"{a / b:.2f}x", flush=True)
    print(f"\n{device_name()}; kernels used for rows <= {few_rows.MAX_ROWS}")
    print("| weights | rows | XLA ms (GB/s) | kernel ms (GB/s) | XLA / kernel |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} ({r['K']}x{r['N']}, x{r['copies']}) | {r['rows']} | "
              f"{r['xla_ms']:.2f} ({r['xla_gb_s']:.1f}) | {r['kernel_ms']:.2f} "
              f"({r['kernel_gb_s']:.1f}) | {r['xla_over_kernel']:.2f}x |")
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device_name(), "max_rows": few_rows.MAX_ROWS,
                                   "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
