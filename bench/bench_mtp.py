"""Greedy vs self-speculative (MTP) decoding, side by side in one process.

    python bench/bench_mtp.py --checkpoint .cache/models/smollm2-135m [--heads HEADS_DIR]
        [--tokens-per-step 4] [--num-prompts 8] [--max-new-tokens 64] [--batch-sizes 1,8]
        [--shots 5]
        [--output out/bench_mtp.json] [--profile out/trace]

Prompts: the first --num-prompts German sentences of newstest2014 (read at run time from
DATA_ROOT/wmt14-de-en/newstest2014.de, split on '\\n' only; --data-root, else $GPTK_DATA, else
../shared/data from the working directory) in the translation prompt
format of gptk_jax.data.prompts with --shots few-shot lines; generation stops at the tokenizer's
stop ids and at a newline (the end of a `de: …; en: …` line; --no-stop-at-newline: only at the
stop ids, i.e. mostly at --max-new-tokens).

Rows: our greedy decoder; MTP with the oracle drafter (drafts the true greedy continuation:
every draft accepted, the upper bound for W); MTP with trained heads when --heads is given. Every
MTP run is checked token-identical to greedy. tokens/s = generated tokens / (prefill + decode
seconds), compilation excluded (each shape is compiled once and run again for the timing);
τ = tokens per verify step, the bonus token included.

Also timed: one trunk step at T=1 vs T=W on a filled cache (the verify-cost ratio), and one MTP
step split into draft / verify (trunk over W + argmax) / the rest (acceptance, rollback, logs).
`--random-trunk` runs everything on a tiny random trunk and random prompts (a smoke test of this
script, no checkpoint needed).
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

from gptk_jax.data.prompts import encode_prompts  # noqa: E402
from gptk_jax.data.root import add_data_root_argument, resolve_data_root  # noqa: E402
from gptk_jax.data.testsets import news_commentary, wmt14_path  # noqa: E402
from gptk_jax.llama.config import LlamaConfig  # noqa: E402
from gptk_jax.decoding.factory import (GREEDY, DecoderSpec, Trunk, make_decoder,  # noqa: E402
                                       make_drafter)
from gptk_jax.decoding.inputs import pad_prompts, stop_id_array  # noqa: E402
from gptk_jax.decoding.loop import cache_slots, decode_step, prefill_state  # noqa: E402
from gptk_jax.decoding.oracle import oracle_variables  # noqa: E402
from gptk_jax.llama.kv_cache import KVCache  # noqa: E402
from gptk_jax.llama.model import Llama, init_params, params_for_model  # noqa: E402


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def read_sources(path: Path, n: int) -> list[str]:
    text = path.read_bytes().decode("utf-8")
    lines = [l[:-1] if l.endswith("\r") else l for l in text.split("\n")]
    return [l for l in lines if l.strip()][:n]


def load_model(args):
    """-> (config, params in model layout, prompt id lists, stop ids, pad id, trunk name)."""
    if args.random_trunk:
        config = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             ffn_dim=128, rope_theta=10000.0, max_seq_len=1024)
        params = params_for_model(init_params(config, jax.random.PRNGKey(0)), config)
        rs = np.random.RandomState(0)
        prompts = [rs.randint(3, 512, rs.randint(8, 40)).tolist()
                   for _ in range(args.num_prompts)]
        return config, params, prompts, [2], 0, "random-trunk"
    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.data.prompts import prompt_format, translation_stop_ids

    model = load_converted(args.checkpoint, scan_layers=args.scan_layers, dtype=args.dtype)
    tok = model.tokenizer
    data_root = resolve_data_root(args.data_root)
    fmt = prompt_format("de", "en", args.shots, space_with_target=not args.research_space,
                        shots_from=news_commentary(data_root))
    sources = read_sources(wmt14_path(data_root, "newstest2014.de"), args.num_prompts)
    prompts = encode_prompts(fmt, tok, sources)   # the tokenizer's BOS rule
    stop_ids = translation_stop_ids(tok) if args.stop_at_newline else set(tok.stop_ids)
    return model.config, model.params, prompts, sorted(stop_ids), tok.pad_id, \
        Path(args.checkpoint).name


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------------------
# End-to-end runs
# --------------------------------------------------------------------------------------------

def run_method(name, generate, prompt_chunks, batch, repeats):
    """Runs every chunk once to compile (and warm up), then `repeats` times for the timing,
    keeping each chunk's best prefill and best decode time (the machine may be shared)."""
    for chunk in prompt_chunks:
        generate(chunk, batch, None)
    results = []
    for i, chunk in enumerate(prompt_chunks):
        runs = [generate(chunk, batch, i) for _ in range(repeats)]
        best = runs[0]
        best.prefill_seconds = min(r.prefill_seconds for r in runs)
        best.decode_seconds = min(r.decode_seconds for r in runs)
        results.append(best)
    prefill = [r.prefill_seconds for r in results]
    decode = [r.decode_seconds for r in results]
    tokens = sum(r.total_generated for r in results)
    # the prefill emits each row's first token; decode tokens are the rest
    decode_tokens = tokens - sum(len(r.tokens) for r in results)
    row = {"method": name, "batch_size": batch, "tokens": tokens,
           "seconds": sum(prefill) + sum(decode), "prefill_seconds": sum(prefill),
           "decode_seconds": sum(decode),
           "tokens_per_second": tokens / (sum(prefill) + sum(decode)),
           "decode_tokens_per_second": decode_tokens / sum(decode),
           "trunk_calls": sum(r.num_steps for r in results),
           # decode-loop iterations (one trunk call each) and their mean cost, in the loop
           "loop_iterations": sum(r.num_steps - 1 for r in results)}
    row["ms_per_iteration"] = 1e3 * row["decode_seconds"] / max(row["loop_iterations"], 1)
    if results[0].tokens_per_step > 1:    # draft-and-verify
        steps = sum(r.stats["verify_steps"] for r in results)
        from_steps = sum(r.stats["tokens_from_verify_steps"] for r in results)
        hist = np.sum([r.stats["accepted_histogram"] for r in results], axis=0)
        row.update(verify_steps=steps, tau=from_steps / steps if steps else None,
                   accepted_histogram=hist.tolist(),
                   accepted_per_row=[a for r in results for a in r.stats["accepted_per_row"]])
    return row, [t for r in results for t in r.tokens], results


