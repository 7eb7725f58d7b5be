"""`make demo`: the real SmolLM2-135M-Instruct (GGUF) translating newstest2014 German with our
jitted greedy decoder, then with self-speculative (MTP) decoding through linear heads, on CPU.

    python -m gptk_jax.demo [--num-sentences 8] [--shots 3] [--max-new-tokens 64] [--batch-size 8]
        [--train-steps 50] [--heads DIR] [--tokens-per-step 4] [--eval-sentences 16] [--no-mtp]

Steps: fetch the GGUF (`gptk_jax.artifacts`), convert it once into .cache/models/smollm2-135m
(`python -m convert --format gguf`), build few-shot prompts (instruction, newstest2013 pairs as
shots, then the query; gptk_jax.data.prompts), decode greedily until the translation's line
ends (the one stop rule, gptk_jax.data.prompts.translation_stop_ids), and print source,
translation, reference and tokens/s. Data come from DATA_ROOT/wmt14-de-en, else from sacreBLEU;
DATA_ROOT is --data-root, else $GPTK_DATA, else ../shared/data from the working directory.

Then MTP: linear heads (W tokens per verify step) from --heads DIR, else from
runs/results/linear/heads when `make results` made them (and --train-steps is not given), else
trained here (gptk_jax.training.train_and_evaluate: --train-steps steps of 16 rows, TRAIN_EPOCHS
passes over News Commentary's first steps * 16 / TRAIN_EPOCHS pairs, loss against the trunk's own
argmax, trunk-feature cache, newstest2013 evaluation before and after; into
runs/demo/linear-k<W>-<steps>steps-x<epochs>, reused by a rerun). Printed: the per-offset
top-1 accuracy against the trunk untrained vs trained, then the demo sentences decoded with MTP
next to greedy's output, whether they are token-identical, τ (tokens per verify step) and the
speedup over the greedy run above (compilation excluded from both). Last, the same with prompt
lookup drafting in front of the heads (gptk_jax/decoding/lookup.py): identity, τ and speedup.
The whole run, set-up excluded, takes about 6 minutes on 2 shared CPU cores; its wall time is
printed at the end (docs/benchmarks.md).

Exit status: 0 done; 1 an MTP decode differed from greedy; 2 bad arguments, a model folder that
is not a converted model, data or heads that cannot be read, training that failed: one line on
stderr, "error: ...", no traceback.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from gptk_jax.cli import configs_module
from gptk_jax.data.root import add_data_root_argument, resolve_data_root
from gptk_jax.data.testsets import news_commentary
from gptk_jax.errors import CLI_ERRORS, GptkError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = ROOT / ".cache" / "models" / "smollm2-135m"
RESULTS_HEADS = ROOT / "runs" / "results" / "linear" / "heads"
DEMO_RUNS = ROOT / "runs" / "demo"
TRAIN_EPOCHS = 4          # trained here: --train-steps steps over a quarter as many rows, so the
                          # feature-cache build (the trunk over every row) stays short
DEFAULT_TRAIN_STEPS = 50  # with 16 rows a step: 200 News Commentary pairs; the whole demo then
                          # takes under 10 minutes on 2 CPU cores (docs/benchmarks.md)
ERROR_EXIT = 2            # bad arguments, a model or data that cannot be used: one line on stderr
DISCLAIMER = ("Note: SmolLM2-135M is a weak translator (135M parameters, trained mostly on "
              "English); this demo shows the mechanics and speed of decoding, not translation "
              "quality.")


class DemoError(GptkError):
    """A step of the demo that cannot go on; main() says it in one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):            # one line, not the usage block
        _fail(f"{message} ({self.prog} --help lists the options)")


def _fail(message) -> None:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {' '.join(lines) or type(message).__name__}", file=sys.stderr, flush=True)
    sys.exit(ERROR_EXIT)


