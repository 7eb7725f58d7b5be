"""docs/results.md and docs/results.json from finished runs: one row per drafter.

    entries = collect(runs_dir, families)        # what has finished; the rest is listed as missing
    text = markdown(entries, header)             # the table, with what is missing said so
    summary = results_json(entries)              # docs/results.json

A family's folder RUNS/<family>/ holds its training (metrics.jsonl, heads/heads.json, and
train.json with the command and wall time when `bench/results.py` ran it) and its evaluation
(eval/report.json from `python -m gptk_jax.evaluate --heads ... --lookup --oracle`, and any
evaluation run in pieces as eval-<name>/report.json: `_read_pieces`). Drafter
names: the family alone (`<family>`), in front of prompt lookup (`<family>+lookup`; evaluate's
`heads+lookup`), `lookup` alone and `oracle` (taken from the first family that ran them).
Every number is read from those files; a family whose evaluation has not finished is listed with
what is missing, so a table written while runs go on says it is partial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from gptk_jax.data.prompts import describe_prompt_record
from gptk_jax.evaluation.report import spread

# evaluate's run names -> drafter names in docs/results.json
METHOD_NAMES = {"mtp": "{family}", "heads+lookup": "{family}+lookup",
                "heads+lookup-tree": "{family}+lookup-tree", "lookup": "lookup",
                "oracle": "oracle"}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _training(run: Path) -> dict:
    """Training minutes and target positions of a family's run (None where not recorded)."""
    train = _read_json(run / "train.json") or {}
    setup = None
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if '"setup"' in line:
                record = json.loads(line)
                if record.get("split") == "setup":
                    setup = record
    heads = _read_json(run / "heads" / "heads.json") or {}
    return {"train_minutes": round(train["wall_seconds"] / 60, 1) if "wall_seconds" in train
            else None,
            "train_positions": (setup or {}).get("train_target_tokens"),
            "recipe": (heads.get("head_config") or {}).get("recipe"),
            "trained": bool(heads)}


def _read_pieces(run: Path) -> Optional[dict]:
    """A family's evaluation: eval/report.json, merged with any eval-*/report.json (pieces run
    separately, e.g. batch 1 and batch 8, or the lookup runs; names sorted). The first report
    read gives the header fields; per run key ('mtp/b1', ...) the most recently written piece
    holding it wins (a run measured again, e.g. after a decoder change, replaces the older
    measurement; report.json's modification time). A piece measured on other sentences or
    prompts than the first is left out and named in merged['skipped']. None when no piece has
    finished."""
    pieces = [run / "eval"] + sorted(p for p in run.glob("eval-*") if p.is_dir())
    reports = [(p, r) for p, r in ((p, _read_json(p / "report.json")) for p in pieces)
               if r is not None]
    if not reports:
        return None
    same = lambda r: (r.get("num_sentences"), r.get("shots"), r.get("prompt_format"),
                      (r.get("test_set") or {}).get("name", r.get("split")))
    merged = dict(reports[0][1], runs={}, skipped=[], pieces=[])
    for path, report in reports:
        if same(report) != same(reports[0][1]):
            merged["skipped"].append(f"{path.name}: other sentences or prompts than "
                                     f"{reports[0][0].name}")
            continue
        merged["pieces"].append({"folder": path.name, "command": report.get("command")})
    kept = [(p, r) for p, r in reports if same(r) == same(reports[0][1])]
    for path, report in sorted(kept, key=lambda pr: -(pr[0] / "report.json").stat().st_mtime_ns):
        for key, value in report.get("runs", {}).items():
            merged["runs"].setdefault(key, value)
    return merged


def collect(runs_dir: Path, families: Sequence[str]) -> dict:
    """{"entries": [...], "missing": [...]} from RUNS/<family>/eval/report.json files."""
    runs_dir = Path(runs_dir)
    entries, missing, seen, pieces = [], [], set(), {}
    for family in families:
        run = runs_dir / family
        training = _training(run)
        report = _read_pieces(run)
        if report is None:
            missing.append(f"{family}: " + (
                "evaluation not finished (no eval/ or eval-*/report.json)" if training["trained"]
                else "training not finished (no heads/heads.json)"))
            continue
        missing += [f"{family}: {note}" for note in report["skipped"]]
        pieces[family] = report["pieces"]
        for method, pattern in METHOD_NAMES.items():
            name = pattern.format(family=family)
            if name in seen:
                continue
            entry = _entry(name, method, report)
            if entry is None:
                continue
            if method in ("mtp", "heads+lookup"):
                entry.update(recipe=training["recipe"],
                             train_minutes=training["train_minutes"],
                             train_positions=training["train_positions"])
            entries.append(entry)
            seen.add(name)
    return {"entries": entries, "missing": missing, "pieces": pieces}