def end_to_end(args, trunk, prompts, greedy_decoder, decoders):
    """decoders: name -> Decoder (decoding.factory.make_decoder, from greedy_decoder) run after
    the oracle."""
    rows, checks = [], []
    k = args.tokens_per_step
    # one decoder per method for the whole run: each compiles once per batch shape; the
    # oracle's references change per chunk, its executables are shared (make_decoder's base)
    oracle_spec, oracle_loop = DecoderSpec("oracle", tokens_per_step=k), []
    for batch in args.batch_sizes:
        prompt_chunks = chunks(prompts, batch)
        greedy_fn = lambda chunk, b, _: greedy_decoder.generate(
            chunk, args.max_new_tokens, bucket=args.bucket, batch_size=b)
        greedy_row, greedy_tokens, greedy_results = run_method("greedy", greedy_fn,
                                                               prompt_chunks, batch, args.repeats)
        rows.append(greedy_row)

        stop_tokens = {}  # chunk index -> stop id per row, learnt from the compile run

        def oracle_fn(chunk, b, index):
            """The compile run (index None) drafts a dummy continuation (output is exact anyway)
            and records which stop id each row ended on; the timed run drafts the greedy
            continuation plus that stop id, so every draft is accepted."""
            if index is None:
                conts = [[0] for _ in chunk]
            else:
                ref = greedy_results[index]
                conts = [t + [s] if s is not None else t
                         for t, s in zip(ref.tokens, stop_tokens[id(chunk)])]
            conts = [(c + [0] * args.max_new_tokens)[:args.max_new_tokens] for c in conts]
            variables = oracle_variables(conts, [len(p) for p in chunk], b, k - 1)
            oracle = make_decoder(trunk, oracle_spec, references=variables,
                                  base=oracle_loop[0] if oracle_loop else greedy_decoder)
            oracle_loop[:] = [oracle]
            result = oracle.generate(chunk, args.max_new_tokens, bucket=args.bucket,
                                     batch_size=b)
            if index is None:
                stop_tokens[id(chunk)] = result.stop_tokens
            return result
        methods = [(f"mtp-oracle-k{k}", oracle_fn)]
        # (default arguments bind each decoder now: a closure would see the loop's last one)
        for name, decoder in decoders.items():
            methods.append((name, lambda chunk, b, _, d=decoder: d.generate(
                chunk, args.max_new_tokens, bucket=args.bucket, batch_size=b)))
        for name, fn in methods:
            if args.profile and name.startswith("mtp-oracle") and batch == args.batch_sizes[0]:
                with jax.profiler.trace(args.profile):
                    row, tokens, _ = run_method(name, fn, prompt_chunks, batch, args.repeats)
            else:
                row, tokens, _ = run_method(name, fn, prompt_chunks, batch, args.repeats)
            row["identical_to_greedy"] = tokens == greedy_tokens
            row["speedup"] = row["tokens_per_second"] / greedy_row["tokens_per_second"]
            row["decode_speedup"] = (row["decode_tokens_per_second"]
                                     / greedy_row["decode_tokens_per_second"])
            checks.append(row["identical_to_greedy"])
            rows.append(row)
    return rows, all(checks)


