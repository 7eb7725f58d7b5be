"""Epoch time of head training with the trunk-feature cache vs re-running the frozen trunk.

    python bench/bench_train.py [--config configs/linear_smollm2_wmt14.py] [--pairs 128]
        [--batch-size 8] [--epochs 3] [--output-json bench/results/train_feature_cache.json]

Runs `train_and_evaluate` twice on the same config and data (evaluation and intermediate
checkpoints off): once with `features.cache=False` (every step runs the trunk), once with
`features.cache=True` (the trunk runs once over the training rows, then every epoch reads its
memory-mapped outputs). Reports each epoch's wall time from WORKDIR/metrics.jsonl ("epoch"
records; epoch 1 includes compiling the step), the cache build time, and the speedup of the
cached epochs from the 2nd on. The goal is >= 5x. On a shared machine the load average is
recorded in the JSON; pin cores (`taskset -c 0,1`) for comparable numbers.

    python bench/bench_train.py --compare-build [order|argmax] [--pairs 800] [--batch-size 16]
        [--train-prefix P] [--output-json bench/results/feature_cache_build.json]

builds the feature cache of the config's first --pairs training rows twice in one process:
`order` (the default) in input order (each trunk call padded to its longest row, rounded up to
32: the build before length buckets) and length-bucketed (rows sorted by length); `argmax` with
the trunk's argmax taken in each call at every position (the build before `_SpanArgmax`) and
apart at the cached positions only; and reports both build times
(compilation included: each compiles once per row length), the tokens the trunk ran on, the
ratio, how far apart the two caches are (max |diff| of the hidden states, share of equal
argmax tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptk_jax.training import read_metrics, train_and_evaluate  # noqa: E402


def load_config(path: Path):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "linear_smollm2_wmt14.py")
    p.add_argument("--pairs", type=int, default=128, help="training pairs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trunk", default=None, help="override config.trunk_checkpoint")
    p.add_argument("--output-json", type=Path, default=None)
    p.add_argument("--train-prefix", default=None,
                   help="--compare-build: train on this PREFIX.{de,en} instead of the config's")
    p.add_argument("--compare-build", nargs="?", const="order", choices=("order", "argmax"),
                   default=None, help="only the feature-cache build: input order vs "
                   "length-bucketed (order), or the argmax in the trunk call at every position "
                   "vs at the cached positions only, apart (argmax)")
    return p.parse_args(argv)


def run(args, cache: bool, workdir: Path) -> dict:
    config = load_config(args.config)
    if args.trunk:
        config.trunk_checkpoint = args.trunk
    config.data.max_train_pairs = args.pairs
    config.data.eval_prefix = ""
    config.training.global_batch_size = args.batch_size
    config.training.num_epochs = float(args.epochs)
    config.training.num_train_steps = None
    config.training.eval_at_start = False
    config.training.checkpoint_every_steps = 0
    config.training.log_every_steps = 1000
    config.features.cache = cache
    config.features.build_batch_size = args.batch_size
    start = time.perf_counter()
    train_and_evaluate(config, workdir, progress=False)
    wall = time.perf_counter() - start
    metrics = workdir / "metrics.jsonl"
    setup = read_metrics(metrics, "setup")[0]
    epochs = [r["seconds"] for r in read_metrics(metrics, "epoch")]
    return {"feature_cache": cache, "wall_seconds": wall, "epoch_seconds": epochs,
            "feature_cache_build_seconds": setup["feature_cache_seconds"],
            "steps": setup["num_steps"], "train_rows": setup["train_rows"]}


def compare_build(args, tmp: Path) -> dict:
    """Input-order vs length-bucketed builds of one cache (see the module docstring)."""
    import numpy as np

    from gptk_jax.training import inputs
    from gptk_jax.features.cache import FeatureCache
    from gptk_jax.training.settings import RunSettings

    config = load_config(args.config)
    if args.trunk:
        config.trunk_checkpoint = args.trunk
    config.data.max_train_pairs = args.pairs
    if args.train_prefix:
        config.data.train_prefixes = (args.train_prefix,)
    config.training.global_batch_size = args.batch_size
    settings = RunSettings.from_config(config)
    trunk = inputs.load_trunk(settings, tmp)
    pipe, _ = inputs.build_pipelines(settings, trunk.tokenizer, inputs.prompt_format(
        settings.data), with_eval=False)
    runs, caches = {}, {}
    builds = ((("input_order", False, True), ("bucketed", True, True)) if args.compare_build ==
              "order" else (("argmax_in_call", True, False), ("argmax_apart", True, True)))
    for name, bucketed, apart in builds:
        start = time.perf_counter()
        caches[name] = FeatureCache.open_or_build(
            tmp / name, trunk, pipe.rows, settings.head, settings.features.dtype,
            args.batch_size, settings.loss.argmax_chunk, log=print, progress=False,
            bucketed=bucketed, argmax_apart=apart)
        runs[name] = {"build_seconds": time.perf_counter() - start, **caches[name].meta["build"]}
    (before, _, _), (after, _, _) = builds
    # other trunk-call shapes round differently (XLA's CPU kernels block by shape): the
    # difference is float rounding, and the argmax (the self-distillation target) agrees
    same = {}
    for field, a in caches[before].arrays.items():
        a, b = np.asarray(a), np.asarray(caches[after].arrays[field])
        same[field] = (float(np.mean(a == b)) if field == "trunk_argmax" else
                       float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))))
    ratio = runs[before]["build_seconds"] / runs[after]["build_seconds"]
    print(f"feature-cache build, {len(pipe.rows)} rows: {before} "
          f"{runs[before]['build_seconds']:.1f}s ({runs[before]['trunk_tokens']} "
          f"tokens), {after} {runs[after]['build_seconds']:.1f}s "
          f"({runs[after]['trunk_tokens']} tokens; rows hold {runs[after]['row_tokens']}"
          f"): {ratio:.2f}x faster; " + ", ".join(
              f"{f} {'agreement' if f == 'trunk_argmax' else 'max |diff|'} {v:.3g}"
              for f, v in same.items()))
    return {"comparison": args.compare_build, "rows": len(pipe.rows), "speedup": ratio,
            "agreement": same, "runs": runs}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare_build:
        with tempfile.TemporaryDirectory() as tmp:
            report = compare_build(args, Path(tmp))
        report.update(config=str(args.config), pairs=args.pairs, batch_size=args.batch_size,
                      machine={"platform": platform.platform(), "cpus": os.cpu_count(),
                               "load_average": os.getloadavg()})
        if args.output_json:
            args.output_json.parent.mkdir(parents=True, exist_ok=True)
            args.output_json.write_text(json.dumps(report, indent=2))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cache in (False, True):
            results["cached" if cache else "trunk"] = run(args, cache, Path(tmp) / str(cache))
    trunk, cached = results["trunk"]["epoch_seconds"], results["cached"]["epoch_seconds"]
    later = min(len(trunk), len(cached))
    speedup = (sum(trunk[1:later]) / sum(cached[1:later])) if later > 1 else float("nan")
    report = {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT)
                            else args.config),
              "pairs": args.pairs, "batch_size": args.batch_size, "epochs": args.epochs,
              "speedup_from_epoch_2": speedup, "runs": results,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average": os.getloadavg()}}
    for name, r in results.items():
        print(f"{name:7s}: build {r['feature_cache_build_seconds']:.1f}s, epochs "
              + ", ".join(f"{s:.1f}s" for s in r["epoch_seconds"]))
    print(f"speedup of epochs 2..: {speedup:.1f}x (goal >= 5x)")
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
