"""`make results`: one command that regenerates docs/results.md from real runs on SmolLM2-135M.

    python bench/results.py [--steps 200] [--batch-size 16] [--pairs 1000] [--max-sentences 50]
        [--families linear,poma,lstm] [--runs-dir runs/results] [--output docs/results.md]
        [--report-only]

Steps (each is skipped when its output is already there, so a rerun after a crash continues;
training itself resumes from its latest checkpoint):
  1. self-distillation: `python -m gptk_jax.distill` writes the trunk's own greedy translations
     of the first --pairs News Commentary sources (default runs/distill/nc.first1000.smollm2.en).
     If another process is writing that file, this waits for it instead of appending to it too.
  2. per head family: `python -m gptk_jax.train --config configs/<family>_smollm2_wmt14.py` with
     the same overrides for every family (K, targets, data, prompt, optimizer, step budget), into
     RUNS/<family>; RUNS/<family>/train.json records the command and its wall time.
  3. per head family: `python -m gptk_jax.evaluate` (greedy vs MTP on newstest2014, batch sizes
     1 and 8, the oracle drafter for --oracle-family) into RUNS/<family>/eval; RUNS/<family>/
     eval.json records the command, its wall time and the machine's load around it.
  4. docs/results.md from RUNS/<family>/{metrics.jsonl, train.json, eval/report.json,
     eval.json} only: every number in it is read from those files. A missing file is an error
     that names the file and the step that writes it.

A RUNS/<family> folder made with other settings is refused (remove it or use another
--runs-dir) rather than mixed with these.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptk_jax.data.root import add_data_root_argument, resolve_data_root  # noqa: E402
from gptk_jax.data.testsets import NEWS_COMMENTARY, WMT14_DIR  # noqa: E402

FAMILIES = ("linear", "poma", "lstm")
DEFAULT_CHECKPOINT = ".cache/models/smollm2-135m"

# Issue 13's goals at K = 4: every family at least a prototype's τ on the same trunk (trained on
# the trunk's own translations), and faster than greedy; issue 14's with prompt lookup: τ >= 3.
GOAL_TAU_BY_FAMILY = {"linear": 1.34, "poma": 1.34, "lstm": 1.50}
GOAL_TAU_LSTM_STRETCH = 1.8
GOAL_TAU = 3.0                    # with prompt lookup (issue 14)
GOAL_SPEEDUP_B1 = 1.0
GOAL_SPEEDUP_B8 = 1.0
# Published anchors (as cited in the issue; other models, hardware and tasks than ours).
ANCHOR_BPD_TAU = 1.76            # blockwise parallel decoding (Stern et al. 2018), mean block size
ANCHOR_BPD_TAU_DISTILLED = 1.91  # ... trained on distilled data
ANCHORS_B1 = (("Medusa", 1.73), ("Hydra", 1.94), ("EAGLE", 1.99))  # Spec-Bench, A100, batch 1
ANCHOR_HYDRA_B1, ANCHOR_HYDRA_B8 = 2.70, 1.63                      # Hydra, batch 1 -> batch 8


class ResultsError(GptkError, RuntimeError):
    """A step failed or an input of the report is missing."""


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def family_config(family: str, lstm_recipe: str = "default") -> str:
    if family == "lstm" and lstm_recipe == "conditioned":
        return "configs/lstm_conditioned_smollm2_wmt14.py"
    return f"configs/{family}_smollm2_wmt14.py"


def data_root(args: argparse.Namespace) -> str:
    """The data root (--data-root, $GPTK_DATA, ../shared/data from the working directory) as the
    commands name it: beside the checkout, relative to the repository root where they run (the
    default gives the commands earlier runs recorded); elsewhere, absolute."""
    root = resolve_data_root(args.data_root)
    return os.path.relpath(root, ROOT) if root.is_relative_to(ROOT.parent) else str(root)


def news_commentary_prefix(args: argparse.Namespace) -> str:
    return "/".join((data_root(args), WMT14_DIR, NEWS_COMMENTARY))


def _tuple(items) -> str:
    """A tuple of strings as a config flag value (double quotes: readable in a shell line)."""
    return "(" + ", ".join(json.dumps(str(x)) for x in items) + ",)"


def train_overrides(args: argparse.Namespace, family: str) -> list[tuple[str, str]]:
    """(config key, flag value) pairs; the same for every family except the family's options.

    The family configs inherit the seed's protocol (PoMa / LSTM: offsets 1..3, only the first
    target tokens supervised, coupled L2, no warm-up, 5-shot prompts); these make every family
    train the same way, on the prompt MTP decoding uses (--shots, the same in distillation,
    training and evaluation), against what verification accepts (the trunk's own argmax, or its
    whole distribution with --targets trunk_soft), on the trunk's own translations."""
    k = args.k
    common = [
        ("trunk_checkpoint", args.checkpoint),
        ("head.k", str(k)),
        ("head.offsets", repr(tuple(range(2, k + 1)))),
        ("loss.targets", args.targets),
        ("loss.offset_weight_decay", repr(args.offset_weight_decay)),
        ("loss.first_target_tokens_only", "False"),
        ("data.shots", str(args.shots)),
        ("data.space_with_target", "True"),
        ("data.max_len", str(args.max_len)),
        ("data.truncate", "drop"),
        ("data.train_prefixes", _tuple((news_commentary_prefix(args),))),
        ("data.train_target_files", _tuple((args.distill_output,))),
        ("data.max_train_pairs", str(args.pairs)),
        ("data.eval_max_sentences", str(args.eval_sentences)),
        ("features.cache", "True"),
        # one cache for every family: heads that read the same trunk field over the same rows
        # share it (its folder is keyed by the rows, fields and trunk)
        ("features.cache_dir", f"{args.runs_dir}/feature_cache"),
        ("optimizer.name", "adamw"),
        ("optimizer.learning_rate", repr(args.lr)),
        ("optimizer.schedule", "cosine"),
        ("optimizer.warmup_steps", str(args.warmup)),
        ("optimizer.weight_decay", "0.0"),
        ("optimizer.grad_clip_norm", "1.0"),
        ("training.global_batch_size", str(args.batch_size)),
        ("training.num_train_steps", str(args.steps)),
        ("training.eval_every_steps", "0"),
        ("training.eval_at_start", "True"),
        ("training.checkpoint_every_steps", str(max(1, min(100, args.steps)))),
    ]
    if family == "poma":   # this project's recipe, not the original code's
        common += [("head.recipe", "default")]
    if family == "lstm":
        common += [("head.recipe", args.lstm_recipe)]
    return common