# --------------------------------------------------------------------------------------------
# Micro-benchmarks: verify cost and where an MTP step's time goes
# --------------------------------------------------------------------------------------------

def _per_iteration(loop_fn, *args, iterations, reps):
    """Seconds per iteration of `loop_fn(*args)`, a jitted fori_loop of `iterations` calls whose
    carry chains one call to the next (so nothing is hoisted out of the loop), as in the decode
    loop: no per-call dispatch, carry updated in place. Best of `reps` (shared machine)."""
    jax.block_until_ready(loop_fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(loop_fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times) / iterations


def verify_cost(config, params, batch, context, k, reps, iterations=8):
    """Seconds of one trunk call with T new tokens on a cache holding `context` slots, logits at
    all T and their argmax (what a verify step computes), for T = 1 and T = W, timed inside a
    loop that feeds the argmax back and rewrites the same slots."""
    cache = KVCache.init(config, batch, context + k + 1)
    cache = cache.replace(valid=cache.valid.at[:, :context].set(True),
                          lengths=jnp.full((batch,), context, jnp.int32))

    def trunk_loop(params, cache, tokens):
        positions = context + jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                               tokens.shape)

        def body(_, carry):
            cache, tokens = carry
            out = Llama(config).apply({"params": params}, tokens, positions, cache=cache)
            return (out.cache.replace(lengths=cache.lengths),
                    jnp.argmax(out.logits, axis=-1).astype(jnp.int32))
        return jax.lax.fori_loop(0, iterations, body, (cache, tokens))

    loop = jax.jit(trunk_loop)
    out = {t: _per_iteration(loop, params, cache, jnp.ones((batch, t), jnp.int32),
                             iterations=iterations, reps=reps) for t in (1, k)}
    return {"batch_size": batch, "context": context, "k": k, "seconds_t1": out[1],
            "seconds_tk": out[k], "ratio": out[k] / out[1]}


