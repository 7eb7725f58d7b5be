"""`make results`: train every drafter family, evaluate it on newstest2014, write docs/results.md
and docs/results.json. The protocol lives in configs/results_smollm2.py (training) and in the
evaluation flags below (what is measured); this script only runs them in order.

    python bench/results.py [--families linear,lstm,poma,eagle] [--runs-dir runs/results]
        [--max-sentences 200] [--batch-sizes 1,8] [--tokens-per-step 4] [--no-choose-width]
        [--report-only]

Per family, each step skipped when its output is there (training resumes from its checkpoint,
evaluation reuses its finished runs), so a rerun after a stop continues:
  1. python -m gptk_jax.train --config configs/results_smollm2.py:<family> --workdir RUNS/<family>
  2. per batch size B: python -m gptk_jax.evaluate --heads RUNS/<family>/heads ...
     --batch-sizes B --lookup --tree [--oracle] --continuous --interleave
     --output RUNS/<family>/eval-bB   (the oracle with the first family only; a piece each,
     so a stop loses at most the piece in progress, and evaluate reuses its finished runs)
After every step docs/results.md / .json are rewritten from what has finished
(gptk_jax.evaluation.results_table), marked partial while anything is missing, so work that
stops leaves a table. Exit status: 0 all done, 1 a step failed (its log is named), 2 bad flags
or a project error, e.g. a file that cannot be read or written (one line on stderr, "error: ...").
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))          # run as `python bench/results.py` from the checkout

from gptk_jax.data.root import DATA_ROOT_ENV, DEFAULT_DATA_ROOT, resolve_data_root  # noqa: E402
from gptk_jax.errors import CLI_ERRORS, GptkError  # noqa: E402
from gptk_jax.evaluation.results_table import (collect, markdown, pieces_markdown,  # noqa: E402
                                               results_json)

FAMILIES = ("linear", "lstm", "poma", "eagle")
CONFIG = "configs/results_smollm2.py"
DEFAULT_CHECKPOINT = ".cache/models/smollm2-135m"
DISTILLED = "distilled/newstest2013.2shot.smollm2.en"   # the draft vocabulary's text


class StepFailed(GptkError):
    """A train or evaluate step exited non-zero (its command and log named): exit status 1."""


def train_command(args, family: str) -> list[str]:
    return [sys.executable, "-m", "gptk_jax.train", "--config", f"{CONFIG}:{family}",
            "--workdir", str(Path(args.runs_dir) / family), "--noprogress"]


def eval_command(args, family: str, first: bool, batch: int) -> list[str]:
    """One piece of a family's evaluation: every method at one batch size, into
    RUNS/<family>/eval-b<batch> (the results table merges the pieces)."""
    run = Path(args.runs_dir) / family
    cmd = [sys.executable, "-m", "gptk_jax.evaluate", "--checkpoint", args.checkpoint,
           "--heads", str(run / "heads"), "--split", "newstest2014",
           "--max-sentences", str(args.max_sentences), "--batch-sizes", str(batch),
           "--max-new-tokens", str(args.max_new_tokens), "--shots", "2", "--space-with-target",
           "--lookup", "--tree", "--continuous", "--output", str(run / f"eval-b{batch}"),
           "--no-progress"]
    if args.interleave:
        cmd.append("--interleave")
    if args.tokens_per_step:
        cmd += ["--tokens-per-step", args.tokens_per_step]
    if args.choose_width:
        cmd.append("--choose-width")
    if args.draft_vocab_size:     # default: the heads' own (loss.draft_vocab_size)
        cmd += ["--draft-vocab-size", str(args.draft_vocab_size), "--draft-vocab-from",
                str(Path(args.data_root) / DISTILLED)]
    if first:
        cmd.append("--oracle")
    return cmd


def evaluated(run: Path, batch: int) -> bool:
    """The piece at this batch size has finished (or the family's one-piece eval/ of before)."""
    return any((run / name / "report.json").is_file() for name in ("eval", f"eval-b{batch}"))


def shown(cmd: Sequence[str]) -> str:
    return " ".join(["python"] + [shlex.quote(c) for c in cmd[1:]])


def run_step(cmd: list[str], log: Path, record: Path) -> None:
    """Runs cmd (output to log) and appends its invocation (command, seconds, exit) to record."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shown(cmd)}  (log: {log})", flush=True)
    start = time.time()
    with log.open("a") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    previous = json.loads(record.read_text()) if record.is_file() else {"invocations": []}
    previous["command"] = shown(cmd)
    previous["invocations"].append({"seconds": round(seconds, 1), "exit": code,
                                    "finished": datetime.datetime.now().isoformat(timespec="minutes")})
    previous["wall_seconds"] = sum(i["seconds"] for i in previous["invocations"])
    record.write_text(json.dumps(previous, indent=2))
    if code != 0:
        raise StepFailed(f"exit {code}: {shown(cmd)} (see {log})")


def write_tables(args, invocation: str) -> bool:
    collected = collect(Path(args.runs_dir), args.families)
    header = ["# Results: drafters on SmolLM2-135M, WMT14 de→en (CPU)", "",
              f"Generated {datetime.datetime.now().isoformat(timespec='minutes')} by `{invocation}` from "
              f"`{args.runs_dir}/` (every number read from the runs' JSON files). Training "
              f"protocol: `{CONFIG}`; the protocol's evaluation commands (one piece per family "
              f"and batch size):", "", "```bash"]
    header += [shown(eval_command(args, f, i == 0, b)) for i, f in enumerate(args.families)
               for b in args.batch_sizes]
    header += ["```", ""]
    read = pieces_markdown(collected)
    if read:
        header += ["Evaluations read (the numbers below come from these runs):", ""] + read + [""]
    header += ["SmolLM2-135M translates German badly (BLEU about 1): the drafters "
               "learn its own output, which is what verification accepts.", ""]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(collected, header)
    notes = Path(args.notes) if args.notes else None
    if notes is not None and notes.is_file():     # what was run, by hand: kept on every rewrite
        text = text.rstrip("\n") + "\n\n" + notes.read_text().strip() + "\n"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        results_json(collected, invocation), indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}"
          + (" (partial)" if collected["missing"] else ""), flush=True)
    return not collected["missing"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/results.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="converted trunk folder")
    p.add_argument("--data-root", default=None,
                   help=f"folder holding distilled/; default: ${DATA_ROOT_ENV}, else "
                        f"{DEFAULT_DATA_ROOT} from the working directory")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--runs-dir", default="runs/results")
    p.add_argument("--output", default="docs/results.md")
    p.add_argument("--max-sentences", type=int, default=200, help="newstest2014 sentences")
    p.add_argument("--batch-sizes", default="1,8",
                   help="one evaluation piece per batch size (RUNS/<family>/eval-b<B>)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="static runs batch by batch: greedy's batch, then each drafter's on "
                        "the same prompts (a machine whose speed drifts slows all alike)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tokens-per-step", "--k", default=None,
                   help="W of the evaluation (default: the heads' own)")
    p.add_argument("--choose-width", action=argparse.BooleanOptionalAction, default=True,
                   help="drafters choose W per step by measured cost (--no-choose-width: "
                        "fixed W)")
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="heads draft over this many tokens of the distilled text (default: "
                        "the heads' own draft vocabulary, trained with loss.draft_vocab_size)")
    p.add_argument("--notes", default="docs/results_notes.md",
                   help="markdown appended to the table on every rewrite (what was run, "
                        "exactly; '' for none)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the tables")
    args = p.parse_args(argv)
    args.data_root = str(resolve_data_root(args.data_root))
    args.families = [f for f in args.families.split(",") if f]
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        p.error(f"--batch-sizes: comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes: at least one, each >= 1, got {args.batch_sizes}")
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown or not args.families:
        p.error(f"--families: unknown {unknown}; choose from {FAMILIES}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    invocation = " ".join(["python bench/results.py"] + [
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    failed = None
    try:
        try:
            for i, family in enumerate([] if args.report_only else args.families):
                run = Path(args.runs_dir) / family
                if not (run / "heads" / "heads.json").is_file():
                    run_step(train_command(args, family), run / "train.log", run / "train.json")
                for batch in args.batch_sizes:
                    if not evaluated(run, batch):
                        run_step(eval_command(args, family, i == 0, batch),
                                 run / f"eval-b{batch}.log", run / f"eval-b{batch}.json")
                        write_tables(args, invocation)
        except StepFailed as e:         # the tables still show what finished before it
            failed = e
        write_tables(args, invocation)
    except CLI_ERRORS as e:             # the project's errors and OSError: one line, exit 2
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    if failed is not None:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