def train_command(args: argparse.Namespace, family: str) -> list[str]:
    return (["-m", "gptk_jax.train", "--config", family_config(family, args.lstm_recipe),
             "--workdir", str(Path(args.runs_dir) / family), "--noprogress"] +
            [f"--config.{key}={value}" for key, value in train_overrides(args, family)])


def evaluate_command(args: argparse.Namespace, family: str, output: str, batch_sizes: str,
                     extra: Sequence[str] = ()) -> list[str]:
    """`python -m gptk_jax.evaluate` of `family`'s heads into RUNS/<family>/<output>; the data
    root is passed on only when --data-root was given (evaluate resolves the rest alike)."""
    run = Path(args.runs_dir) / family
    return (["-m", "gptk_jax.evaluate", "--checkpoint", args.checkpoint,
             "--heads", str(run / "heads"), "--split", "newstest2014",
             "--max-sentences", str(args.max_sentences), "--batch-sizes", batch_sizes,
             "--max-new-tokens", str(args.max_new_tokens), "--output", str(run / output),
             "--shots", str(args.shots), *draft_vocab_flags(args), *extra,
             "--space-with-target", "--no-progress"]
            + (["--data-root", data_root(args)] if args.data_root else []))


def draft_vocab_flags(args: argparse.Namespace) -> list[str]:
    """Heads draft over the --draft-vocab-size most frequent tokens of the trunk's own
    translations (what they draft on; News Commentary English would miss the German this trunk
    copies); 0: the whole vocabulary."""
    if not args.draft_vocab_size:
        return []
    return ["--draft-vocab-size", str(args.draft_vocab_size), "--draft-vocab-from",
            args.distill_output]


def eval_command(args: argparse.Namespace, family: str) -> list[str]:
    cmd = evaluate_command(args, family, "eval", args.batch_sizes)
    if family == args.oracle_family:
        cmd.append("--oracle")
    return cmd


def distill_command(args: argparse.Namespace) -> list[str]:
    return ["-m", "gptk_jax.distill", "--checkpoint", args.checkpoint, "--input",
            news_commentary_prefix(args), "--output", args.distill_output,
            "--max-pairs", str(args.pairs), "--shots", str(args.shots),
            "--batch-size", str(args.distill_batch_size), "--k", str(args.distill_k),
            "--max-new-tokens", str(args.distill_max_new_tokens), "--space-with-target",
            "--no-progress"]


def shown(cmd: Sequence[str]) -> str:
    """A command as a user types it (`python ...`)."""
    return " ".join(["python"] + [shlex.quote(c) for c in cmd])


def shown_block(cmd: Sequence[str]) -> str:
    """`shown`, one flag per line (for markdown code blocks)."""
    words = ["python"] + [shlex.quote(c) for c in cmd]
    lines, current = [], []
    for w in words:
        if w.lstrip("'").startswith("--") and current and len(" ".join(current)) > 40:
            lines.append(" ".join(current))
            current = []
        current.append(w)
    lines.append(" ".join(current))
    return " \\\n    ".join(lines)


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def execute(cmd: Sequence[str], log_file: Path, ok_codes=(0,)) -> dict:
    """Runs `python CMD` from the repository root, output to the console and to log_file."""
    print(f"\n$ {shown(cmd)}", flush=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), load_average()
    t0 = time.perf_counter()
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shown(cmd)}\n")
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    record = {"started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
              "seconds": time.perf_counter() - t0, "returncode": code,
              "load_average_before": load_before, "load_average_after": load_average()}
    if code not in ok_codes:
        raise ResultsError(f"step failed (exit code {code}): {shown(cmd)}\n"
                           f"its output is in {log_file}; rerun to continue")
    return record


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