def step_breakdown(config, params, prompts, stop_ids, pad_id, drafter, variables, k, batch,
                   max_new, bucket, reps, label, iterations=8):
    """Seconds per call, inside a loop, of: the drafter's draft, the verify (trunk over W +
    argmax), a whole decode step; from the state right after the prefill of the first `batch`
    prompts."""
    chunk = prompts[:batch]
    batch_prompts = pad_prompts(chunk, pad_id, bucket=bucket, batch_size=batch)
    stops, pad = stop_id_array(stop_ids), np.int32(pad_id)
    slots = cache_slots(batch_prompts.padded_length, max_new, k)
    state = jax.jit(prefill_state, static_argnums=(0, 1, 2, 3, 4))(
        config, drafter, k, max_new, slots, params, variables, batch_prompts, stops, pad)

    def draft(v, s, next_token):
        return drafter.draft(v, s.drafter_state, s.last_hidden, s.last_hidden_normed,
                             s.positions - 1, next_token)[:, :k - 1].astype(jnp.int32)

    @jax.jit
    def draft_loop(v, s):
        return jax.lax.fori_loop(0, iterations, lambda _, t: draft(v, s, t)[:, 0], s.next_token)

    @jax.jit
    def verify_loop(params, s, drafts):
        positions = s.positions[:, None] + jnp.arange(k, dtype=jnp.int32)

        def body(_, carry):
            cache, next_token = carry
            tokens = jnp.concatenate([next_token[:, None], drafts], axis=1)
            out = Llama(config).apply({"params": params}, tokens, positions, cache=cache)
            return (out.cache.replace(lengths=cache.lengths),
                    jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32))
        return jax.lax.fori_loop(0, iterations, body, (s.cache, s.next_token))

    @jax.jit
    def step_loop(params, v, s):
        return jax.lax.fori_loop(0, iterations,
                                 lambda _, s: decode_step(config, drafter, k, params, v, s,
                                                          stops), s)

    drafts = jax.jit(draft)(variables, state, state.next_token)
    t_draft = _per_iteration(draft_loop, variables, state, iterations=iterations, reps=reps)
    t_verify = _per_iteration(verify_loop, params, state, drafts, iterations=iterations,
                              reps=reps)
    t_step = _per_iteration(step_loop, params, variables, state, iterations=iterations,
                            reps=reps)
    return {"drafter": label, "batch_size": batch, "k": k, "draft_seconds": t_draft,
            "verify_seconds": t_verify, "step_seconds": t_step,
            "other_seconds": t_step - t_draft - t_verify}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def print_report(report):
    print(f"\n== end to end: {report['num_prompts']} prompts, max {report['max_new_tokens']} new "
          f"tokens, W={report['k']} (tau = tokens per verify step, bonus token included; "
          "decode = after the prefill, which emits each row's first token)")
    print(f"{'method':<24} {'batch':>5} {'tokens':>6} {'prefill s':>9} {'decode s':>8} "
          f"{'ms/iter':>7} {'tok/s':>6} {'dec tok/s':>9} {'tau':>5} {'speedup':>7} "
          f"{'dec speedup':>11} {'identical':>9}  accepted-drafts histogram")
    for r in report["end_to_end"]:
        tau = f"{r['tau']:.2f}" if r.get("tau") else "-"
        print(f"{r['method']:<24} {r['batch_size']:>5} {r['tokens']:>6} "
              f"{r['prefill_seconds']:>9.2f} {r['decode_seconds']:>8.2f} "
              f"{r['ms_per_iteration']:>7.1f} {r['tokens_per_second']:>6.1f} {r['decode_tokens_per_second']:>9.1f} {tau:>5} "
              f"{r.get('speedup', 1.0):>7.2f} {r.get('decode_speedup', 1.0):>11.2f} "
              f"{str(r.get('identical_to_greedy', '-')):>9}  {r.get('accepted_histogram', '')}")
    print("\n== verify cost: one trunk call in a loop, logits + argmax at every new token")
    for v in report["verify_cost"]:
        print(f"batch {v['batch_size']}, context {v['context']}: T=1 {v['seconds_t1'] * 1e3:.2f} "
              f"ms, T={v['k']} {v['seconds_tk'] * 1e3:.2f} ms, ratio {v['ratio']:.2f}")
    print("\n== one MTP step in a loop (ms): draft / verify / rest (acceptance, rollback, "
          "drafter advance, logs; timed apart, so the parts need not add up exactly)")
    for s in report["step_breakdown"]:
        print(f"{s['drafter']:<14} batch {s['batch_size']}: step {s['step_seconds'] * 1e3:.2f} = "
              f"draft {s['draft_seconds'] * 1e3:.2f} + verify {s['verify_seconds'] * 1e3:.2f} + "
              f"rest {s['other_seconds'] * 1e3:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".cache" / "models" / "smollm2-135m"))
    add_data_root_argument(p)
    p.add_argument("--heads", default=None, help="trained heads folder (gptk_jax.heads.io)")
    p.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=int, default=4,
                   help="W, tokens per verify step")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--shots", type=int, default=5,
                   help="few-shot lines (the first suitable News Commentary pairs)")
    p.add_argument("--research-space", action="store_true",
                   help="prompts end at 'en: ' (default: 'en:', the space with the target)")
    p.add_argument("--bucket", type=int, default=64, help="prompt length bucket")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions of each micro-benchmark loop (the best is kept)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each chunk end to end (the best is kept)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--stop-at-newline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--output", default=str(ROOT / "out" / "bench_mtp.json"))
    p.add_argument("--profile", default=None, help="write a jax profiler trace of the oracle run")
    p.add_argument("--random-trunk", action="store_true", help="tiny random trunk (smoke test)")
    p.add_argument("--lookup", action="store_true",
                   help="also prompt-lookup drafting (decoding/lookup.py), alone and, with "
                        "--heads, in front of the heads")
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="heads draft over the N most frequent News Commentary English tokens")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    config, params, prompts, stop_ids, pad_id, trunk_name = load_model(args)
    k = args.tokens_per_step
    trunk = Trunk(config, params, name=trunk_name)
    specs, loaded, heads_label = {}, None, None   # name -> DecoderSpec, run after the oracle
    if args.heads:
        from gptk_jax.heads.io import load_heads
        loaded = load_heads(args.heads, config, trunk_name)
        draft_vocab = None
        if args.draft_vocab_size:
            from gptk_jax.decoding.draft_vocab import build_draft_vocab
            from gptk_jax.llama.checkpoint import TOKENIZER_DIR
            from gptk_jax.tokenizers import load_tokenizer
            tok = load_tokenizer(Path(args.checkpoint) / TOKENIZER_DIR)
            text = f"{news_commentary(resolve_data_root(args.data_root))}.en"
            draft_vocab = build_draft_vocab(tok, args.draft_vocab_size, text,
                                            space_with_target=not args.research_space)
        heads_label = "heads" + (f"-v{args.draft_vocab_size}" if args.draft_vocab_size else "")
        specs[f"mtp-{heads_label}-k{k}"] = DecoderSpec("mtp", tokens_per_step=k,
                                                       heads=args.heads, draft_vocab=draft_vocab)
        if draft_vocab is not None:   # the same heads over the full vocabulary, side by side
            specs[f"mtp-heads-fullvocab-k{k}"] = DecoderSpec("mtp", tokens_per_step=k,
                                                             heads=args.heads)
    if args.lookup:
        specs[f"mtp-lookup-k{k}"] = DecoderSpec("lookup", tokens_per_step=k)
        if args.heads:
            specs[f"mtp-heads+lookup-k{k}"] = DecoderSpec(
                "mtp+lookup", tokens_per_step=k, heads=args.heads, draft_vocab=draft_vocab)
    print(f"trunk {trunk_name}: dim {config.dim}, {config.n_layers} layers, vocab "
          f"{config.vocab_size}, dtype {config.dtype}; {jax.devices()[0].platform}; "
          f"{len(prompts)} prompts, mean {np.mean([len(p) for p in prompts]):.0f} tokens")

    greedy_decoder = make_decoder(trunk, GREEDY, stop_ids=stop_ids, pad_id=pad_id)
    decoders = {name: make_decoder(trunk, spec, base=greedy_decoder, heads=loaded)
                for name, spec in specs.items()}
    rows, identical = end_to_end(args, trunk, prompts, greedy_decoder, decoders)
    context = int(np.mean([len(q) for q in prompts])) + args.max_new_tokens // 2
    costs = [verify_cost(config, params, b, context, k, args.reps)
             for b in args.batch_sizes]
    breakdown = []
    for b in args.batch_sizes:
        references = oracle_variables([[0] * args.max_new_tokens] * b,
                                      [len(q) for q in prompts[:b]], b, k - 1)
        oracle, variables, _ = make_drafter(trunk, DecoderSpec("oracle", tokens_per_step=k),
                                            references=references)
        breakdown.append(step_breakdown(config, params, prompts, stop_ids, pad_id, oracle,
                                        variables, k, b, args.max_new_tokens, args.bucket,
                                        args.reps, "oracle"))
        for name, decoder in decoders.items():   # the heads first, then the others
            label = name.replace("mtp-", "", 1).rsplit("-k", 1)[0]   # heads[-vN], lookup, ...
            breakdown.append(step_breakdown(config, params, prompts, stop_ids, pad_id,
                                            decoder.drafter, decoder.drafter_vars, k, b,
                                            args.max_new_tokens, args.bucket, args.reps, label))
    report = {"trunk": trunk_name, "platform": jax.devices()[0].platform,
              "dtype": config.dtype, "k": k, "num_prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "heads": args.heads,
              "draft_vocab_size": args.draft_vocab_size,
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "end_to_end": rows, "verify_cost": costs, "step_breakdown": breakdown,
              "all_identical_to_greedy": identical}
    print_report(report)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    if not identical:
        print("ERROR: an MTP run differs from greedy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
