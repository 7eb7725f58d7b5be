"""Few-row products: XLA:CPU's against the kernels of gptk_jax/kernels/few_rows.py, per weight
shape of SmolLM2-135M, at M = 1..16 rows (a decode step at batch B and W tokens has M = B x W).

    python bench/bench_few_rows.py [--rows 1,2,3,4,8,16] [--copies 30]
        [--output-json bench/results/few_rows.json]
    python bench/bench_few_rows.py --steps [--checkpoint .cache/models/smollm2-135m]
        [--batch-sizes 1,8] [--reps 7] [--output-json bench/results/few_rows_steps.json]

Each shape is a chain of `--copies` different matrices (30 layers' worth, beyond the caches), so
every call streams its weights from memory as a decode step does; the tied unembedding
(x @ E.T, E [49152, 576]) runs 4 times. Median of 15 calls, both implementations in one
process; GB/s is weight bytes over time. Compare within one run only.

`--steps`: the converted model's greedy decode step (8 steps in one jitted loop, context 96,
decoding/loop.py `decode_step`) at each batch size, with XLA's products, with the kernels, and
with the kernels from 2 rows on (1 row: XLA's matrix-vector product), and the last two with
each layer's q|k|v and w1|w3 products fused (decoders' default, `LlamaConfig.fuse_projections`);
the variants alternate round by round (a burst of noise hits them alike), best round each.
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
from gptk_jax.files import atomic_write_text  # noqa: E402

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


# (name, matmul, kernels from this many rows, q|k|v and w1|w3 fused: llama/model.py)
VARIANTS = (("xla", "xla", 1, False), ("kernels", "few_rows", 1, False),
            ("kernels from 2 rows", "few_rows", 2, False),
            ("xla, fused", "xla", 1, True), ("kernels from 2, fused", "few_rows", 2, True))


def step_variants(args) -> list[dict]:
    """The greedy decode step per VARIANTS at each batch size (module doc)."""
    from gptk_jax.decoding.inputs import pad_prompts, stop_id_array
    from gptk_jax.decoding.loop import NoDrafter, cache_slots, decode_step, prefill_state
    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.llama.model import params_for_model

    model = load_converted(args.checkpoint)
    layouts = {fused: jax.device_put(params_for_model(
        model.params, model.config.replace(fuse_projections=fused))) for fused in (False, True)}
    steps, rows = 8, []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rng = np.random.RandomState(0)
        prompts = pad_prompts([rng.randint(1, model.config.vocab_size, 96).tolist()
                               for _ in range(batch)], 0, bucket=1)
        slots = cache_slots(prompts.padded_length, steps + 2, 1)
        stops, pad = stop_id_array([]), np.int32(0)
        exes, start = {}, None
        params_of = {}
        for name, matmul, least, fused in VARIANTS:
            config = model.config.replace(matmul=matmul, fuse_projections=fused)
            params = params_of[name] = layouts[fused]
            few_rows.MIN_ROWS = least        # read while tracing: fixed into this executable
            start = jax.jit(prefill_state, static_argnums=(0, 1, 2, 3, 4))(
                config, NoDrafter(), 1, steps + 2, slots, params, (), prompts, stops, pad)

            def loop(params, state, config=config):
                step = lambda _, s: decode_step(config, NoDrafter(), 1, params, (), s, stops)
                return jax.lax.fori_loop(0, steps, step, state)
            exes[name] = jax.jit(loop).lower(params, start).compile()
            jax.block_until_ready(exes[name](params, start))
        few_rows.MIN_ROWS = 2
        best = {name: float("inf") for name in exes}
        for _ in range(args.reps):
            for name, exe in exes.items():
                begin = time.perf_counter()
                jax.block_until_ready(exe(params_of[name], start))
                best[name] = min(best[name], time.perf_counter() - begin)
        for name in exes:
            rows.append({"batch": batch, "variant": name, "step_ms": 1e3 * best[name] / steps,
                         "over_xla": best[name] / best["xla"]})
            print(f"batch {batch}: {name:20s} {1e3 * best[name] / steps:6.2f} ms/step "
                  f"({best[name] / best['xla']:.3f}x XLA)", flush=True)
    return rows


def write_json(path, report: dict) -> None:
    """The report as JSON at path (None: nothing), written atomically."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), json.dumps(report, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", action="store_true", help="whole greedy decode steps (module doc)")
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rows", default="1,2,3,4,8,16")
    p.add_argument("--copies", type=int, default=30)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if not few_rows.available():
        print("the few-row kernels are not available here (see the warning above)")
        return 1
    if args.steps:
        rows = step_variants(args)
        write_json(args.output_json, {"device": device_name(), "steps": rows})
        return 0
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
    write_json(args.output_json, {"device": device_name(), "max_rows": few_rows.MAX_ROWS,
                                  "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
