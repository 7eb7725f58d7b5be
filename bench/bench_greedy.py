"""Greedy tokens/s: our jitted decoder vs HF transformers' `generate`, side by side in one process.

    python bench/bench_greedy.py [--checkpoint .cache/models/smollm2-135m] [--gguf FILE]
        [--num-prompts 8] [--shots 3] [--max-new-tokens 64] [--batch-sizes 1,8] [--repeats 1]
        [--held-prefix] [--output-json out/bench_greedy.json]

Model: SmolLM2-135M-Instruct. Ours reads the converted folder (converted from the GGUF by
`python -m convert` when missing); transformers loads the same GGUF itself (dequantized), both in
float32 on CPU. Prompts: the demo's few-shot translation prompts for the first --num-prompts
newstest2014 sentences, encoded once with our tokenizer (BOS first) and fed as the same ids to
both; batches are left-padded. Both generate exactly --max-new-tokens tokens per row (no stop
ids: ours gets none, transformers gets eos_token_id=None), so tokens = rows x max_new_tokens.

Timing: each batch size is warmed up first (ours: one pass over every batch, so each padded
length is compiled before timing, compile time reported as compile s; transformers: one short
generate), then the whole prompt set is decoded --repeats times and the fastest repeat counts.
tokens/s = tokens / (prefill + decode). Ours times its prefill and decode loop separately;
transformers' prefill is timed as generate(max_new_tokens=1) on the same batch and its decode as
the rest. Ours prefills each batch whole, as transformers does (a prefix its rows share runs once
per batch; nothing is kept between batches); --held-prefix adds a row where the prompts' common
prefix (instruction + shots) is prefilled once beforehand and held, as `gptk_jax.evaluate` does.
The token agreement column counts rows whose tokens equal transformers' (float32 reduction order
can flip a near-tie argmax).

On a shared machine, pin the run to fixed cores for comparable numbers (`taskset -c 0 python
bench/bench_greedy.py`: one thread each side); the load average is recorded in the JSON.
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
import torch  # noqa: E402

from gptk_jax.data.prompts import encode_prompts  # noqa: E402
from gptk_jax import artifacts  # noqa: E402
from gptk_jax.llama.checkpoint import load_converted  # noqa: E402
from gptk_jax.data.prompts import PromptFormat  # noqa: E402
from gptk_jax.data.root import add_data_root_argument, resolve_data_root  # noqa: E402
from gptk_jax.decoding.factory import GREEDY, make_decoder  # noqa: E402
from gptk_jax.llama.prefix import common_prefix_length  # noqa: E402
DEFAULT_MODEL_DIR = ROOT / ".cache" / "models" / "smollm2-135m"   # `make demo` converts it


def load_pairs(data_root: Path, num_sentences: int, num_shots: int):
    """(newstest2014 pairs, `num_shots` few-shot pairs from newstest2013, the test set's name)."""
    from gptk_jax.data.prompts import few_shot_from
    from gptk_jax.data.root import sacrebleu_cache
    from gptk_jax.data.testsets import WMT14_DIR, load_test_set

    names = (("newstest2014", "newstest2013") if (data_root / WMT14_DIR).is_dir()
             else ("wmt14/full", "wmt13"))
    cache = sacrebleu_cache(data_root)
    test = load_test_set(names[0], data_root, max_sentences=num_sentences, sacrebleu_cache=cache)
    shots = load_test_set(names[1], data_root, sacrebleu_cache=cache)
    return list(test.pairs), few_shot_from(shots.pairs, num_shots), test.name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR,
                   help="converted SmolLM2 folder (converted from the GGUF when missing)")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for transformers (default: the "
                   "fetched SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--bucket", type=int, default=32)
    p.add_argument("--held-prefix", action="store_true",
                   help="also time ours with the prompts' common prefix prefilled once and "
                        "held (as gptk_jax.evaluate does); an extra row, not in the ratios")
    p.add_argument("--output-json", type=Path, default=None)
    add_data_root_argument(p)
    return p.parse_args(argv)


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_ours(decoder, batches: list, max_new: int, batch_size: int, bucket: int,
             hold_prefixes: bool = False):
    """Each batch through decoder.generate. The decoder keeps the prefix its batch's rows share
    (prefilled once per batch) for later calls; unless hold_prefixes, it is dropped before each
    batch, so every batch pays its own prefill as transformers' does."""
    tokens, prefill, decode, compile_s = [], 0.0, 0.0, 0.0
    for batch in batches:
        if not hold_prefixes:
            decoder.prefixes.clear()
        r = decoder.generate(batch, max_new, bucket=bucket, batch_size=batch_size)
        tokens += r.tokens
        prefill += r.prefill_seconds
        decode += r.decode_seconds
        compile_s += r.compile_seconds
    return tokens, prefill, decode, compile_s


