"""Benchmark: `python -m convert --format meta` on a synthetic Llama 3.2 1B-sized checkpoint.

    python bench/bench_convert.py --output-json bench/results/convert_meta_1b.json \\
        [--dtype float32|bfloat16] [--n-layers 16] [--workdir /tmp/...] [--keep] \\
        [--no-finite-check | --compare-finite-check [--repeats N]]

1. Writes a Meta checkpoint folder under a temp dir in /tmp: Llama 3.2 1B's params.json, the real
   Llama 3 tokenizer.model, and consolidated.00.pth with random bfloat16 weights (tied: no
   output.weight, ~2.5 GB). The .pth is written by torch.save under `skip_data` (layout only, from
   untouched `torch.empty` storages), then filled tensor by tensor through a shared memory map,
   so the writer never holds the weights in memory. Values are N(0, 0.02) drawn once into a
   16M-entry pool and copied out at random offsets (conversion cost does not depend on them).
2. Runs the conversion as a child process and samples its /proc status every 50 ms: peak VmRSS,
   RssAnon (private memory: the converted arrays) and RssFile (pages of the memory-mapped .pth,
   reclaimable), plus getrusage(RUSAGE_CHILDREN).ru_maxrss.
3. Prints a table, writes JSON, removes the temp dir (unless --keep).

`--no-finite-check` converts with `save_converted`'s non-finite-weights check patched out (the
child is `python -c` importing the CLI, since the CLI itself has no such flag);
`--compare-finite-check` converts the same input with and without it, alternating, `--repeats`
times each, and reports both wall times and the check's share. The converter also prints the
check's own time ("checked ... finite in S s"), which is parsed as `finite_check_s`.

Heavy (several GB of disk and RAM, a minute or more): run it once, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptk_jax import artifacts  # noqa: E402
from gptk_jax.llama.config import LLAMA3_2_1B_PARAMS, from_meta_params  # noqa: E402

POOL_SIZE = 1 << 24
FILL_CHUNK = 1 << 22


def meta_state_shapes(params: dict) -> dict[str, tuple]:
    """Tensor name -> torch shape of a tied Meta checkpoint with these params.json values."""
    cfg = from_meta_params(params, tie_embeddings=True)
    d, h, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (cfg.n_heads * h, d),
            p + "attention.wk.weight": (cfg.n_kv_heads * h, d),
            p + "attention.wv.weight": (cfg.n_kv_heads * h, d),
            p + "attention.wo.weight": (d, cfg.n_heads * h),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    shapes["norm.weight"] = (d,)
    return shapes


def write_synthetic_checkpoint(folder: Path, params: dict, seed: int = 0) -> dict:
    """Meta layout with random bfloat16 weights, written tensor by tensor. Returns stats."""
    import torch

    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copyfile(artifacts.fetch("llama3_tokenizer_model"), folder / "tokenizer.model")
    pth = folder / "consolidated.00.pth"
    shapes = meta_state_shapes(params)
    start = time.perf_counter()
    # layout pass: untouched storages (no RAM), bytes left as holes in the file
    layout = {name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}
    with torch.serialization.skip_data():
        torch.save(layout, pth)
    del layout
    # fill pass: each tensor through a shared map of the file
    rng = np.random.default_rng(seed)
    pool = torch.from_numpy((rng.standard_normal(POOL_SIZE, dtype=np.float32) * 0.02))
    pool = pool.to(torch.bfloat16)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        state = torch.load(pth, mmap=True, weights_only=True, map_location="cpu")
        for name, tensor in state.items():
            flat = tensor.view(-1)
            if name.endswith("norm.weight"):
                flat.copy_(1.0 + pool[: flat.numel()])
                continue
            for lo in range(0, flat.numel(), FILL_CHUNK):
                n = min(FILL_CHUNK, flat.numel() - lo)
                off = int(rng.integers(0, POOL_SIZE - n + 1))
                flat[lo:lo + n].copy_(pool[off:off + n])
        del state, tensor, flat
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    restore_zip_crcs(pth)
    os.sync()
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    return {"write_s": time.perf_counter() - start, "pth_bytes": pth.stat().st_size,
            "n_params": n_params, "n_tensors": len(shapes)}


def restore_zip_crcs(path: Path) -> None:
    """Writes the true CRC-32 of every record into the zip's central directory and data
    descriptors: `skip_data` saved CRC 0 for the tensor records, which the fill pass then
    changed, and the converter checks every CRC (convert/meta.py check_zip_crcs)."""
    import struct
    import zipfile
    import zlib

    with zipfile.ZipFile(path) as archive:
        infos, central = archive.infolist(), archive.start_dir
    with open(path, "r+b") as f:
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + name_len + extra_len)
            crc, left = 0, info.compress_size
            while left:
                chunk = f.read(min(left, 1 << 24))
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            if info.flag_bits & 0x8:          # data descriptor: [signature] crc sizes
                here = f.tell()
                f.seek(here + (4 if f.read(4) == b"PK\x07\x08" else 0))
                f.write(struct.pack("<I", crc))
            f.seek(central)
            entry = f.read(46)
            assert entry[:4] == b"PK\x01\x02", path
            f.seek(central + 16)
            f.write(struct.pack("<I", crc))
            central += 46 + sum(struct.unpack("<HHH", entry[28:34]))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None, path


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


# The CLI with save_converted's finite check patched out (the CLI has no flag for it).
_NO_FINITE_CHECK = ("import sys\n"
                    "import gptk_jax.llama.checkpoint as checkpoint\n"
                    "checkpoint.check_finite = lambda params, **kwargs: None\n"
                    "from convert.cli import main\n"
                    "sys.exit(main(sys.argv[1:]))\n")


def _number(pattern: str, text: str):
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def run_conversion(src: Path, out: Path, dtype: str, finite_check: bool = True) -> dict:
    """The CLI as a child process, with its memory sampled every 50 ms."""
    entry = ["-m", "convert"] if finite_check else ["-c", _NO_FINITE_CHECK]
    cmd = [sys.executable, *entry, "--format", "meta", "--input", str(src),
           "--output", str(out), "--dtype", dtype]
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    ru_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in _status_kb(proc.pid).items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)
            done.wait(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed ({proc.returncode}):\n{stderr}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"command": " ".join(cmd if finite_check else [*cmd[:2], "<no finite check>",
                                                          *cmd[3:]]),
            "finite_check": finite_check, "wall_s": wall, "stdout": stdout,
            "read_convert_s": _number(r"read and converted in ([\d.]+) s", stdout),
            "save_s": _number(r"wrote .* in ([\d.]+) s", stdout),
            "finite_check_s": _number(r"finite in ([\d.]+) s", stdout),
            "peak_vmrss_mb": peaks["VmRSS"] / 1024, "peak_rss_anon_mb": peaks["RssAnon"] / 1024,
            "peak_rss_file_mb": peaks["RssFile"] / 1024,
            "ru_maxrss_children_mb": ru.ru_maxrss / 1024,
            "child_user_s": ru.ru_utime - ru_before.ru_utime,
            "child_sys_s": ru.ru_stime - ru_before.ru_stime}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _rows(written: dict, result: dict, dtype: str) -> list[tuple[str, str]]:
    check = result["finite_check_s"]
    return [
        ("parameters", f"{written['n_params']:,} ({written['n_tensors']} tensors)"),
        ("input consolidated.00.pth", f"{written['pth_bytes'] / 1e9:.2f} GB bf16 "
                                      f"(written in {written['write_s']:.1f} s)"),
        ("output folder", f"{result['output_bytes'] / 1e9:.2f} GB {dtype}"),
        ("conversion wall time", f"{result['wall_s']:.1f} s "
                                 f"(user {result['child_user_s']:.1f} s, "
                                 f"sys {result['child_sys_s']:.1f} s)"),
        ("  read + convert (convert.meta)", f"{result['read_convert_s']} s"),
        ("  save_converted (orbax)", f"{result['save_s']} s"),
        ("  of which finite check", "off" if not result["finite_check"] else f"{check} s"),
        ("peak RSS (VmRSS)", f"{result['peak_vmrss_mb']:,.0f} MB"),
        ("  private (RssAnon)", f"{result['peak_rss_anon_mb']:,.0f} MB"),
        ("  mapped .pth pages (RssFile)", f"{result['peak_rss_file_mb']:,.0f} MB"),
        ("ru_maxrss (children)", f"{result['ru_maxrss_children_mb']:,.0f} MB"),
    ]


def _comparison(runs: list[dict]) -> dict:
    """Median wall times with and without the finite check, and the check's share."""
    def median(values):
        return float(np.median(values)) if values else None
    on = median([r["wall_s"] for r in runs if r["finite_check"]])
    off = median([r["wall_s"] for r in runs if not r["finite_check"]])
    check = median([r["finite_check_s"] for r in runs if r["finite_check"]])
    return {"wall_s_with_check": on, "wall_s_without_check": off,
            "wall_ratio_with_over_without": on / off,
            "finite_check_s": check, "finite_check_share_of_wall": check / on if check else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-json", required=True, type=Path)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="--dtype passed to the converter (default: the CLI's default)")
    ap.add_argument("--n-layers", type=int, default=LLAMA3_2_1B_PARAMS["n_layers"],
                    help="fewer layers for a quick smoke run (default: Llama 3.2 1B's 16)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new dir in /tmp")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic input and output")
    check = ap.add_mutually_exclusive_group()
    check.add_argument("--no-finite-check", action="store_true",
                       help="convert with save_converted's non-finite-weights check patched out")
    check.add_argument("--compare-finite-check", action="store_true",
                       help="convert with and without the finite check (alternating)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="with --compare-finite-check: conversions per variant (default 1)")
    args = ap.parse_args()

    params = dict(LLAMA3_2_1B_PARAMS, n_layers=args.n_layers)
    variants = ([True, False] * args.repeats if args.compare_finite_check
                else [not args.no_finite_check])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gptk-bench-convert-", dir="/tmp"))
    runs = []
    try:
        written = write_synthetic_checkpoint(workdir / "meta", params)
        for i, finite_check in enumerate(variants):
            out = workdir / f"out{i}"
            result = run_conversion(workdir / "meta", out, args.dtype, finite_check)
            result["output_bytes"] = _folder_bytes(out)
            if not args.keep:
                shutil.rmtree(out)      # one output folder on disk at a time
            runs.append(result)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    report = {"benchmark": "convert_meta", "params_json": params, "dtype": args.dtype,
              "input": written, **runs[0],
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(),
                          "loadavg_after": os.getloadavg()}}
    for result in runs:
        rows = _rows(written, result, args.dtype)
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n")
    if args.compare_finite_check:
        report["runs"] = runs
        report["finite_check_comparison"] = _comparison(runs)
        print(json.dumps(report["finite_check_comparison"], indent=2))
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
