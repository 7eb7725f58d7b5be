"""Benchmark: the cost of verifying tensor digests when a converted model is loaded.

    python bench/bench_load_digests.py --model /tmp/smollm2 [--reps 7] [--output-json F]

`--model`: a folder converted by this version (`python -m convert`); its conversion.json records
"xxh3_128" digests. The script makes a sibling folder (MODEL-BEFORE: symlinks to the same config,
params and tokenizer, and a conversion.json recording `--before` digests of the same tensors, as
a folder converted by an earlier version does; default "sums64", the previous digest), warms the
page cache, then times `load_converted` `--reps` times each way, the three ways in rotating
order within every rep:

    off       load_converted(verify_digests=False)
    BEFORE    the sibling folder, verified (the earlier digest: "before")
    xxh3_128  the folder itself, verified ("after")

and prints the median wall time of each, each verified load's cost relative to `off` (median over
reps of (verified - off) / off, pairs taken from the same rep), the same for the process's CPU
time (all threads: less disturbed by other jobs than wall time on a shared machine), and each
digest alone over the loaded tensors (best of 3, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptk_jax.llama.checkpoint import (DIGESTS_KEY, PROVENANCE_FILE,  # noqa: E402
                                       load_converted, tensor_digest, tensor_digests)
from gptk_jax.llama.weight_checks import DIGEST_ALGORITHM  # noqa: E402
from gptk_jax.llama.model import abstract_params  # noqa: E402,F401  (import cost out of runs)


def older_sibling(model: Path, algorithm: str) -> Path:
    """MODEL-ALGORITHM: the same files, conversion.json recording that algorithm's digests."""
    sibling = model.with_name(f"{model.name}-{algorithm}")
    sibling.mkdir(exist_ok=True)
    for name in ("config.json", "params", "tokenizer"):
        link = sibling / name
        if not link.exists():
            os.symlink(model / name, link)
    provenance = json.loads((model / PROVENANCE_FILE).read_text())
    params = load_converted(model, verify_digests=False, load_tokenizer=False,
                            scan_layers=True).params
    provenance[DIGESTS_KEY] = tensor_digests(params, algorithm)
    (sibling / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))
    return sibling


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--before", default="sums64", choices=("sums64", "crc32", "sha256"))
    p.add_argument("--output-json", type=Path)
    args = p.parse_args(argv)
    model = args.model.absolute()
    recorded = json.loads((model / PROVENANCE_FILE).read_text()).get(DIGESTS_KEY, {})
    if recorded.get("algorithm") != DIGEST_ALGORITHM:
        p.error(f"{model}: conversion.json records {recorded.get('algorithm')!r} digests; "
                f"convert the model again with this version ({DIGEST_ALGORITHM})")
    ways = {"off": (model, False), args.before: (older_sibling(model, args.before), True),
            DIGEST_ALGORITHM: (model, True)}
    for folder, verify in ways.values():         # warm: page cache, imports, the checks pass
        load_converted(folder, verify_digests=verify)
    seconds = {name: [] for name in ways}
    cpu = {name: [] for name in ways}
    names = list(ways)
    for rep in range(args.reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            folder, verify = ways[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            load_converted(folder, verify_digests=verify)
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    leaves = [np.asarray(x) for x in jax.tree.leaves(
        load_converted(model, verify_digests=False, load_tokenizer=False,
                       scan_layers=True).params)]
    alone = {}
    for algorithm in ("crc32", "sums64", "xxh3_128", "sha256"):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for leaf in leaves:
                tensor_digest(leaf, algorithm)
            best = min(best, time.perf_counter() - start)
        alone[algorithm] = best
    off = seconds["off"]
    result = {"model": str(model), "reps": args.reps,
              "megabytes": sum(x.nbytes for x in leaves) / 1e6,
              "load_seconds": seconds,
              "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
              "median_cost": {k: statistics.median((a - b) / b for a, b in zip(seconds[k], off))
                              for k in names[1:]},
              "cpu_seconds": cpu,
              "median_cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
              "median_cpu_cost": {k: statistics.median((a - b) / b for a, b in
                                                       zip(cpu[k], cpu["off"]))
                                  for k in names[1:]},
              "digest_alone_seconds": alone,
              "loadavg": os.getloadavg()}
    med = result["median_seconds"]
    print(f"{model}: {result['megabytes']:.0f} MB of params, {args.reps} reps, load average "
          f"{', '.join(f'{x:.2f}' for x in result['loadavg'])}")
    for name in ways:
        cost, cpu_cost = (result[k].get(name) for k in ("median_cost", "median_cpu_cost"))
        extra = "" if cost is None else (f"  cost {100 * cost:+.1f} % wall, "
                                         f"{100 * cpu_cost:+.1f} % CPU")
        print(f"  {name:7s} median load {med[name]:.3f} s "
              f"[{' '.join(f'{x:.2f}' for x in seconds[name])}], CPU "
              f"{result['median_cpu_seconds'][name]:.3f} s{extra}")
    print("  digest alone: " + ", ".join(f"{k} {v:.3f} s" for k, v in alone.items()))
    if args.output_json:
        args.output_json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