def run_held_prefix(decoder, prompts, batches, args, batch_size, n_tokens, hf_tokens) -> dict:
    """Ours again with the prompts' common prefix prefilled once beforehand and held by the
    decoder (what `gptk_jax.evaluate` does): each prompt's prefill runs only its own tokens.
    Best of --repeats; the held prefix's own prefill is not counted (once per process)."""
    held = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    decoder.add_shared_prefix(prompts[0][:held])     # a row keeps >= 1 token of its own
    run_ours(decoder, batches, args.max_new_tokens, batch_size, args.bucket, True)   # compile
    best = None
    for _ in range(args.repeats):
        ours = run_ours(decoder, batches, args.max_new_tokens, batch_size, args.bucket, True)
        if best is None or sum(ours[1:3]) < sum(best[1:3]):
            best = ours
    decoder.prefixes.clear()        # the next batch size's plain rows hold nothing again
    agree = sum(a == b for a, b in zip(best[0], hf_tokens))
    print(f"batch {batch_size}: held prefix of {held} tokens done", flush=True)
    return row(f"gptk_jax greedy, {held}-token prefix held", batch_size, n_tokens,
               best[1], best[2], best[3], f"{agree}/{len(prompts)}",
               len(batches) * (args.max_new_tokens - 1))


def hf_generate(hf, batch: list, pad_id: int, max_new: int) -> tuple[list, float]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):  # left padding
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=max_new,
                          do_sample=False, pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    if out.shape[1] != width + max_new:
        raise RuntimeError(f"transformers stopped after {out.shape[1] - width} of {max_new} tokens")
    return out[:, width:].tolist(), seconds


def run_hf(hf, batches: list, pad_id: int, max_new: int):
    tokens, prefill, total = [], 0.0, 0.0
    for batch in batches:
        prefill += hf_generate(hf, batch, pad_id, 1)[1]
        out, seconds = hf_generate(hf, batch, pad_id, max_new)
        tokens += out
        total += seconds
    return tokens, prefill, total - prefill


