"""Benchmark scripts still run (they are not imported by anything else, so nothing else would
notice a broken one): bench/bench_mtp.py end to end on a tiny random trunk."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow   # the bench script in a subprocess
def test_bench_mtp_runs_on_a_random_trunk(tmp_path):
    out = tmp_path / "bench_mtp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_mtp.py"), "--random-trunk",
                           "--reps", "1", "--repeats", "1", "--lookup", "--batch-sizes", "2",
                           "--num-prompts", "2", "--max-new-tokens", "16", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    oracle = [r for r in report["end_to_end"] if r["method"].startswith("mtp-oracle")]
    assert oracle and all(r["identical_to_greedy"] for r in oracle)
    lookup = [r for r in report["end_to_end"] if r["method"].startswith("mtp-lookup")]
    assert len(lookup) == 1 and all(r["identical_to_greedy"] for r in lookup)   # one batch size
    assert {s["drafter"] for s in report["step_breakdown"]} >= {"oracle", "lookup"}
