"""What one trunk call costs as the number of new tokens T grows (the verify step of MTP
decoding), at batch 1 and 8: T = 1, 2, 4, 8, with logits at every new token (what verification
needs), at the last one only, and none (the layers alone).

    python bench/bench_verify_cost.py [--checkpoint .cache/models/smollm2-135m] [--context 92]
        [--batch-sizes 1,8] [--output-json bench/results/verify_cost.json]
        [--calibration-json runs/verify_cost.json] [--matmul xla|few_rows|auto]
        [--layouts plain,fused]

--matmul: the trunk's products (XLA's, or the few-row kernels a decoder uses: "auto");
--layouts: "plain" (wq, wk, wv, w1, w3 apart) and/or "fused" (q|k|v and w1|w3 as one product
each, a decoder's default), alternated call by call in each round.

Each call runs inside a jitted fori_loop of 8 calls that feeds the argmax back and rewrites the
same cache slots (bench_mtp's method: no dispatch, carry in place); best of 3 loops, 2 rounds
(the spread between rounds is the machine's noise). GFLOP/s counts 2 x parameters x B x T.

--calibration-json writes the table auto W reads (`tokens_per_step="auto"`,
gptk_jax/decoding/cost.py `VerifyCost.load`): per batch size, the best time of a verify call
with logits at every token at W = T (trunk only: a decoder's own `calibrate` also counts its
drafting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_mtp import _per_iteration  # noqa: E402
from gptk_jax.decoding.cost import VerifyCost, device_name  # noqa: E402
from gptk_jax.decoding.engine import resolve_matmul  # noqa: E402
from gptk_jax.llama.checkpoint import load_converted  # noqa: E402
from gptk_jax.llama.kv_cache import KVCache  # noqa: E402
from gptk_jax.llama.model import Llama, params_for_model  # noqa: E402


def filled_cache(config, batch: int, context: int) -> KVCache:
    """A cache of `context` filled positions per row and 9 free slots (room for T <= 8)."""
    cache = KVCache.init(config, batch, context + 9)
    return cache.replace(valid=cache.valid.at[:, :context].set(True),
                         lengths=jnp.full((batch,), context, jnp.int32))


def decoder_trunk(checkpoint) -> tuple:
    """(config, params) of the converted trunk as decoders run it: few-row kernels ("auto"),
    fused projections."""
    model = load_converted(checkpoint)
    config = model.config.replace(matmul=resolve_matmul("auto"), fuse_projections=True)
    return config, jax.device_put(params_for_model(model.params, config))


def _jnp_argmax(logits):
    return jnp.argmax(logits, -1).astype(jnp.int32)


def trunk_loop(config, context: int, logits: str, iterations: int = 8, pick=_jnp_argmax):
    """pick: logits [..., V] -> [...] int32 (default jnp.argmax; decoders use
    kernels/argmax.py `first_argmax`)."""
    def loop(params, cache, tokens):
        positions = context + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                               tokens.shape)

        def body(_, carry):
            cache, tokens = carry
            model = Llama(config)
            if logits == "all":
                out = model.apply({"params": params}, tokens, positions, cache=cache)
                nxt = pick(out.logits)
            elif logits == "last":
                out = model.apply({"params": params}, tokens, positions, cache=cache,
                                  logits_index=jnp.zeros((tokens.shape[0],), jnp.int32))
                nxt = jnp.broadcast_to(pick(out.logits), tokens.shape)
            else:
                out = model.apply({"params": params}, tokens, positions, cache=cache,
                                  compute_logits=False)
                nxt = tokens + (out.hidden_normed[..., 0] > 0).astype(jnp.int32)
            return out.cache.replace(lengths=cache.lengths), nxt
        return jax.lax.fori_loop(0, iterations, body, (cache, tokens))
    return jax.jit(loop)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    p.add_argument("--context", type=int, default=92)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output-json", type=Path, default=None)
    p.add_argument("--calibration-json", type=Path, default=None,
                   help="write the verify cost table auto W reads (decoding/cost.py)")
    p.add_argument("--matmul", default="xla", help="xla, few_rows or auto (a decoder's)")
    p.add_argument("--layouts", default="plain", help="plain and/or fused, comma-separated")
    args = p.parse_args(argv)
    model = load_converted(args.checkpoint)
    layouts = args.layouts.split(",")
    if not layouts or set(layouts) - {"plain", "fused"}:
        p.error(f"--layouts: plain and/or fused, got {args.layouts!r}")
    configs = {name: model.config.replace(matmul=resolve_matmul(args.matmul),
                                          fuse_projections=name == "fused") for name in layouts}
    params_of = {name: jax.device_put(params_for_model(model.params, c))
                 for name, c in configs.items()}
    config = configs[layouts[0]]
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cache = filled_cache(config, batch, args.context)
        for rnd in range(args.rounds):
            for logits, ts in (("all", (1, 2, 4, 8)), ("last", (1, 4)), ("none", (1, 4))):
                for t, layout in ((t, layout) for t in ts for layout in layouts):
                    s = _per_iteration(trunk_loop(configs[layout], args.context, logits),
                                       params_of[layout], cache,
                                       jnp.ones((batch, t), jnp.int32), iterations=8, reps=3)
                    gflops = 2 * n_params * batch * t / s / 1e9
                    results.append({"batch": batch, "round": rnd, "logits": logits, "t": t,
                                    "layout": layout, "matmul": configs[layout].matmul,
                                    "ms": 1e3 * s, "gflop_per_s": gflops})
                    print(f"batch {batch} round {rnd} logits={logits:4s} T={t} {layout:5s}: "
                          f"{1e3 * s:6.1f} ms ({gflops:5.1f} GFLOP/s)", flush=True)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({"context": args.context, "params": n_params,
                                                "results": results}, indent=2))
    if args.calibration_json:
        seconds = {}
        for r in results:
            if r["logits"] == "all" and r["layout"] == layouts[0]:
                row = seconds.setdefault(r["batch"], {})
                row[r["t"]] = min(row.get(r["t"], float("inf")), r["ms"] / 1e3)
        VerifyCost(seconds, source="bench/bench_verify_cost.py (trunk verify call only)",
                   context=args.context, device=device_name()).save(args.calibration_json)
        print(f"wrote {args.calibration_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
