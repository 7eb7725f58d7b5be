"""`make demo`: the real SmolLM2-135M-Instruct (GGUF) translating newstest2014 German with our
jitted greedy decoder, then with self-speculative (MTP) decoding through linear heads, on CPU.

    python -m gptk_jax.demo [--num-sentences 8] [--shots 2] [--max-new-tokens 64] [--batch-size 8]
        [--train-steps 400] [--heads DIR] [--tokens-per-step 4] [--no-mtp]
        [--model-dir .cache/models/smollm2-135m] [--runs-dir runs/demo] [--data-root DIR]

Folders are taken from the working directory (`make demo` runs in the checkout's root); the
flags above name others. Steps: fetch the GGUF (`gptk_jax.artifacts`), convert it once into
--model-dir (`python -m convert --format gguf`), build few-shot prompts (instruction, the
first News Commentary pairs as shots, then the query; gptk_jax.data.prompts: the format of the
shared distilled rows), decode greedily until the translation's line ends (the one stop rule,
gptk_jax.data.prompts.translation_stop_ids), and print source, translation, reference and
tokens/s. Data come from DATA_ROOT/wmt14-de-en, else from sacreBLEU;
DATA_ROOT is --data-root, else $GPTK_DATA, else ../shared/data from the working directory.

Then MTP: linear heads (W = 4 tokens per verify step at most) from --heads DIR, else from
runs/results/linear/heads when `make results` made them (and --train-steps is not given), else
trained here with configs/demo_smollm2.py (the results protocol cut to a demo: the trunk's own
2-shot translations of newstest2013 lines 1-800 from ../shared/data/distilled, a softmax over
a 2,048-id draft vocabulary of those rows, loss against the trunk's own argmax; into
RUNS_DIR/linear-k<W>-distilled-<steps>steps, reused by a rerun). Printed: the held-out validation
(newstest2013 lines 2701-2764, the trunk's own translations): per-offset acceptance and the
τ estimate. Then `gptk_jax.evaluate` on the demo sentences (RUNS_DIR/eval): greedy, the heads,
lookup + heads (prompt lookup alone too with --lookup-alone) and the oracle (every draft right:
the bound), at batch 1 and
--batch-size, W chosen per step by measured cost and the drafts' scores (--choose-width): τ,
speedup over greedy in the same process, the share of the oracle's speedup, and whether every
output is token-identical to greedy's.
The whole run, set-up excluded, takes about 8 minutes on 2 CPU cores; its wall time is
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

from gptk_jax.cli import configs_module, use_compilation_cache
from gptk_jax.data.root import add_data_root_argument, resolve_data_root
from gptk_jax.data.testsets import news_commentary
from gptk_jax.errors import CLI_ERRORS, GptkError

# Folders, relative to the working directory (`make demo` runs from the checkout's root); the
# flags --model-dir, --runs-dir and --heads name others.
DEFAULT_MODEL_DIR = Path(".cache/models/smollm2-135m")
RESULTS_HEADS = Path("runs/results/linear/heads")     # where `make results` leaves linear heads
DEFAULT_RUNS_DIR = Path("runs/demo")                  # heads trained here, the evaluation report
DEMO_CONFIG = "demo_smollm2"   # configs/demo_smollm2.py: what the heads trained here learn
# prompts padded to multiples of this: the demo's few sentences then share one prompt width at
# batch 1, and each method compiles its executables once instead of once per width
DEMO_BUCKET = 128
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
    proc = subprocess.run(cmd)               # in this working directory, as --model-dir is
    if proc.returncode != 0:
        raise DemoError(f"conversion failed (exit code {proc.returncode}): {' '.join(cmd)} "
                        f"(run from the repository's root, where the `convert` package is)")
    return model_dir


def load_pairs(data_root: Path, num_sentences: int):
    """(test pairs from newstest2014, the test set's name)."""
    from gptk_jax.data.root import sacrebleu_cache
    from gptk_jax.data.testsets import WMT14_DIR, load_test_set

    # without the files: sacreBLEU's cache, downloading where a network exists
    test_name = "newstest2014" if (data_root / WMT14_DIR).is_dir() else "wmt14/full"
    test = load_test_set(test_name, data_root, max_sentences=num_sentences,
                         sacrebleu_cache=sacrebleu_cache(data_root))
    return list(test.pairs), test.name


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="python -m gptk_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                   help=f"converted model folder (converted here when it does not exist yet; "
                        f"default: {DEFAULT_MODEL_DIR} in the working directory)")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR,
                   help=f"where heads trained here and the evaluation report go (default: "
                        f"{DEFAULT_RUNS_DIR} in the working directory)")
    add_data_root_argument(p)
    p.add_argument("--num-sentences", type=_count(1), default=8)
    p.add_argument("--shots", type=_count(0), default=2,
                   help="News Commentary pairs in the prompt (2: the format the shared distilled "
                        "rows, and so the heads trained here, use)")
    p.add_argument("--max-new-tokens", type=_count(1), default=64)
    p.add_argument("--batch-size", type=_count(1), default=8)
    p.add_argument("--research-space", action="store_true",
                   help="end the prompt at 'en: ' as the research code did, instead of 'en:' "
                        "(SmolLM2's byte-level BPE attaches a space to the next word, so after a "
                        "bare trailing space it mostly emits a newline: empty translations)")
    mtp = p.add_argument_group("MTP (after the greedy translations)")
    mtp.add_argument("--no-mtp", action="store_true", help="greedy only")
    mtp.add_argument("--heads", type=Path, default=None,
                     help=f"trained heads folder (gptk_jax.heads.io) to use instead of "
                          f"{RESULTS_HEADS} or training")
    mtp.add_argument("--train-steps", type=_count(1), default=None,
                     help=f"train linear heads for this many steps (default: reuse "
                          f"{RESULTS_HEADS} if present, else the steps of "
                          f"configs/{DEMO_CONFIG}.py)")
    mtp.add_argument("--tokens-per-step", "--k", dest="tokens_per_step", type=_count(2),
                     default=None, help="W of heads trained here (their k; default the "
                                        "config's, 4); decoding chooses 1..W per step")
    mtp.add_argument("--lookup-alone", action="store_true",
                     help="also decode with prompt lookup alone, its own row (two more step "
                          "calibrations and runs: about 1.5 minutes on 2 CPU cores)")
    args = p.parse_args(argv)
    args.data_root = resolve_data_root(args.data_root)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 done, 1 MTP output differed from greedy, 2 an error (one line on stderr)."""
    args = parse_args(argv)
    use_compilation_cache()
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
    from gptk_jax.data.prompts import hypothesis_text, prompt_format, translation_stop_ids
    from gptk_jax.decoding.factory import GREEDY, make_decoder
    from gptk_jax.tokenizers import encode_prompt

    model = load_converted(model_dir)
    tok = model.tokenizer
    pairs, source = load_pairs(args.data_root, args.num_sentences)
    fmt = prompt_format("de", "en", args.shots, space_with_target=not args.research_space,
                        shots_from=news_commentary(args.data_root))
    stop_ids = translation_stop_ids(tok)
    print(f"model {model_dir} ({model.config.n_layers} layers, dim {model.config.dim}, "
          f"vocab {model.config.vocab_size}); {len(pairs)} sentences from {source}, "
          f"{args.shots}-shot prompts (News Commentary shots); greedy, batch {args.batch_size}, "
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
    return mtp_part(args, model, model_dir)


# --------------------------------------------------------------------------------------------
# MTP: heads (reused or trained by configs/demo_smollm2.py), then gptk_jax.evaluate
# --------------------------------------------------------------------------------------------

def train_config(model_dir: Path, steps: Optional[int] = None, k: Optional[int] = None):
    """configs/demo_smollm2.py with this trunk folder (and --train-steps / --tokens-per-step
    when given)."""
    config = configs_module(DEMO_CONFIG).get_config()
    config.trunk_checkpoint = str(model_dir)
    if steps is not None:
        config.training.num_train_steps = steps
    if k is not None:
        config.head.k = k
        config.head.offsets = tuple(range(2, k + 1))
    return config


def find_or_train_heads(args, model_dir: Path) -> Path:
    """The heads folder: --heads, else `make results`' linear heads, else trained here."""
    if args.heads is not None:
        print(f"heads: {args.heads} (--heads)")
        return args.heads
    if args.train_steps is None and (RESULTS_HEADS / "heads.json").is_file():
        print(f"heads: {RESULTS_HEADS} (made by `make results`; "
              f"--train-steps N trains new ones here instead)")
        return RESULTS_HEADS
    config = train_config(model_dir, args.train_steps, args.tokens_per_step)
    steps = config.training.num_train_steps
    workdir = args.runs_dir / f"linear-k{config.head.k}-distilled-{steps}steps"
    if (workdir / "heads" / "heads.json").is_file():
        print(f"heads: {workdir / 'heads'} (trained by an earlier demo run)")
        return workdir / "heads"
    from gptk_jax.training import TrainingError, train_and_evaluate
    lines = config.data.train_line_ranges[0]
    print(f"training linear heads (W={config.head.k}) for {steps} steps of "
          f"{config.training.global_batch_size} rows on the trunk's own translations of "
          f"newstest2013 lines {lines[0]}-{lines[1]} (configs/{DEMO_CONFIG}.py) into "
          f"{workdir} ...", flush=True)
    start = time.perf_counter()
    try:
        result = train_and_evaluate(config, workdir)
    except TrainingError as e:
        raise DemoError(f"head training failed: {e}") from None
    if result["status"] != "completed" or result["heads"] is None:
        raise DemoError(f"head training ended with status {result['status']}; rerun to "
                        f"continue it")
    print(f"trained in {time.perf_counter() - start:.0f}s (trunk-feature cache included)")
    return Path(result["heads"])