def complete_lines(path: Path) -> int:
    """Complete lines of a file (read only: a writer may be appending to it)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def other_writer(path: Path) -> Optional[int]:
    """PID of another running `gptk_jax.distill` whose --output is `path` (Linux /proc)."""
    target = path.resolve()
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return None
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if "gptk_jax.distill" not in argv or "--output" not in argv:
                continue
            cwd = Path(os.readlink(entry / "cwd"))
        except (OSError, ValueError):
            continue
        out = Path(argv[argv.index("--output") + 1])
        if (out if out.is_absolute() else cwd / out).resolve() == target:
            return int(entry.name)
    return None


def step_trunk(args: argparse.Namespace) -> None:
    """The converted trunk; the default SmolLM2 folder is made as `make demo` makes it."""
    folder = ROOT / args.checkpoint
    if (folder / "config.json").is_file():
        return
    if folder.resolve() != (ROOT / DEFAULT_CHECKPOINT).resolve():
        raise ResultsError(f"--checkpoint {args.checkpoint}: no converted model there "
                           f"(python -m convert ...)")
    execute(["-c", "from pathlib import Path; from gptk_jax.demo import ensure_converted; "
             f"ensure_converted(Path({str(folder)!r}))"], ROOT / args.runs_dir / "convert.log")


def step_distill(args: argparse.Namespace) -> None:
    path = ROOT / args.distill_output
    while (pid := other_writer(path)) is not None:
        print(f"distill: process {pid} is writing {args.distill_output} "
              f"({complete_lines(path)}/{args.pairs} lines); waiting for it", flush=True)
        time.sleep(60)
    done = complete_lines(path)
    record_path = ROOT / args.runs_dir / "distill.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": distill_command(args), "output": args.distill_output}
    if done >= args.pairs:
        print(f"distill: {args.distill_output} has {done} lines (>= {args.pairs}): skipped")
        record_path.write_text(json.dumps({**record, "reused": True, "lines": done}, indent=2))
        return
    invocation = execute(distill_command(args), ROOT / args.runs_dir / "distill.log")
    done = complete_lines(path)
    record_path.write_text(json.dumps({**record, "reused": False, "lines": done,
                                       "invocation": invocation}, indent=2))
    if done < args.pairs:
        raise ResultsError(f"distill: {args.distill_output} has {done} lines, {args.pairs} asked")


def _record(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _check_same(kind: str, path: Path, cmd: list[str], done: bool) -> Optional[dict]:
    """The step record at `path`; refuses a record (or a finished output) of another command."""
    record = _record(path)
    if record is not None and record["command"] != cmd:
        raise ResultsError(
            f"{path.parent} holds a {kind} run with other settings:\n  it ran:  "
            f"{shown(record['command'])}\n  now:     {shown(cmd)}\nremove {path.parent} or "
            f"pass another --runs-dir")
    if record is None and done:
        raise ResultsError(f"{path.parent} holds a finished {kind} run without {path.name} "
                           f"(its settings are unknown): remove it or pass another --runs-dir")
    return record


def _run_step(kind: str, cmd: list[str], record_path: Path, done: bool, ok_codes=(0,)) -> None:
    record = _check_same(kind, record_path, cmd, done)
    if done:
        print(f"{kind}: {record_path.parent} done: skipped")
        return
    record = record or {"command": cmd, "invocations": []}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))     # claims the folder for this command
    try:
        record["invocations"].append(execute(cmd, record_path.parent / f"{kind}.log", ok_codes))
    finally:
        record["wall_seconds"] = sum(i["seconds"] for i in record["invocations"])
        record_path.write_text(json.dumps(record, indent=2))


def step_train(args: argparse.Namespace, family: str) -> None:
    run = ROOT / args.runs_dir / family
    _run_step("train", train_command(args, family), run / "train.json",
              (run / "heads" / "heads.json").is_file())


def step_eval(args: argparse.Namespace, family: str) -> None:
    run = ROOT / args.runs_dir / family
    # exit code 1 with a report: MTP's output differed from greedy; the report says so.
    cmd = eval_command(args, family)
    _run_step("eval", cmd, run / "eval.json", (run / "eval" / "report.json").is_file(),
              ok_codes=(0, 1))
    if not (run / "eval" / "report.json").is_file():
        raise ResultsError(f"evaluation wrote no {run / 'eval' / 'report.json'}: see "
                           f"{run / 'eval.log'}")


def bf16_command(args: argparse.Namespace) -> list[str]:
    return evaluate_command(args, args.bf16_family, "eval_bf16", "8", ("--dtype", "bfloat16"))


def step_bf16(args: argparse.Namespace) -> None:
    """The same evaluation with the trunk in bfloat16: MTP's token mismatch rate vs greedy."""
    run = ROOT / args.runs_dir / args.bf16_family
    _run_step("eval_bf16", bf16_command(args), run / "eval_bf16.json",
              (run / "eval_bf16" / "report.json").is_file(), ok_codes=(0, 1))


def lookup_command(args: argparse.Namespace, k: int) -> list[str]:
    return evaluate_command(args, args.lookup_family, f"eval_lookup_k{k}", args.batch_sizes,
                            ("--lookup", "--lookup-k", str(k)))


def step_lookup(args: argparse.Namespace) -> None:
    """Prompt-lookup drafting, alone and in front of --lookup-family's heads, per K."""
    run = ROOT / args.runs_dir / args.lookup_family
    for k in args.lookup_ks:
        _run_step(f"eval_lookup_k{k}", lookup_command(args, k), run / f"eval_lookup_k{k}.json",
                  (run / f"eval_lookup_k{k}" / "report.json").is_file(), ok_codes=(0, 1))


def lookup_section(args: argparse.Namespace) -> list[str]:
    run = ROOT / args.runs_dir / args.lookup_family
    reports = {k: json.loads(_need(run / f"eval_lookup_k{k}" / "report.json",
                                   f"lookup evaluation K={k}").read_text())
               for k in args.lookup_ks}
    any_r = next(iter(reports.values()))
    lines = ["## Prompt-lookup drafting (no training)", "",
             "Drafts are the tokens that followed the latest earlier occurrence of the sequence's "
             "last 1-3 tokens, prompt included (`gptk_jax/decoding/lookup.py`, inside the same "
             "jitted draft-verify loop); `heads+lookup` lets the "
             f"{args.lookup_family} heads draft wherever the lookup finds nothing. Same prompts "
             f"as above ({any_r['num_sentences']} newstest2014 sentences, "
             f"{any_r['shots']}-shot, max {any_r['max_new_tokens']} new tokens), greedy rerun "
             "in the same process for each K:", "",
             "| run | K | tokens/s | speedup over greedy | τ | per-offset acceptance | "
             "identical to greedy |", "|---|---|---|---|---|---|---|"]
    for k, report in reports.items():
        for name, r in report["runs"].items():
            if r["method"] == "greedy":
                continue
            rates = ", ".join(_fmt(v, ".2f") for v in r["per_offset_acceptance"].values())
            lines.append(f"| {name} | {r.get('k', k)} | {r['tokens_per_second']:.1f} | "
                         f"{_fmt(r.get('speedup'), '.2f', '×')} | {_fmt(r.get('tau'))}"
                         f" | {rates} | "
                         f"{ {True: 'yes', False: '**no**'}.get(r.get('identical_to_greedy'))} |")
    best = max(((r.get("speedup") or 0, name, k) for k, rep in reports.items()
                for name, r in rep["runs"].items() if r["method"] != "greedy"))
    lines += ["", f"Fastest: {best[1]} at K={best[2]}, {best[0]:.2f}× greedy. Why it works "
              "here: this weak translator copies much of the German source into its output "
              "(0-shot; see the translations), and a lookup drafts such copies, names and numbers "
              "exactly. On a model that translates, expect less from the lookup and more from "
              "trained heads.", ""]
    k4 = reports.get(4)
    if k4:
        lk = {b: k4["runs"].get(f"lookup/b{b}") for b in (1, 8)}
        if lk[1] and lk[8]:
            lines += [f"Against the issue's goals at K = 4 (τ ≥ {GOAL_TAU}, ≥ {GOAL_SPEEDUP_B1}× "
                      f"at batch 1, ≥ {GOAL_SPEEDUP_B8}× at batch 8): lookup τ "
                      f"{_fmt(lk[1].get('tau'))}, {_fmt(lk[1].get('speedup'), '.2f', '×')}"
                      f" at batch 1, {_fmt(lk[8].get('speedup'), '.2f', '×')} at batch 8: "
                      + ("met." if (lk[1]["tau"] >= GOAL_TAU and
                                    lk[1]["speedup"] >= GOAL_SPEEDUP_B1 and
                                    lk[8]["speedup"] >= GOAL_SPEEDUP_B8) else "not met."), ""]
    for k in reports:
        lines += ["```bash", shown_block(lookup_command(args, k)), "```"]
    return lines + [""]


