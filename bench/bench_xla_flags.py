"""XLA:CPU options against the default, on the decode step (issue 16): for each option set a fresh
process (XLA_FLAGS is read once, when jax starts) measures greedy's step at batch 1 and 8 and a
W-token verify step at batch 8 (the oracle's, whose drafting is a table read), and decodes a few
real prompts, greedy and with prompt lookup at W (each compiled in the call: compile ms); the
table gives each option's step and compile times over the default's and whether its tokens
equal the default's (lookup's must equal greedy's under each option too).

    python bench/bench_xla_flags.py [--checkpoint .cache/models/smollm2-135m] [--w 4]
        [--options="--xla_cpu_use_xnnpack=true;--xla_cpu_use_onednn=true"]
        [--output-json bench/results/xla_flags.json]

Each option set runs twice, alternating with the default (A B A B), and keeps its best: the
machine's noise hits both alike. Compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_OPTIONS = ("--xla_cpu_use_xnnpack=true", "--xla_cpu_use_onednn=true",
                   "--xla_cpu_experimental_onednn_custom_call=true",
                   "--xla_cpu_experimental_xnn_fusion_type=dot",
                   "--xla_cpu_multi_thread_eigen=false")
PROMPTS = ("Übersetze ins Englische: Das Haus ist klein.\nEnglisch:",
           "Die Regierung hat am Montag neue Regeln für den Verkehr angekündigt.",
           "The capital of France is")


def measure(checkpoint: str, w: int, new_tokens: int) -> dict:
    """In this process (XLA_FLAGS already set): step ms and a few prompts' greedy tokens."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from gptk_jax.decoding.cost import measure_step_seconds
    from gptk_jax.decoding.factory import GREEDY, DecoderSpec, make_decoder
    from gptk_jax.decoding.oracle import oracle_variables
    from gptk_jax.llama.checkpoint import load_converted

    model = load_converted(checkpoint)
    greedy = make_decoder(model, GREEDY)
    out = {}
    for b in (1, 8):
        sec = measure_step_seconds(greedy.config, None, greedy.params, (), b, [1], reps=5)
        out[f"greedy_b{b}_ms"] = 1e3 * sec[1]
    rng = np.random.default_rng(0)
    refs = oracle_variables([rng.integers(1, model.config.vocab_size, 8 * w + 2).tolist()
                             for _ in range(8)], [64] * 8, 8, w - 1)
    oracle = make_decoder(model, DecoderSpec("oracle", tokens_per_step=w), base=greedy,
                          references=refs)
    sec = measure_step_seconds(oracle.config, oracle.drafter, oracle.params, oracle.drafter_vars,
                               8, [w], reps=5)
    out[f"verify_w{w}_b8_ms"] = 1e3 * sec[w]
    tok = model.tokenizer
    ids = [tok.encode(p, bos=tok.add_bos) for p in PROMPTS]
    result = greedy.generate(ids, new_tokens, batch_size=len(ids))
    out["tokens"], out["greedy_compile_ms"] = result.tokens, 1e3 * result.compile_seconds
    lookup = make_decoder(model, DecoderSpec("lookup", tokens_per_step=w), base=greedy)
    result = lookup.generate(ids, new_tokens, batch_size=len(ids))   # compiled afresh
    out["lookup_compile_ms"] = 1e3 * result.compile_seconds
    out["lookup_tokens_equal"] = result.tokens == out["tokens"]
    return out


def run_child(checkpoint: str, options: str, w: int, new_tokens: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(x for x in (env.get("XLA_FLAGS", ""), options) if x)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)     # every child compiles: compile ms are real
    proc = subprocess.run([sys.executable, __file__, "--child", "--checkpoint", checkpoint,
                           "--w", str(w), "--new-tokens", str(new_tokens)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(a: dict, b: dict) -> dict:
    if "error" in a or "error" in b:
        return a if "error" in a else b
    out = {k: (min(a[k], b[k]) if k.endswith("_ms") else a[k]) for k in a}
    out["lookup_tokens_equal"] = a["lookup_tokens_equal"] and b["lookup_tokens_equal"]
    out["runs_agree"] = a["tokens"] == b["tokens"]          # the same option, run twice
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    p.add_argument("--w", type=int, default=4, help="tokens of the verify step measured")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--options", default=";".join(DEFAULT_OPTIONS),
                   help="option sets separated by ';' (each one XLA_FLAGS string)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.checkpoint, args.w, args.new_tokens)))
        return 0
    options = [o.strip() for o in args.options.split(";") if o.strip()]
    results = {}
    for option in options:
        runs = {"": [], option: []}
        for _ in range(2):                       # A B A B
            for key in ("", option):
                runs[key].append(run_child(args.checkpoint, key, args.w, args.new_tokens))
        base, cand = best(*runs[""]), best(*runs[option])
        results[option] = {"default": base, "option": cand}
        print(f"done: {option}", file=sys.stderr, flush=True)
    keys = ["greedy_b1_ms", "greedy_b8_ms", f"verify_w{args.w}_b8_ms", "greedy_compile_ms",
            "lookup_compile_ms"]
    print("| XLA_FLAGS | " + " | ".join(f"{k} (default → option, ratio)" for k in keys)
          + " | tokens equal default's (and lookup's greedy's) |")
    print("|---" * (len(keys) + 2) + "|")
    for option, r in results.items():
        if "error" in r["option"] or "error" in r["default"]:
            print(f"| `{option}` | error: {r['option'].get('error') or r['default'].get('error')}"
                  + " |" * (len(keys) + 1))
            continue
        cells = [f"{r['default'][k]:.1f} → {r['option'][k]:.1f} "
                 f"({r['option'][k] / r['default'][k]:.2f}x)" for k in keys]
        same = (r["option"]["tokens"] == r["default"]["tokens"] and r["option"]["runs_agree"]
                and r["option"]["lookup_tokens_equal"] and r["default"]["lookup_tokens_equal"])
        print(f"| `{option}` | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"w": args.w, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