def print_validation(metrics_path: Path) -> None:
    """The last validation on held-out rows: against the trunk's own translations
    (eval_distilled) when the run had them, else against the reference text."""
    from gptk_jax.training import read_metrics

    if not metrics_path.is_file():
        print(f"(no {metrics_path}: no validation to show)")
        return
    for split, what in (("eval_distilled", "the trunk's own translations"),
                        ("eval", "the reference translations")):
        evals = read_metrics(metrics_path, split)
        if evals:
            break
    if not evals:
        print(f"(no validation records in {metrics_path})")
        return
    last = evals[-1]
    offsets = sorted(int(k[len("top1_trunk_o"):]) for k in last if k.startswith("top1_trunk_o"))
    print(f"\nvalidation at step {last['step']}, held-out newstest2013 rows, teacher-forced "
          f"against {what} ({last.get('positions', 0):.0f} positions):")
    for o in offsets:
        chain = last.get(f"chain_o{o}")
        print(f"  offset {o}: top-1 {100 * last[f'top1_trunk_o{o}']:5.1f}%"
              + (f", all drafts up to it right {100 * chain:5.1f}%" if chain is not None
                 else ""))
    if "tau_est" in last:
        print(f"  estimated tokens per verify step at W = {max(offsets)}: {last['tau_est']:.3f} "
              f"over every position"
              + (f", {last['tau_walked']:.3f} where decoding verifies (each step's span "
                 f"skipped)" if "tau_walked" in last else ""))


