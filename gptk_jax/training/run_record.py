"""WORKDIR/run.json: which run a workdir holds, so that a rerun resumes only that run.

    {"format": 1,
     "settings": {...},            # RunSettings as dataclass dicts, as the run first started
     "inputs": {"trunk": {"config": {...}, "conversion_sha256": "..."},
                "train_rows": {"count": 53, "sha256": "..."}},   # what the settings read
     "recorded_from_step": 0,      # > 0: the checkpoints predate the record (an older version)
     "distilled_targets": [{"file": "/abs/d.en", "lines_written": 14, "sources": 40,
                            "complete": false}],   # the target files from gptk_jax.distill
     "resumes": [{"step": 6, "changed": {"optimizer.learning_rate": {"old": 0.003,
                                                                     "new": 1.0}}}]}

The settings of steps (s, next resume] are "settings" with the "new" values of every resume at
or before s applied. Process 0 writes the record atomically once a start has loaded and checked
its inputs (a start that fails before that leaves none). A rerun compares its settings, flattened
to dotted keys (`head.kind`), with those the record gives for the checkpoint it resumes from:

    RECIPE        optimizer, step count, loss targets / weights / positions, feature dtype: a
                  change needs training.allow_changed_resume=True and is then recorded
    BOOKKEEPING   logging / eval / checkpoint cadence, evaluation set, layout, cache, chunks:
                  accepted and recorded
    anything else the trunk (path, dtype, fingerprint), head, training data (paths, prompt
                  format, filters, rows), seed, batch size, and any key not classified here: a
                  change is refused, naming the keys with their old and new values

With no checkpoint there is nothing to resume: the start begins afresh and replaces the record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

from gptk_jax.files import atomic_write_text
from gptk_jax.training.settings import RunSettings, TrainingError

RECORD_FILE = "run.json"
FORMAT = 1
ALLOW_FLAG = "training.allow_changed_resume"
# a key listed here, or under a listed "prefix.", belongs to that class
RECIPE = ("optimizer.", "training.num_train_steps", "training.num_epochs", "loss.targets",
          "loss.offset_weights", "loss.offset_weight_decay", "loss.first_target_tokens_only",
          "loss.positions_per_row", "loss.draft_vocab_size", "features.dtype")
BOOKKEEPING = ("training.log_every_steps", "training.eval_every_steps", "training.eval_at_start",
               "training.checkpoint_every_steps", "training.max_checkpoints_to_keep",
               "data.eval_prefix", "data.eval_max_sentences", "data.eval_line_range",
               "data.eval_target_file", "data.eval_reference", "loss.argmax_chunk",
               "loss.position_chunk", "parallel.", "features.cache", "features.cache_dir",
               "features.build_batch_size")
NOT_COMPARED = (ALLOW_FLAG,)   # about this start, not about the run


class ResumeRefused(TrainingError):
    """A rerun of a workdir with settings its run cannot continue under."""


def _in(key: str, classes: tuple) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in classes)


def _json(value: Any) -> Any:
    """Tuples -> lists, paths -> str: the value as run.json stores it."""
    return json.loads(json.dumps(value, default=str))


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_dict(settings: RunSettings) -> dict:
    return _json(dataclasses.asdict(settings))


def input_fingerprints(trunk_config, trunk_path: Path, rows) -> dict:
    """What the settings resolved to: the trunk's architecture and conversion record, and the
    tokenized training rows (their tokens, prompt lengths and pair indices, in order)."""
    conversion = Path(trunk_path) / "conversion.json"
    h = hashlib.sha256()
    for row in rows:
        h.update(row.tokens.tobytes())
        h.update(int(row.prompt_len).to_bytes(4, "little"))
        h.update(int(row.index).to_bytes(8, "little"))
    return _json({"trunk": {"config": trunk_config.to_dict(), "conversion_sha256":
                            hashlib.sha256(conversion.read_bytes()).hexdigest()
                            if conversion.is_file() else None},
                  "train_rows": {"count": len(rows), "sha256": h.hexdigest()}})


def distilled_targets(settings: RunSettings) -> list:
    """The training / validation target files that are distillations, with how complete each
    is (distillation/record.py `distillation_status`: an incomplete one is warned about)."""
    from gptk_jax.distillation.record import DistillError, distillation_status

    data = settings.data
    out = []
    for file in tuple(data.train_target_files or ()) + \
            ((data.eval_target_file,) if data.eval_target_file else ()):
        try:
            status = distillation_status(Path(file))
        except DistillError:     # an unreadable record: refused where the targets are read
            status = None
        if status is not None:
            out.append(status)
    return out


def _describe(changes: dict) -> str:
    return "; ".join(f"{key} {json.dumps(c['old'])} -> {json.dumps(c['new'])}"
                     for key, c in sorted(changes.items()))


def _diff(old: dict, new: dict) -> dict:
    keys = [k for k in sorted(set(old) | set(new)) if not _in(k, NOT_COMPARED)]
    return {k: {"old": old.get(k), "new": new.get(k)} for k in keys if old.get(k) != new.get(k)}


class RunRecord:
    """WORKDIR/run.json, read once per start; `check_*` compare, `commit` writes."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / RECORD_FILE
        self.data: Optional[dict] = None
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
                why = None if isinstance(self.data, dict) and self.data.get("format") == FORMAT \
                    and {"settings", "resumes"} <= set(self.data) else f"not format {FORMAT}"
            except json.JSONDecodeError as e:
                why = str(e)
            if why:
                raise TrainingError(f"{self.path} is not a run record ({why}); it says which "
                                    f"run this workdir holds: restore it, or train in a new "
                                    f"--workdir")

    def settings_at(self, step: int) -> dict:
        """The flattened settings the checkpoint of `step` continues under."""
        flat = flatten(self.data["settings"])
        for resume in self.data["resumes"]:
            if resume["step"] <= step:
                flat.update({k: c["new"] for k, c in resume["changed"].items()})
        return flat

    def check_settings(self, settings: RunSettings, step: Optional[int]) -> dict:
        """The changes of resuming checkpoint `step` (None: none) with `settings`; raises
        ResumeRefused for a change of the run's identity, or of its recipe without the flag."""
        if step is None or self.data is None:
            return {}
        changes = _diff(self.settings_at(step), flatten(settings_dict(settings)))
        fixed = {k: c for k, c in changes.items() if not _in(k, RECIPE + BOOKKEEPING)}
        if fixed:
            self._refuse(fixed, step)
        recipe = {k: c for k, c in changes.items() if _in(k, RECIPE)}
        if recipe and not settings.training.allow_changed_resume:
            raise ResumeRefused(
                f"cannot resume {self.workdir} at step {step} with changed settings: "
                f"{_describe(recipe)}. Pass --config.{ALLOW_FLAG}=True to resume with them (the "
                f"change is recorded in {RECORD_FILE} and heads.json), or rerun with the "
                f"recorded values")
        return changes

    def check_inputs(self, inputs: dict, step: Optional[int]) -> None:
        """Refuses resuming with another trunk (same path, other weights) or other rows."""
        if step is None or self.data is None or "inputs" not in self.data:
            return
        changes = _diff(flatten(self.data["inputs"], "inputs."), flatten(inputs, "inputs."))
        if changes:
            self._refuse(changes, step)

    def _refuse(self, changes: dict, step: int):
        raise ResumeRefused(
            f"cannot resume {self.workdir} at step {step}: its run ({RECORD_FILE}) has other "
            f"settings: {_describe(changes)}. The model, head and training data of a run do not "
            f"change: train these settings in a new --workdir (or delete this one)")

    def commit(self, settings: RunSettings, inputs: dict, step: Optional[int], changes: dict,
               write: bool, log: Callable[[str], None]) -> dict:
        """The record of this start (resumes after `step` dropped: their steps are replayed;
        `changes` merged into one at `step`), written atomically when `write`."""
        if step is None or self.data is None:
            if step is not None:
                log(f"{self.path} missing: the checkpoints predate run records; recording this "
                    f"start's settings from step {step} on (earlier changes cannot be checked)")
            elif self.data is not None:
                log(f"no checkpoint in {self.workdir}: starting afresh ({RECORD_FILE} replaced)")
            record = {"format": FORMAT, "settings": settings_dict(settings), "inputs": inputs,
                      "recorded_from_step": step or 0, "resumes": [],
                      "distilled_targets": distilled_targets(settings)}
        else:
            record = dict(self.data, resumes=_merged(self.data["resumes"], step, changes))
            if changes:
                log(f"resuming at step {step} with changed settings, recorded in "
                    f"{RECORD_FILE}: {_describe(changes)}")
        if write and record != self.data:
            atomic_write_text(self.path, json.dumps(record, indent=2))
        self.data = record
        return record


def _merged(resumes: list, step: int, changes: dict) -> list:
    """`resumes` up to `step`, with `changes` (relative to the settings at `step`) folded into
    an entry at `step`; a key changed back to its value before that entry drops out."""
    kept = [r for r in resumes if r["step"] < step]
    at_step = {k: dict(c) for r in resumes if r["step"] == step for k, c in r["changed"].items()}
    for key, change in changes.items():
        old = at_step[key]["old"] if key in at_step else change["old"]
        at_step[key] = {"old": old, "new": change["new"]}
    at_step = {k: c for k, c in at_step.items() if c["old"] != c["new"]}
    return kept + ([{"step": step, "changed": at_step}] if at_step else [])