def bf16_section(args: argparse.Namespace) -> list[str]:
    run = ROOT / args.runs_dir / args.bf16_family
    report = json.loads(_need(run / "eval_bf16" / "report.json",
                              "bfloat16 evaluation").read_text())
    lines = ["## bfloat16: MTP vs greedy token mismatch", "",
             f"The {args.bf16_family} heads with the trunk computing in {report['dtype']} "
             f"({report['num_sentences']} newstest2014 sentences, batch 8). Exactness is "
             "promised in float32 only (0 mismatches above); in bfloat16 a K-token verify step "
             "rounds differently from greedy's 1-token steps, so near-tied argmaxes can flip:", "",
             "| run | rows differing from greedy | tokens/s | τ |", "|---|---|---|---|"]
    for name, r in report["runs"].items():
        if "rows_differing_from_greedy" in r:
            lines.append(f"| {name} | {r['rows_differing_from_greedy']}/"
                         f"{report['num_sentences']} | {r['tokens_per_second']:.1f} | "
                         f"{r.get('tau', float('nan')):.2f} |")
    lines += ["", "```bash", shown_block(bf16_command(args)), "```", ""]
    return lines


# --------------------------------------------------------------------------------------------
# Reading the results
# --------------------------------------------------------------------------------------------

def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ResultsError(f"missing {path} ({what}); run `python bench/results.py` (same "
                           f"options) to produce it")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl records; a restarted run re-logs steps, the later record of a step wins
    (as gptk_jax.training.read_metrics)."""
    by_key = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_key[(r.get("split"), r.get("step"))] = r
    return sorted(by_key.values(), key=lambda r: (r["step"], str(r.get("split"))))


def load_family(runs_dir: Path, family: str) -> dict:
    run = runs_dir / family
    train = json.loads(_need(run / "train.json", "training command and wall time").read_text())
    metrics = read_jsonl(_need(run / "metrics.jsonl", "training metrics"))
    heads_meta = json.loads(_need(run / "heads" / "heads.json", "trained heads").read_text())
    report = json.loads(_need(run / "eval" / "report.json", "evaluation report").read_text())
    evaluation = json.loads(_need(run / "eval.json", "evaluation command").read_text())
    setup = [r for r in metrics if r["split"] == "setup"]
    evals = [r for r in metrics if r["split"] == "eval"]
    trains = [r for r in metrics if r["split"] == "train"]
    if not setup or not trains or len(evals) < 1:
        raise ResultsError(f"{run / 'metrics.jsonl'} lacks setup / train / eval records: the "
                           f"training did not finish; rerun to continue it")
    loop_seconds, previous = 0.0, 0
    for r in trains:
        if r.get("steps_per_second"):
            loop_seconds += (r["step"] - previous) / r["steps_per_second"]
        previous = r["step"]
    offsets = heads_meta["head_config"]["offsets"]
    return {"family": family, "run": run, "train": train, "setup": setup[-1],
            "eval_start": evals[0] if evals[0]["step"] == 0 else None, "eval_end": evals[-1],
            "last_train": trains[-1], "loop_seconds": loop_seconds, "offsets": offsets,
            "report": report, "evaluation": evaluation, "heads_meta": heads_meta}


def _run(report: dict, name: str) -> Optional[dict]:
    return report["runs"].get(name)


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def family_numbers(f: dict) -> dict:
    """The summary numbers of one family, every one read from its files."""
    rep = f["report"]
    batches = [r["batch_size"] for r in rep["runs"].values() if r["method"] == "greedy"]
    out = {"train_wall": f["train"]["wall_seconds"], "steps": f["last_train"]["step"],
           "train_rows": f["setup"].get("train_rows"),
           "cache_seconds": f["setup"].get("feature_cache_seconds"),
           "loop_seconds": f["loop_seconds"],
           "acc_est_start": (f["eval_start"] or {}).get("acceptance_trunk"),
           "acc_est_end": f["eval_end"].get("acceptance_trunk"),
           "k": rep["k"], "num_sentences": rep["num_sentences"], "batches": batches,
           "identical": bool(rep["all_identical_to_greedy"] and rep["scores_identical"])}
    for b in batches:
        mtp, greedy, oracle = (_run(rep, f"{m}/b{b}") for m in ("mtp", "greedy", "oracle"))
        out[f"tau_b{b}"] = mtp and mtp.get("tau")
        out[f"speedup_b{b}"] = mtp and mtp.get("speedup")
        out[f"tps_mtp_b{b}"] = mtp and mtp.get("tokens_per_second")
        out[f"tps_greedy_b{b}"] = greedy and greedy.get("tokens_per_second")
        out[f"oracle_tau_b{b}"] = oracle and oracle.get("tau")
        out[f"oracle_speedup_b{b}"] = oracle and oracle.get("speedup")
    first = batches[0]
    q = rep["quality"].get(f"mtp/b{first}") or rep["quality"][f"greedy/b{first}"]
    out.update(bleu=q["bleu"], chrf=q["chrf"], bleu_signature=q["bleu_signature"],
               chrf_signature=q["chrf_signature"])
    return out


def _compare(value: float, anchor: float) -> str:
    return "at" if abs(value - anchor) < 0.005 else ("above" if value > anchor else "below")


def where_we_stand(family: str, n: dict) -> str:
    """One sentence per family, computed from its numbers."""
    parts = []
    tau, goal_tau = n.get("tau_b1"), GOAL_TAU_BY_FAMILY.get(family, GOAL_TAU)
    if tau is not None:
        goal = "meets" if tau >= goal_tau else "misses"
        parts.append(f"τ {tau:.2f} at K={n['k']} {goal} the goal {goal_tau:.2f} "
                     f"({tau / goal_tau:.0%} of it) and is {_compare(tau, ANCHOR_BPD_TAU)} "
                     f"blockwise parallel decoding's {ANCHOR_BPD_TAU} "
                     f"({_compare(tau, ANCHOR_BPD_TAU_DISTILLED)} its distilled "
                     f"{ANCHOR_BPD_TAU_DISTILLED})")
    s1 = n.get("speedup_b1")
    if s1 is not None:
        beaten = [name for name, x in ANCHORS_B1 if s1 > x]
        goal = "meets" if s1 >= GOAL_SPEEDUP_B1 else "misses"
        vs = (f"above {', '.join(beaten)}'s published" if beaten else
              f"below all of {', '.join(name for name, _ in ANCHORS_B1)}'s published")
        parts.append(f"the batch-1 speedup {s1:.2f}× {goal} the goal {GOAL_SPEEDUP_B1}× and is "
                     f"{vs} A100 numbers")
    s8 = n.get("speedup_b8")
    if s8 is not None:
        goal = "meets" if s8 >= GOAL_SPEEDUP_B8 else "misses"
        parts.append(f"at batch 8 {s8:.2f}× {goal} the goal {GOAL_SPEEDUP_B8}× "
                     f"({_compare(s8, ANCHOR_HYDRA_B8)} Hydra's {ANCHOR_HYDRA_B8}×)")
    if not parts:
        return f"**{family}**: no MTP runs in the report."
    sentence = f"**{family}**: " + "; ".join(parts) + "."
    o1 = n.get("oracle_speedup_b1")
    if o1 is not None and s1 is not None:
        sentence += (f" The oracle drafter (every draft accepted, τ "
                     f"{_fmt(n.get('oracle_tau_b1'))}) reaches {o1:.2f}× at batch 1 on this "
                     f"machine: the ceiling any K={n['k']} heads can reach here.")
    if not n["identical"]:
        sentence += " MTP's output DIFFERED from greedy: see the report."
    return sentence


def research_question(families: list[dict], nums: dict) -> list[str]:
    """"Is an LSTM, being time-aware, a better multi-token head than positional or projection
    matrices?" answered from the numbers: acceptance (what the head predicts) and speedup (what
    its drafting costs) ranked separately."""
    first = next(iter(nums.values()))["batches"][0]
    have = [f for f in families if nums[f["family"]].get(f"tau_b{first}") is not None]
    if len(have) < 2:
        return []
    by_tau = sorted(have, key=lambda f: -nums[f["family"]][f"tau_b{first}"])
    by_speed = sorted(have, key=lambda f: -nums[f["family"]][f"speedup_b{first}"])
    L = ["### The research question: LSTM vs positional / projection matrices", "",
         "Per-offset conditional acceptance when decoding (batch "
         f"{first}: the share of steps whose draft at offset k is accepted, given offsets "
         "2..k-1 were):", "",
         "| family | τ | " + " | ".join(f"offset {o}" for o in range(2, first_k(nums) + 1))
         + " | speedup |", "|" + "---|" * (first_k(nums) + 2)]
    for f in by_tau:
        n = nums[f["family"]]
        acc = (_run(f["report"], f"mtp/b{first}") or {}).get("per_offset_acceptance", {})
        L.append(f"| {f['family']} | {_fmt(n[f'tau_b{first}'])} | "
                 + " | ".join(_fmt(acc.get(str(o)), ".3f") for o in range(2, first_k(nums) + 1))
                 + f" | {_fmt(n[f'speedup_b{first}'], '.2f', '×')} |")
    best, fastest = by_tau[0]["family"], by_speed[0]["family"]
    L += ["", f"Highest τ: **{best}** ("
          + ", ".join(f"{f['family']} {_fmt(nums[f['family']][f'tau_b{first}'])}"
                      for f in by_tau)
          + f"). Fastest at batch {first}: **{fastest}**. "
          "Acceptance measures the head; speedup also pays for its drafting (an LSTM drafts "
          "offset by offset, one unembedding each; linear heads project every offset in one "
          "unembedding call). With τ this close to 1 for every family, these heads, trained "
          "this briefly on a weak translator, do not settle the question; they show the "
          "ranking at this budget only."]
    if any(f["family"] == "poma" for f in have):
        L += ["", "PoMa, as configured here (the trunk's LM head frozen, unlike the research "
              "code), has no parameter that sees the content: it adds a learned vector per "
              "absolute position to the last hidden state and renormalises with a learned per-channel "
              "scale, so each offset's "
              "draft is the trunk's next-token distribution nudged by position. Its per-offset "
              "newstest2013 accuracy barely moves in training (its table below). The research code trained the shared LM head "
              "instead, which the issue records as degrading next-token prediction."]
    L += [""]
    return L


def train_loads(record: dict) -> str:
    """Load averages around each training invocation: wall time is only comparable across
    families trained at a similar load (the machine is shared)."""
    inv = record.get("invocations") or []
    loads = [f"{i.get('load_average_before', ['?'])[0]} -> {i.get('load_average_after', ['?'])[0]}"
             for i in inv]
    return "1-min load average before -> after: " + ("; ".join(loads) or "not recorded")


def first_k(nums: dict) -> int:
    return next(iter(nums.values()))["k"]


def overrides_of(cmd: Sequence[str]) -> dict:
    """{'head.k': '4', ...}: the --config.KEY=VALUE flags of a training command."""
    return dict(a[len("--config."):].split("=", 1) for a in cmd
                if a.startswith("--config.") and "=" in a)


def _config_docline(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _trunk_of(path: Path) -> str:
    """config.trunk_checkpoint of a configs/*.py, read without importing jax."""
    sys.path.insert(0, str(ROOT))
    try:
        import importlib
        module = importlib.import_module(f"configs.{path.stem}")
        return module.get_config().trunk_checkpoint
    finally:
        sys.path.pop(0)


def trunk_facts(checkpoint: str) -> str:
    """'<layers> layers, dim D, vocab V, from <source>' from the converted folder's JSON files."""
    folder = ROOT / checkpoint
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "config.json unreadable"
    text = (f"{config.get('n_layers')} layers, dim {config.get('dim')}, vocab "
            f"{config.get('vocab_size')}")
    try:
        conversion = json.loads((folder / "conversion.json").read_text())
        source = conversion.get("source_format") or conversion.get("format") or \
            conversion.get("source")
        files = conversion.get("files") or conversion.get("source_files")
        if isinstance(files, dict):
            files = list(files)
        if isinstance(files, list) and files:
            first = files[0]
            source = f"{source}: {Path(first.get('path', '') if isinstance(first, dict) else first).name}"
        if source:
            text += f", converted from {source}"
    except (OSError, ValueError):
        pass
    return text + f", {config.get('dtype', 'float32')}"


def machine_facts() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = pages * size / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"nproc": affinity or os.cpu_count(), "cpu_count": os.cpu_count(), "cpu": cpu,
            "memory_gib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_now": load_average()}


def markdown(families: list[dict], args: argparse.Namespace, invocation: str) -> str:
    nums = {f["family"]: family_numbers(f) for f in families}
    any_n = next(iter(nums.values()))
    batches = any_n["batches"]
    now = datetime.datetime.now().isoformat(timespec="minutes")
    L = ["# Results: MTP heads on SmolLM2-135M, WMT14 de→en (CPU)", "",
         f"Generated {now} by `{invocation}` from the JSON files under `{args.runs_dir}/` "
         f"(every number below is read from them; rerun the command to regenerate).", ""]

    L += ["## Summary", "",
          f"K = {any_n['k']} tokens per verify step (trunk token + {any_n['k'] - 1} drafts). "
          f"Speedups are MTP tokens/s over our own jitted greedy decoder on the same prompts and "
          f"batch size (compilation excluded), newstest2014 first {any_n['num_sentences']} "
          f"sentences; τ = tokens per verify step, the bonus token included.", ""]
    head = ["family", "train wall", "steps", "acceptance est. (newstest2013) untrained → trained"]
    head += [f"τ b{b}" for b in batches] + [f"speedup b{b}" for b in batches]
    head += [f"tokens/s MTP / greedy b{b}" for b in batches]
    head += ["BLEU", "chrF", "MTP == greedy", "oracle τ / speedup b1"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fam, n in nums.items():
        row = [fam, f"{n['train_wall'] / 60:.1f} min", str(n["steps"]),
               f"{_fmt(n['acc_est_start'])} → {_fmt(n['acc_est_end'])}"]
        row += [_fmt(n.get(f"tau_b{b}")) for b in batches]
        row += [_fmt(n.get(f"speedup_b{b}"), ".2f", "×") for b in batches]
        row += [f"{_fmt(n.get(f'tps_mtp_b{b}'), '.1f')} / {_fmt(n.get(f'tps_greedy_b{b}'), '.1f')}"
                for b in batches]
        row += [f"{n['bleu']:.2f}", f"{n['chrf']:.2f}", "yes" if n["identical"] else "**NO**"]
        first = batches[0]
        row.append(f"{_fmt(n.get(f'oracle_tau_b{first}'))} / "
                   f"{_fmt(n.get(f'oracle_speedup_b{first}'), '.2f', '×')}"
                   if n.get(f"oracle_tau_b{first}") is not None else "–")
        L.append("| " + " | ".join(row) + " |")
    L += ["", "Acceptance estimate: 1 + Σ_k Π_{i≤k} top-1(offset i) against the trunk's own "
          "argmax on newstest2013 (teacher-forced, from the training run's evaluation); τ is the "
          "measured value when decoding.", ""]

    L += ["## Goals and anchors", "",
          "Goals (issue 13), at K=4 on the trunk's own output: τ ≥ "
          + ", ".join(f"{fam} {t}" for fam, t in GOAL_TAU_BY_FAMILY.items())
          + f" (a prototype's on this trunk; LSTM stretch {GOAL_TAU_LSTM_STRETCH}), faster than "
          f"greedy at batch 1 and 8; with prompt lookup (issue 14) τ ≥ {GOAL_TAU}.", "",
          f"Anchors: blockwise parallel decoding τ {ANCHOR_BPD_TAU} ({ANCHOR_BPD_TAU_DISTILLED} "
          f"with distilled training data); Spec-Bench on an A100 at batch 1: "
          + ", ".join(f"{name} {x}×" for name, x in ANCHORS_B1)
          + f"; Hydra {ANCHOR_HYDRA_B1}× at batch 1 falls to {ANCHOR_HYDRA_B8}× at batch 8. "
          "These are other models (7B+), hardware (GPU, memory-bound decoding) and tasks; our "
          "speedups are on a 135M model on CPU, where verifying K tokens costs more than one, "
          "so a speedup there is below τ.", "", "### Where we stand", ""]
    L += [f"- {where_we_stand(fam, n)}" for fam, n in nums.items()]
    L += [""] + research_question(families, nums)

    for f in families:
        fam, n, rep = f["family"], nums[f["family"]], f["report"]
        L += [f"## {fam}", "",
              f"Training: {n['steps']} steps, {n['train_rows']} training rows, wall "
              f"{n['train_wall']:.0f}s (of which trunk-feature cache {_fmt(n['cache_seconds'], '.0f')}s"
              f", head steps about {n['loop_seconds']:.0f}s; the rest is start-up, newstest2013 "
              f"evaluation at start and end, checkpoints; {train_loads(f['train'])}). Command:",
              "", "```bash",
              shown_block(f["train"]["command"]), "```", "",
              "Per-offset top-1 against the trunk's argmax on newstest2013 (teacher-forced):", "",
              "| offset | untrained | trained |", "|---|---|---|"]
        start, end = f["eval_start"] or {}, f["eval_end"]
        for o in f["offsets"]:
            key = f"top1_trunk_o{o}"
            L.append(f"| {o} | {_fmt(start.get(key), '.1%')} | {_fmt(end.get(key), '.1%')} |")
        L += ["", f"Decoding (newstest2014, {rep['num_sentences']} sentences, K={rep['k']}, "
              f"max {rep['max_new_tokens']} new tokens, {rep['platform']}, {rep['dtype']}):", "",
              "| run | tokens/s | speedup | τ | accepted drafts histogram | identical to greedy | "
              "BLEU | chrF |", "|---|---|---|---|---|---|---|---|"]
        for name, r in rep["runs"].items():
            q = rep["quality"][name]
            L.append(f"| {name} | {_fmt(r['tokens_per_second'], '.1f')} | "
                     f"{_fmt(r.get('speedup'), '.2f', '×')} | {_fmt(r.get('tau'))} | "
                     f"{r.get('accepted_histogram', '–')} | "
                     f"{ {True: 'yes', False: '**no**'}.get(r.get('identical_to_greedy'), '–')} | "
                     f"{q['bleu']:.2f} | {q['chrf']:.2f} |")
        for name, r in rep["runs"].items():
            if r.get("per_offset_acceptance"):
                rates = ", ".join(f"offset {o}: {_fmt(v, '.3f')}"
                                  for o, v in r["per_offset_acceptance"].items())
                L.append(f"\n{name} conditional acceptance per offset: {rates}.")
        loads = [i.get("load_average_before") for i in f["evaluation"]["invocations"]] + \
                [f["evaluation"]["invocations"][-1].get("load_average_after")]
        L += ["", f"Command (load average before / after: {loads[-2]} / {loads[-1]}):", "",
              "```bash", shown_block(f["evaluation"]["command"]), "```", ""]

    m = machine_facts()
    o = overrides_of(families[0]["train"]["command"])
    distill = _record(ROOT / args.runs_dir / "distill.json")
    if distill is None:
        distill_text = "# (no distill.json in the runs folder: the command of these options)\n" + \
            shown_block(distill_command(args))
    else:
        distill_text = shown_block(distill["command"])
        if distill.get("reused"):
            distill_text = (f"# {distill['output']} already had {distill['lines']} lines, so "
                            f"it was reused, not regenerated\n") + distill_text
    L += ["## Machine", "",
          f"- CPUs: {m['nproc']} usable ({m['cpu_count']} online), {m['cpu'] or 'unknown model'}; "
          f"memory {_fmt(m['memory_gib'], '.0f')} GiB; {m['platform']}; Python {m['python']}",
          f"- load average (1, 5, 15 min) when this page was written: {m['load_average_now']}; "
          "each evaluation's load is given with its command above. Other jobs on the machine "
          "slow greedy and MTP alike, but not always equally: compare speedups measured at a "
          "similar load.", "",
          "## Setup", "",
          f"- Trunk `{o.get('trunk_checkpoint', args.checkpoint)}` "
          f"({trunk_facts(o.get('trunk_checkpoint', args.checkpoint))}), frozen.",
          f"- Training text: the first {o.get('data.max_train_pairs')} pairs of "
          f"`{o.get('data.train_prefixes')}` with the targets replaced by "
          f"`{o.get('data.train_target_files')}` (the trunk's own greedy translations, made by "
          f"the command below), {o.get('data.shots')}-shot prompts `de: …; en:` with the space "
          f"going with the target (`space_with_target`; what decoding uses), rows up to {o.get('data.max_len')} tokens, loss against "
          f"`{o.get('loss.targets')}` at every target position (self-distillation: what "
          "verification accepts).",
          f"- The same overrides for every family (see the commands): K={o.get('head.k')}, "
          f"offsets {o.get('head.offsets')}, {o.get('optimizer.name')} lr "
          f"{o.get('optimizer.learning_rate')}, {o.get('optimizer.warmup_steps')} warm-up steps "
          f"then {o.get('optimizer.schedule')}, batch {o.get('training.global_batch_size')}, "
          f"{o.get('training.num_train_steps')} steps; LSTM with the trunk's frozen unembedding "
          "and teacher-forced step inputs; PoMa with zero-initialised position matrices and the "
          "trunk's final norm.",
          "", "```bash", distill_text, "```", "",
          "## Caveat: translation quality", "",
          "SmolLM2-135M is a weak translator (BLEU around 1 on newstest2014 0-shot): the BLEU "
          "and chrF columns show the mechanics (MTP's output is greedy's, so its scores are "
          "greedy's), not translation quality. Claims about quality need a real Llama 3 "
          "checkpoint (next section).", ""]

    L += ["## Llama 3.2 1B configs (GPU)", "",
          "The configs for Meta's Llama 3.2 1B (what each one follows is quoted from its "
          "docstring below); run them on a GPU: convert once, then train and evaluate each "
          "family:", "", "```bash",
          "python -m convert --format meta --input ~/llama/Llama3.2-1B \\",
          "    --output models/llama3.2-1b-norope --rope-scaling-factor 0"]
    configs = sorted(ROOT.glob("configs/*_llama3_2_1b_wmt14.py"))
    for path in configs:
        fam = path.stem.split("_")[0]
        trunk = _trunk_of(path)
        L += [f"python -m gptk_jax.train --config configs/{path.name} --workdir runs/llama1b/{fam}",
              f"python -m gptk_jax.evaluate --checkpoint {trunk} --heads runs/llama1b/{fam}/heads "
              f"\\\n    --split newstest2014 --batch-sizes 1,8 --output runs/llama1b/{fam}/eval"]
    L += ["```", ""]
    L += [f"- `configs/{p.name}`: {_config_docline(p)}" for p in configs]
    L += ["", "Multi-host training: docs/cluster.md.", ""]
    return "\n".join(L)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# docs/results.json: one entry per drafter, recipe and prompt format
# --------------------------------------------------------------------------------------------

def _json_entry(drafter: str, recipe: Optional[str], report: dict, run_of, **train) -> dict:
    """One results.json entry from an evaluation report; run_of(b) -> its run at batch b."""
    from gptk_jax.data.prompts import describe_prompt_record
    r1, r8 = run_of(1), run_of(8)
    some = r1 or r8 or {}
    fmt = report.get("prompt_format")
    return {"drafter": drafter, "recipe": recipe,
            "prompt_format": describe_prompt_record(fmt) if fmt else f"{report.get('shots')} shots",
            "split": (report.get("test_set") or {}).get("name", "newstest2014"),
            "sentences": report.get("num_sentences"), "k": some.get("k", report.get("k")),
            "tau_k4": some.get("tau"),
            "speedup_b1": (r1 or {}).get("speedup"), "speedup_b8": (r8 or {}).get("speedup"),
            "identical_to_greedy": all(r.get("identical_to_greedy", False)
                                       for r in (r1, r8) if r),
            "train_positions": train.get("train_positions"),
            "train_minutes": train.get("train_minutes")}


def results_json(families: list[dict], args: argparse.Namespace) -> dict:
    runs = []
    for f in families:
        rep, fam = f["report"], f["family"]
        recipe = f["heads_meta"].get("head_config", {}).get("recipe")
        train = {"train_positions": f["setup"].get("train_target_tokens"),
                 "train_minutes": round(f["train"]["wall_seconds"] / 60, 1)}
        runs.append(_json_entry(fam, recipe, rep, lambda b: _run(rep, f"mtp/b{b}"), **train))
        if _run(rep, "oracle/b1") or _run(rep, "oracle/b8"):
            runs.append(_json_entry("oracle", None, rep, lambda b: _run(rep, f"oracle/b{b}")))
    if args.lookup_family:
        run = ROOT / args.runs_dir / args.lookup_family
        base = next((f for f in families if f["family"] == args.lookup_family), None)
        for k in args.lookup_ks:
            path = run / f"eval_lookup_k{k}" / "report.json"
            if k != 4 or not path.is_file():
                continue
            rep = json.loads(path.read_text())
            runs.append(_json_entry("lookup", None, rep, lambda b: _run(rep, f"lookup/b{b}")))
            recipe = base and base["heads_meta"].get("head_config", {}).get("recipe")
            runs.append(_json_entry(f"{args.lookup_family}+lookup", recipe, rep,
                                    lambda b: _run(rep, f"heads+lookup/b{b}")))
    return {"generated_by": "python bench/results.py", "runs": runs}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/results.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted trunk folder")
    add_data_root_argument(p)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--runs-dir", default="runs/results")
    p.add_argument("--output", default="docs/results.md")
    p.add_argument("--pairs", type=int, default=10000,
                   help="distilled News Commentary lines (and at most this many training pairs)")
    p.add_argument("--shots", type=int, default=2,
                   help="few-shot pairs in every prompt: distillation, training and evaluation")
    p.add_argument("--targets", default="trunk_soft", choices=("trunk_argmax", "trunk_soft"),
                   help="training targets: the trunk's argmax or its whole distribution")
    p.add_argument("--offset-weight-decay", type=float, default=0.8,
                   help="loss weight decay**(o-1) of offset o")
    p.add_argument("--lstm-recipe", default="conditioned", choices=("conditioned", "default"),
                   help="the lstm family: conditioned on the trunk, or the context LSTM")
    p.add_argument("--distill-output", default=None,
                   help="distilled targets (default runs/distill/nc.first<PAIRS>.<SHOTS>shot."
                        "smollm2.en)")
    p.add_argument("--distill-batch-size", type=int, default=16)
    p.add_argument("--distill-k", type=int, default=4,
                   help="tokens per verify step of distillation's prompt-lookup drafts")
    p.add_argument("--distill-max-new-tokens", type=int, default=96)
    p.add_argument("--k", type=int, default=4, help="tokens per verify step")
    p.add_argument("--steps", type=int, default=200, help="training steps per family")
    p.add_argument("--batch-size", type=int, default=16, help="training global batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--max-len", type=int, default=384,
                   help="training row length in tokens (2-shot prompts: 256 drops half the rows)")
    p.add_argument("--eval-sentences", type=int, default=200,
                   help="newstest2013 sentences of the training evaluation")
    p.add_argument("--max-sentences", type=int, default=200, help="newstest2014 sentences decoded")
    p.add_argument("--batch-sizes", default="1,8", help="decoding batch sizes")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-vocab-size", type=int, default=4096,
                   help="heads draft over this many tokens of the distilled text (0: all)")
    p.add_argument("--oracle-family", default="linear",
                   help="the family whose evaluation also runs the oracle drafter ('' : none)")
    p.add_argument("--bf16-family", default="linear",
                   help="the family also evaluated with the trunk in bfloat16 ('' : none)")
    p.add_argument("--lookup-family", default="linear",
                   help="the family whose heads back prompt-lookup drafting ('' : no lookup runs)")
    p.add_argument("--lookup-ks", default="4,8", help="tokens per step of the lookup runs")
    p.add_argument("--report-only", action="store_true",
                   help="only write the markdown from the existing runs")
    args = p.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.lookup_ks = [int(k) for k in args.lookup_ks.split(",") if k]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown or not args.families:
        p.error(f"--families: unknown {unknown}; choose from {FAMILIES}")
    if args.distill_output is None:
        args.distill_output = f"runs/distill/nc.first{args.pairs}.{args.shots}shot.smollm2.en"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    invocation = " ".join(["python bench/results.py"] +
                          [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    runs_dir = ROOT / args.runs_dir
    try:
        if not args.report_only:
            step_trunk(args)
            step_distill(args)
            for family in args.families:
                step_train(args, family)
                step_eval(args, family)
            if args.bf16_family:
                step_bf16(args)
            if args.lookup_family:
                step_lookup(args)
        families = [load_family(runs_dir, fam) for fam in args.families]
        text = markdown(families, args, invocation)
        if args.lookup_family:
            text = text.rstrip("\n") + "\n\n" + "\n".join(lookup_section(args))
        if args.bf16_family:
            text = text.rstrip("\n") + "\n\n" + "\n".join(bf16_section(args))
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    summary = out.with_suffix(".json")
    summary.write_text(json.dumps(results_json(families, args), indent=1) + "\n")
    print(f"\nwrote {args.output} and {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