def mtp_part(args, model, model_dir: Path) -> int:
    """Heads found or trained, then `gptk_jax.evaluate` on the demo sentences: greedy, heads,
    lookup + heads (lookup alone with --lookup-alone), oracle at batch 1 and --batch-size, W
    chosen by cost."""
    import shutil

    from gptk_jax.evaluation import EvalConfig, run_evaluation, write_reports

    print("\n" + "=" * 78 + "\nSelf-speculative (MTP) decoding: heads draft up to 3 tokens, "
          "one trunk call verifies them\n" + "=" * 78)
    heads_dir = find_or_train_heads(args, model_dir)
    print_validation(heads_dir.parent / "metrics.jsonl")
    output = args.runs_dir / "eval"
    if output.exists():            # the demo's own scratch report: timed afresh every run
        shutil.rmtree(output)
    batches = tuple(sorted({1, args.batch_size}))
    only = None if args.lookup_alone else ("mtp", "heads+lookup")
    cfg = EvalConfig(checkpoint=str(model_dir), heads=str(heads_dir), output=str(output),
                     data_root=str(args.data_root), split="newstest2014",
                     max_sentences=args.num_sentences, batch_sizes=batches,
                     max_new_tokens=args.max_new_tokens, shots=args.shots,
                     space_with_target=not args.research_space, oracle=True, lookup=True,
                     choose_width=True, progress=False, bucket=DEMO_BUCKET,
                     only=only)
    print(f"\ndecoding the {args.num_sentences} sentences again, draft and verify, batch "
          f"{' and '.join(map(str, batches))} (python -m gptk_jax.evaluate ... --lookup "
          f"--oracle --choose-width --bucket {DEMO_BUCKET}"
          f"{' --only ' + ','.join(only) if only else ''}; report in {output}) ...",
          flush=True)
    report = run_evaluation(cfg)
    write_reports(report, output)
    return print_speedups(report, batches)


LABELS = {"mtp": "linear heads", "lookup": "prompt lookup", "heads+lookup": "lookup + heads",
          "oracle": "oracle (bound)"}


def print_speedups(report: dict, batches) -> int:
    """The table: τ, speedup over greedy and the share of the oracle's, identical or not."""
    runs = report["runs"]
    print(f"\n{'drafter':<16}" + "".join(f"{'b' + str(b) + ' tau':>9}{'speedup':>9}"
                                         f"{'of oracle':>10}" for b in batches)
          + "  identical to greedy")
    ok = True
    for name, label in LABELS.items():
        if not any(f"{name}/b{b}" in runs for b in batches):
            continue                   # not run (prompt lookup alone: --lookup-alone)
        cells, same = "", True
        for b in batches:
            run = runs.get(f"{name}/b{b}")
            if run is None:
                cells += f"{'-':>9}{'-':>9}{'-':>10}"
                continue
            oracle = runs.get(f"oracle/b{b}", {}).get("speedup")
            share = f"{100 * run['speedup'] / oracle:.0f}%" if oracle else "-"
            cells += f"{run['tau']:>9.2f}{run['speedup']:>8.2f}x{share:>10}"
            same &= bool(run.get("identical_to_greedy", True))
        ok &= same
        print(f"{label:<16}{cells}  {'yes' if same else 'NO'}")
    print("speedup: tokens/s over greedy decoding of the same prompts in this process "
          "(compilation apart); W per step is chosen from measured step costs and the drafts' "
          "scores, so a drafter that does not pay runs at W = 1. This CPU's verify step over W "
          "tokens costs 1.3-2x a one-token step (docs/benchmarks.md).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