def _entry(drafter: str, method: str, report: dict) -> Optional[dict]:
    runs = report.get("runs", {})
    by_batch = {}
    for key, run in runs.items():
        parts = key.split("/")
        if parts[0] != method:
            continue
        batch = int(parts[1][1:])
        by_batch[(batch, "continuous" if len(parts) > 2 else "static")] = run
    if not by_batch:
        return None
    fmt = report.get("prompt_format")
    entry = {"drafter": drafter, "recipe": None, "shots": report.get("shots"),
             "prompt_format": describe_prompt_record(fmt) if fmt
             else f"{report.get('shots')} shots",
             "split": (report.get("test_set") or {}).get("name", report.get("split")),
             "sentences": report.get("num_sentences"), "k": None,
             "identical_to_greedy": all(r.get("identical_to_greedy", False)
                                        for r in by_batch.values()),
             "train_minutes": None, "train_positions": None, "runs": {}}
    for (batch, schedule), run in sorted(by_batch.items()):
        entry["k"] = entry["k"] or run.get("k")
        entry["runs"][f"b{batch}" + ("/continuous" if schedule == "continuous" else "")] = {
            key: run.get(key) for key in (
                "tau", "speedup", "tokens_per_second", "per_offset_acceptance",
                "tokens_per_step_mode", "chosen_w_histogram", "step_cost", "rested_batches",
                "greedy_step_cost", "skipped_drafting", "identical_to_greedy", "speedup_sd",
                "repeats")
            if run.get(key) is not None}
    static = {b: entry["runs"].get(f"b{b}", {}) for b in (1, 8)}
    entry.update(tau_k4=(static[1] or static[8]).get("tau"),
                 speedup_b1=static[1].get("speedup"), speedup_b8=static[8].get("speedup"),
                 speedup_b8_continuous=entry["runs"].get("b8/continuous", {}).get("speedup"))
    return entry


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _continuous_speedup(entry: dict) -> str:
    """b8 continuous: the speedup, with repeated runs their mean ± sd (n)."""
    return (_fmt(entry["speedup_b8_continuous"], ".2f", "×")
            + spread(entry["runs"].get("b8/continuous", {})))


def _widths(run: Optional[dict]) -> str:
    """'fixed' or the loop steps run at W = 1, 2, ... (auto W)."""
    if not run:
        return "–"
    histogram = run.get("chosen_w_histogram")
    return "fixed" if histogram is None else ":".join(str(n) for n in histogram[1:])


def _drafting_share(run: Optional[dict]) -> str:
    """The drafter's own cost per step, % of greedy's step: cost(W = 1) with drafting over
    greedy's step, from the calibration the run used (auto W; '–' where not recorded)."""
    greedy = (run or {}).get("greedy_step_cost")
    return "–" if not greedy else f"{(1 / greedy - 1) * 100:.0f} %"


def markdown(collected: dict, header: Sequence[str] = ()) -> str:
    """The results table (one row per drafter) and what is not there yet."""
    entries, missing = collected["entries"], collected["missing"]
    lines = list(header)
    if missing:
        lines += ["**Partial**: not every run has finished:", ""]
        lines += [f"- {m}" for m in missing] + [""]
    if not entries:
        return "\n".join(lines + ["No evaluation has finished yet.", ""])
    any_e = entries[0]
    lines += [f"newstest2014, first {any_e['sentences']} sentences, {any_e['shots']}-shot prompts, "
              f"W = {any_e['k']} tokens per verify step at most; speedups over our own greedy "
              "decoder in the same process (static batches) or over continuous greedy "
              "(continuous: since session 23 the mean of greedy's runs before and after the "
              "drafter's); τ = tokens per verify step, the bonus token included.", "",
              "| drafter | recipe | τ | speedup b1 | speedup b8 | speedup b8 continuous | "
              "per-offset acceptance (b1) | W chosen b1 / b8 (steps at W=1..) | "
              "drafting, % of a greedy step b1 / b8 | identical to greedy | "
              "train min / positions |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        acc = (e["runs"].get("b1") or e["runs"].get("b8") or {}).get("per_offset_acceptance")
        rates = ", ".join(_fmt(v) for v in acc.values()) if acc else "–"
        train = (f"{_fmt(e['train_minutes'], '.1f')} / {e['train_positions'] or '–'}"
                 if e["train_minutes"] or e["train_positions"] else "–")
        chosen = " / ".join(_widths(e["runs"].get(f"b{b}")) for b in (1, 8))
        drafting = " / ".join(_drafting_share(e["runs"].get(f"b{b}")) for b in (1, 8))
        lines.append(f"| {e['drafter']} | {e['recipe'] or '–'} | {_fmt(e['tau_k4'])} | "
                     f"{_fmt(e['speedup_b1'], '.2f', '×')} | {_fmt(e['speedup_b8'], '.2f', '×')}"
                     f" | {_continuous_speedup(e)} | {rates} | {chosen} | "
                     f"{drafting} | "
                     f"{'yes' if e['identical_to_greedy'] else '**no**'} | {train} |")
    return "\n".join(lines + [""])


def results_json(collected: dict, generated_by: str) -> dict:
    return {"generated_by": generated_by, "partial": bool(collected["missing"]),
            "missing": collected["missing"], "pieces": collected.get("pieces", {}),
            "runs": collected["entries"]}


def pieces_markdown(collected: dict) -> list[str]:
    """Lines naming each family's evaluation folders read, with the command each report
    records (reports written before evaluate recorded it say so)."""
    lines = []
    for family, pieces in collected.get("pieces", {}).items():
        for piece in pieces:
            command = (f"`{piece['command']}`" if piece["command"] else
                       "(command not recorded in this report)")
            lines.append(f"- {family}/{piece['folder']}: {command}")
    return lines