def _count(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def ensure_converted(model_dir: Path) -> Path:
    """The converted SmolLM2 folder, converting the fetched GGUF into it first when the folder
    is not there yet (or empty); a folder holding something else is an error, not a target."""
    if (model_dir / "config.json").is_file():
        return model_dir
    if model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir())):
        raise DemoError(f"--model-dir {model_dir} is not a converted model (no config.json): "
                        f"give a folder written by `python -m convert`, or a new or empty one "
                        f"to convert SmolLM2 into")
    from gptk_jax import artifacts

    gguf = artifacts.fetch("smollm2_gguf")
    print(f"converting {gguf} -> {model_dir}", flush=True)
    cmd = [sys.executable, "-m", "convert", "--format", "gguf", "--input", str(gguf),
           "--output", str(model_dir)]
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise DemoError(f"conversion failed (exit code {proc.returncode}): {' '.join(cmd)}")
    return model_dir


def load_pairs(data_root: Path, num_sentences: int, num_shots: int):
    """(test pairs from newstest2014, few-shot pairs from newstest2013, the test set's name)."""
    from gptk_jax.data.prompts import few_shot_from
    from gptk_jax.data.root import sacrebleu_cache
    from gptk_jax.data.testsets import WMT14_DIR, load_test_set

    # without the files: sacreBLEU's cache, downloading where a network exists
    test_name, shots_name = (("newstest2014", "newstest2013") if (data_root / WMT14_DIR).is_dir()
                             else ("wmt14/full", "wmt13"))
    cache = sacrebleu_cache(data_root)
    test = load_test_set(test_name, data_root, max_sentences=num_sentences, sacrebleu_cache=cache)
    shots = load_test_set(shots_name, data_root, sacrebleu_cache=cache)
    return list(test.pairs), few_shot_from(shots.pairs, num_shots), test.name


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="python -m gptk_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                   help="converted model folder (converted here when it does not exist yet)")
    add_data_root_argument(p)
    p.add_argument("--num-sentences", type=_count(1), default=8)
    p.add_argument("--shots", type=_count(0), default=3, help="newstest2013 pairs in the prompt")
    p.add_argument("--max-new-tokens", type=_count(1), default=64)
    p.add_argument("--batch-size", type=_count(1), default=8)
    p.add_argument("--research-space", action="store_true",
                   help="end the prompt at 'en: ' as the research code did, instead of 'en:' "
                        "(SmolLM2's byte-level BPE attaches a space to the next word, so after a "
                        "bare trailing space it mostly emits a newline: empty translations)")
    mtp = p.add_argument_group("MTP (after the greedy translations)")
    mtp.add_argument("--no-mtp", action="store_true", help="greedy only")
    mtp.add_argument("--heads", type=Path, default=None,
                     help="trained heads folder (gptk_jax.heads.io) to use instead of training")
    mtp.add_argument("--train-steps", type=_count(1), default=None,
                     help=f"train linear heads for this many steps (default: reuse "
                          f"{RESULTS_HEADS.relative_to(ROOT)} if present, else "
                          f"{DEFAULT_TRAIN_STEPS} steps)")
    mtp.add_argument("--train-batch-size", type=_count(1), default=16)
    mtp.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=_count(2),
                     default=4, help="W, tokens per verify step of heads trained here (their k)")
    mtp.add_argument("--eval-sentences", type=_count(1), default=16,
                     help="newstest2013 sentences of the before/after evaluation")
    args = p.parse_args(argv)
    args.data_root = resolve_data_root(args.data_root)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 done, 1 MTP output differed from greedy, 2 an error (one line on stderr)."""
    args = parse_args(argv)
    try:
        model_dir = ensure_converted(args.model_dir)
        started = time.perf_counter()          # the one-time conversion above is set-up
        status = run(args, model_dir)
    except CLI_ERRORS as e:                # the project's errors in one line, the rest raised
        _fail(e)
    seconds = round(time.perf_counter() - started)
    print(f"\ndemo wall time: {seconds // 60} min {seconds % 60} s (model loading included, "
          f"conversion excluded)", flush=True)
    return status


def run(args: argparse.Namespace, model_dir: Path) -> int:
    """Greedy translations of the demo sentences, then (unless --no-mtp) the MTP part."""
    from gptk_jax.llama.checkpoint import load_converted
    from gptk_jax.data.prompts import PromptFormat, hypothesis_text, translation_stop_ids
    from gptk_jax.decoding.factory import GREEDY, make_decoder
    from gptk_jax.tokenizers import encode_prompt

    model = load_converted(model_dir)
    tok = model.tokenizer
    pairs, shots, source = load_pairs(args.data_root, args.num_sentences, args.shots)
    fmt = PromptFormat.for_languages("de", "en", shots=shots,
                                     space_with_target=not args.research_space)
    stop_ids = translation_stop_ids(tok)
    print(f"model {model_dir} ({model.config.n_layers} layers, dim {model.config.dim}, "
          f"vocab {model.config.vocab_size}); {len(pairs)} sentences from {source}, "
          f"{len(shots)}-shot prompts; greedy, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens\n")

    results, tokens, seconds, compile_seconds = [], 0, 0.0, 0.0
    prompt_batches, greedy_ids = [], []
    decoder = make_decoder(model, GREEDY, stop_ids=stop_ids)
    start = time.perf_counter()
    for b in range(0, len(pairs), args.batch_size):
        batch = pairs[b:b + args.batch_size]
        texts = [fmt.prompt_text(p.src) for p in batch]
        prompt_ids = [encode_prompt(tok, t) for t in texts]    # BOS iff the model's rule
        result = decoder.generate(prompt_ids, args.max_new_tokens, batch_size=args.batch_size)
        prompt_batches.append(prompt_ids)
        greedy_ids += result.tokens
        tokens += result.total_generated
        seconds += result.prefill_seconds + result.decode_seconds
        compile_seconds += result.compile_seconds
        for pair, ids in zip(batch, result.tokens):
            results.append((pair, hypothesis_text(tok, ids)))
    wall = time.perf_counter() - start

    for i, (pair, translation) in enumerate(results):
        print(f"[{i}] de:  {pair.src}\n    out: {translation}\n    ref: {pair.tgt}\n")
    rate = tokens / seconds if seconds > 0 else float("nan")
    print(f"{tokens} tokens generated in {seconds:.2f}s: {rate:.1f} tokens/s "
          f"(prefill + decode; compilation {compile_seconds:.1f}s apart, wall {wall:.1f}s)")
    print(DISCLAIMER)
    if args.no_mtp:
        return 0
    greedy = {"tokens": greedy_ids, "count": tokens, "seconds": seconds}
    return mtp_part(args, model, model_dir, decoder, prompt_batches, greedy, results)


# --------------------------------------------------------------------------------------------
# MTP: heads (reused or trained), then the same prompts decoded draft-and-verify
# --------------------------------------------------------------------------------------------

def train_pairs(steps: int, batch: int) -> int:
    """News Commentary pairs the heads trained here see (TRAIN_EPOCHS times each)."""
    return max(batch, steps * batch // TRAIN_EPOCHS)


def train_config(model_dir: Path, steps: int, batch: int, k: int, eval_sentences: int,
                 data_root: Path):
    """configs/linear_smollm2_wmt14.py for a short run: News Commentary references,
    TRAIN_EPOCHS passes over steps * batch / TRAIN_EPOCHS rows (the trunk-feature cache runs the
    trunk over each row once, so the passes after the first cost the heads only), loss against
    the trunk's own argmax (what verification accepts)."""
    linear_smollm2_wmt14 = configs_module("linear_smollm2_wmt14")

    config = linear_smollm2_wmt14.get_config()
    config.trunk_checkpoint = str(model_dir)
    config.head.k = k
    config.loss.targets = "trunk_argmax"
    config.data.train_prefixes = (str(news_commentary(data_root)),)
    config.data.train_target_files = ()
    config.data.train_line_ranges = ()            # (the SmolLM2 configs' distilled rows)
    config.data.bucket_lengths = ()
    config.data.max_len = 256
    config.data.eval_target_file = ""
    config.data.max_train_pairs = train_pairs(steps, batch)
    config.data.shots = 0
    config.data.space_with_target = True
    config.data.eval_max_sentences = eval_sentences
    config.features.cache = True
    config.optimizer.warmup_steps = min(30, steps // 10)
    config.training.global_batch_size = batch
    config.training.num_train_steps = steps
    config.training.log_every_steps = max(1, min(10, steps // 5))
    config.training.eval_every_steps = 0          # at the start and at the end only
    config.training.eval_at_start = True
    config.training.checkpoint_every_steps = 0    # at the end (and on SIGTERM) only
    return config


def find_or_train_heads(args, model_dir: Path) -> Path:
    """The heads folder: --heads, else `make results`' linear heads, else trained here."""
    if args.heads is not None:
        print(f"heads: {args.heads} (--heads)")
        return args.heads
    if args.train_steps is None and (RESULTS_HEADS / "heads.json").is_file():
        print(f"heads: {RESULTS_HEADS.relative_to(ROOT)} (made by `make results`; "
              f"--train-steps N trains new ones here instead)")
        return RESULTS_HEADS
    steps = args.train_steps or DEFAULT_TRAIN_STEPS
    workdir = DEMO_RUNS / f"linear-k{args.tokens_per_step}-{steps}steps-x{TRAIN_EPOCHS}"
    if (workdir / "heads" / "heads.json").is_file():
        print(f"heads: {workdir.relative_to(ROOT)}/heads (trained by an earlier demo run)")
        return workdir / "heads"
    from gptk_jax.training import TrainingError, train_and_evaluate
    print(f"training linear heads (W={args.tokens_per_step}) for {steps} steps of "
          f"{args.train_batch_size} rows ({TRAIN_EPOCHS} passes over News Commentary's first "
          f"{train_pairs(steps, args.train_batch_size)} pairs) "
          f"into {workdir.relative_to(ROOT)} ...", flush=True)
    start = time.perf_counter()
    try:
        result = train_and_evaluate(train_config(model_dir, steps, args.train_batch_size,
                                                 args.tokens_per_step, args.eval_sentences,
                                                 args.data_root), workdir)
    except TrainingError as e:
        raise DemoError(f"head training failed: {e}") from None
    if result["status"] != "completed" or result["heads"] is None:
        raise DemoError(f"head training ended with status {result['status']}; rerun to "
                        f"continue it")
    print(f"trained in {time.perf_counter() - start:.0f}s")
    return Path(result["heads"])


def print_offset_table(metrics_path: Path) -> None:
    """Per-offset top-1 against the trunk's argmax, first vs last evaluation of the run."""
    from gptk_jax.training import read_metrics

    if not metrics_path.is_file():
        print(f"(no {metrics_path}: no before/after evaluation to show)")
        return
    evals = read_metrics(metrics_path, "eval")
    if not evals:
        print(f"(no evaluation records in {metrics_path})")
        return
    first, last = evals[0], evals[-1]
    offsets = sorted(int(k[len("top1_trunk_o"):]) for k in last if k.startswith("top1_trunk_o"))
    before = "untrained" if first["step"] == 0 else f"step {first['step']}"
    print(f"\nnewstest2013, teacher-forced: top-1 agreement with the trunk's own next tokens "
          f"({last.get('positions', 0):.0f} positions)")
    print(f"  {'offset':>8}  {before:>10}  {'step ' + str(last['step']):>10}")
    for o in offsets:
        print(f"  {o:>8}  {100 * first[f'top1_trunk_o{o}']:>9.1f}%  "
              f"{100 * last[f'top1_trunk_o{o}']:>9.1f}%")
    print(f"  {'accept.':>8}  {first['acceptance_trunk']:>10.3f}  {last['acceptance_trunk']:>10.3f}"
          f"   (estimated tokens per verify step, 1 + sum of products of the accuracies)")


def mtp_part(args, model, model_dir: Path, decoder, prompt_batches, greedy: dict,
             results) -> int:
    """Heads found or trained, then the demo's prompts decoded with them, and with prompt lookup
    in front of them, made by decoding.factory.make_decoder from `decoder` (the greedy one):
    one trunk upload."""
    from gptk_jax.decoding.factory import DecoderSpec, make_decoder
    from gptk_jax.heads.io import load_heads

    print("\n" + "=" * 78 + "\nSelf-speculative (MTP) decoding: heads draft W-1 tokens, one "
          "trunk call verifies them\n" + "=" * 78)
    heads_dir = find_or_train_heads(args, model_dir)
    print_offset_table(heads_dir.parent / "metrics.jsonl")
    heads = load_heads(heads_dir, model.config, model_dir.name)   # HeadsError: main says it
    w = heads.head_config.k
    heads_decoder = make_decoder(model, DecoderSpec("mtp", tokens_per_step=w, heads=heads_dir),
                                 base=decoder, heads=heads)
    ok = draft_and_verify(f"{heads.head_config.kind} heads", heads_decoder, args, model,
                          prompt_batches, greedy, results, show_rows=True)
    print("On CPU a verify step over W tokens costs more than a one-token step, so the speedup "
          "stays below τ; heads trained longer (make results) accept more drafts.")

    print("\n" + "=" * 78 + "\nPrompt lookup in front of the heads: drafts are the tokens that "
          "followed the last\n1-3 tokens' latest earlier occurrence (prompt included); the heads "
          "draft where\nthere is none\n" + "=" * 78)
    lookup_decoder = make_decoder(model, DecoderSpec("mtp+lookup", tokens_per_step=w,
                                                     heads=heads_dir), base=decoder, heads=heads)
    ok &= draft_and_verify("prompt lookup + heads", lookup_decoder, args, model, prompt_batches,
                           greedy, results, show_rows=False)
    print("This weak translator copies much of the German source, which the lookup drafts "
          "exactly (docs/results.md).")
    return 0 if ok else 1


def draft_and_verify(label: str, decoder, args, model, prompt_batches, greedy: dict, results,
                     show_rows: bool) -> bool:
    """Decodes the demo's prompts draft-and-verify with `decoder` (a drafter, W tokens per
    step); prints
    identity with greedy, τ, speed."""
    from gptk_jax.decoding.acceptance import acceptance_stats
    from gptk_jax.data.prompts import hypothesis_text

    tok, k = model.tokenizer, decoder.tokens_per_step
    mtp_ids, count, seconds, compile_seconds, accepted, emitted = [], 0, 0.0, 0.0, [], []
    for prompt_ids in prompt_batches:
        r = decoder.generate(prompt_ids, args.max_new_tokens, batch_size=args.batch_size)
        mtp_ids += r.tokens
        count += r.total_generated
        seconds += r.prefill_seconds + r.decode_seconds
        compile_seconds += r.compile_seconds
        accepted += [a for row in r.stats["accepted_per_row"] for a in row]
        emitted += [e for row in r.stats["emitted_per_row"] for e in row]
    print(f"\n{label}, W={k} ({k - 1} drafts per step), batch {args.batch_size}, the prompts "
          f"above:\n")
    identical = 0
    for i, ((pair, greedy_text), g_ids, m_ids) in enumerate(zip(results, greedy["tokens"],
                                                                  mtp_ids)):
        same = g_ids == m_ids
        identical += same
        if show_rows or not same:
            print(f"[{i}] greedy: {greedy_text}\n    mtp:    "
                  f"{hypothesis_text(tok, m_ids)}\n    "
                  f"{'identical tokens' if same else 'DIFFERENT TOKENS'}\n")
    stats = acceptance_stats(accepted, emitted, num_drafts=k - 1)
    greedy_rate = greedy["count"] / greedy["seconds"] if greedy["seconds"] > 0 else float("nan")
    rate = count / seconds if seconds > 0 else float("nan")
    tau = stats["tau"]
    print(f"{label} == greedy: {identical}/{len(mtp_ids)} sentences token-identical")
    print(f"τ = {tau:.2f} tokens per verify step (at most {k}); accepted drafts per step "
          f"histogram {stats['accepted_histogram']}" if tau is not None else "τ: no verify steps")
    print(f"{label}: {count} tokens in {seconds:.2f}s: {rate:.1f} tokens/s vs greedy "
          f"{greedy_rate:.1f} tokens/s: speedup {rate / greedy_rate:.2f}x (compilation "
          f"{compile_seconds:.1f}s apart)")
    return identical == len(mtp_ids)


if __name__ == "__main__":
    sys.exit(main())
