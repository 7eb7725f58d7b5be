"""Building decode programs with the unrolled trunk traced once per layer shape
(llama/model.py SHARED_LAYER_TRACE, the default) against traced layer by layer (before): for
each mode a fresh process, no persistent compilation cache, on the real converted SmolLM2:
greedy and prompt lookup (W = 4) at batch 1 and 8, each decoder's first call (trace + lower +
compile + run), its compile seconds as the decoder counts them (trace, lower and XLA), a step-cost
calibration (W = 1..4 and greedy's step, each a program built) and decode ms per step (best of
3 calls after the first); the table gives the shared mode over the per-layer one and whether
every token matches.

    python bench/bench_trace.py [--checkpoint .cache/models/smollm2-135m] [--repeats 2]
        [--output-json bench/results/trace.json]

Modes alternate (A B A B) and each keeps its best: the machine's noise hits both alike.
Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 32


def measure(checkpoint: str, shared: bool) -> dict:
    """In this process: first-call, compile, calibration and step times, and the tokens."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import gptk_jax.llama.model as model_module
    model_module.SHARED_LAYER_TRACE = shared
    from gptk_jax.decoding.factory import DecoderSpec, make_decoder
    from gptk_jax.llama.checkpoint import load_converted

    model = load_converted(checkpoint)
    rng = np.random.RandomState(0)
    base = [rng.randint(100, 40000, 50).tolist() for _ in range(8)]
    prompts = [p * 2 + p[:10 + 3 * i] for i, p in enumerate(base)]   # lookup finds repeats
    out = {}
    for spec in (DecoderSpec("greedy"), DecoderSpec("lookup", tokens_per_step=4)):
        dec = make_decoder(model, spec, stop_ids=[], pad_id=0)
        for b in (1, 8):
            start = time.perf_counter()
            first = dec.generate(prompts[:b], NEW_TOKENS, batch_size=b)
            first_s = time.perf_counter() - start
            runs = [dec.generate(prompts[:b], NEW_TOKENS, batch_size=b) for _ in range(3)]
            best = min(r.decode_seconds / r.num_steps for r in runs)
            out[f"{spec.method}/b{b}"] = {"first_call_s": first_s,
                                          "compile_s": first.compile_seconds,
                                          "decode_ms_per_step": 1e3 * best,
                                          "tokens": runs[-1].tokens}
        if spec.drafts:
            start = time.perf_counter()
            dec.calibrate([8])
            out["lookup/calibrate_b8"] = {"first_call_s": time.perf_counter() - start}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output-json")
    p.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(measure(a.checkpoint, a.child == "1")))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    best: dict = {"0": {}, "1": {}}
    for _ in range(a.repeats):
        for mode in ("0", "1"):
            proc = subprocess.run([sys.executable, __file__, "--checkpoint", a.checkpoint,
                                   "--child", mode], capture_output=True, text=True, env=env,
                                  check=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            for key, row in got.items():
                kept = best[mode].setdefault(key, row)
                for field, value in row.items():
                    if field != "tokens":
                        kept[field] = min(kept[field], value)
    print(f"{'program':22s} {'field':20s} {'per layer':>10s} {'shared':>10s} {'ratio':>7s}")
    rows = []
    for key in best["0"]:
        for field in ("first_call_s", "compile_s", "decode_ms_per_step"):
            if field in best["0"][key]:
                before, after = best["0"][key][field], best["1"][key][field]
                rows.append({"program": key, "field": field, "per_layer": before,
                             "shared": after, "ratio": after / before})
                print(f"{key:22s} {field:20s} {before:10.2f} {after:10.2f} "
                      f"{after / before:6.2f}x")
    same = all(best["0"][k].get("tokens") == best["1"][k].get("tokens") for k in best["0"])
    greedy_same = all(best[m][f"lookup/b{b}"]["tokens"] == best[m][f"greedy/b{b}"]["tokens"]
                      for m in "01" for b in (1, 8))
    print(f"tokens identical across modes: {same}; lookup identical to greedy: {greedy_same}")
    if a.output_json:
        Path(a.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output_json).write_text(json.dumps(
            {"rows": rows, "tokens_identical": same, "lookup_equals_greedy": greedy_same,
             "repeats": a.repeats, "checkpoint": a.checkpoint}, indent=1) + "\n")
    return 0 if same and greedy_same else 1


if __name__ == "__main__":
    sys.exit(main())