def row(impl, batch_size, n_tokens, prefill, decode, compile_s=None, agree=None,
        steps=None) -> dict:
    """steps: decode steps in `decode` (each row's first token comes from its prefill)."""
    total = prefill + decode
    return {"impl": impl, "batch_size": batch_size, "tokens": n_tokens,
            "prefill_s": round(prefill, 4), "decode_s": round(decode, 4),
            "total_s": round(total, 4), "tokens_per_s": round(n_tokens / total, 2),
            "decode_tokens_per_s": round(n_tokens / decode, 2) if decode > 0 else None,
            "decode_ms_per_step": round(1000 * decode / steps, 2) if steps else None,
            "compile_s": None if compile_s is None else round(compile_s, 2),
            "rows_equal_to_transformers": agree}


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    if not (Path(args.checkpoint) / "config.json").is_file():
        raise SystemExit(f"{args.checkpoint}: not a converted model; run `make demo` (or "
                         f"python -m convert --format gguf ...) first")
    model = load_converted(args.checkpoint)
    tok = model.tokenizer
    gguf = args.gguf or artifacts.fetch("smollm2_gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                              dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly max_new_tokens per row, like ours

    pairs, shots, source = load_pairs(resolve_data_root(args.data_root), args.num_prompts,
                                      args.shots)
    decoder = make_decoder(model, GREEDY, stop_ids=[])  # no stops
    fmt = PromptFormat.for_languages("de", "en", shots=shots)
    prompts = encode_prompts(fmt, tok, [p.src for p in pairs])   # the tokenizer's BOS rule
    lengths = [len(p) for p in prompts]
    print(f"{len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens, {args.shots}-shot) from "
          f"{source}; {args.max_new_tokens} new tokens per row; jax {jax.__version__} "
          f"{jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)

    load_before = os.getloadavg()
    rows, ratios = [], {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        batches = chunks(prompts, batch_size)
        n_tokens = len(prompts) * args.max_new_tokens
        _, _, _, compile_s = run_ours(decoder, batches, args.max_new_tokens, batch_size,
                                      args.bucket)
        hf_generate(hf, batches[0], tok.pad_id, 2)
        best_ours = best_hf = None
        for _ in range(args.repeats):
            ours = run_ours(decoder, batches, args.max_new_tokens, batch_size, args.bucket)
            compile_s += ours[3]
            if best_ours is None or sum(ours[1:3]) < sum(best_ours[1:3]):
                best_ours = ours
            theirs = run_hf(hf, batches, tok.pad_id, args.max_new_tokens)
            if best_hf is None or sum(theirs[1:]) < sum(best_hf[1:]):
                best_hf = theirs
        agree = sum(a == b for a, b in zip(best_ours[0], best_hf[0]))
        steps = len(batches) * (args.max_new_tokens - 1)     # decode steps of the whole set
        ours_row = row("gptk_jax greedy", batch_size, n_tokens, best_ours[1], best_ours[2],
                       compile_s, f"{agree}/{len(prompts)}", steps)
        hf_row = row("transformers generate", batch_size, n_tokens, best_hf[1], best_hf[2],
                     steps=steps)
        rows += [ours_row, hf_row]
        if args.held_prefix:
            rows.append(run_held_prefix(decoder, prompts, batches, args, batch_size, n_tokens,
                                        best_hf[0]))
        ratios[f"batch_{batch_size}"] = {
            "tokens_per_s": round(ours_row["tokens_per_s"] / hf_row["tokens_per_s"], 2),
            "decode_tokens_per_s": round(ours_row["decode_tokens_per_s"]
                                         / hf_row["decode_tokens_per_s"], 2)}
        print(f"batch {batch_size}: done", flush=True)

    header = ("batch", "impl", "tokens", "prefill s", "decode s", "tok/s", "decode tok/s",
              "decode ms/step", "compile s", "= HF rows")
    print("\n" + " | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["batch_size"], r["impl"], r["tokens"], r["prefill_s"], r["decode_s"],
            r["tokens_per_s"], r["decode_tokens_per_s"], r["decode_ms_per_step"],
            "" if r["compile_s"] is None else r["compile_s"],
            r["rows_equal_to_transformers"] or "")))
    print(f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"on {len(os.sched_getaffinity(0))} cpus: other processes on the machine slow both "
          "sides, transformers' OpenMP threads far more when cores are oversubscribed")
    for name, ratio in ratios.items():
        print(f"{name}: ours / transformers = {ratio['tokens_per_s']}x tokens/s "
              f"(decode only {ratio['decode_tokens_per_s']}x)")
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
                        "torch_threads": torch.get_num_threads(),
                        "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
            "model": str(model.path), "gguf": str(gguf), "num_prompts": len(prompts),
            "prompt_tokens": lengths, "max_new_tokens": args.max_new_tokens,
            "rows": rows, "ratios": ratios}, indent=2))
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
