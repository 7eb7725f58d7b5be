"""Host-side metrics: sums and counts from the steps -> per-offset means, the acceptance
estimate, and the writers (TensorBoard event files + JSON lines in the workdir).

    WORKDIR/metrics.jsonl   one JSON object per line: {"step", "split": "train"|"eval"|..., ...},
                            at most one per (step, split): a run resumed from step s first drops
                            the rows after s (the steps it replays) and replaces a row of step s
                            it writes again
    WORKDIR/tensorboard/    tensorboardX event files, scalars named "<split>/<metric>"

Names: `loss_o2` = mean cross-entropy of offset 2; eval adds `_gold` (against the reference
tokens) or `_trunk` (against the trunk's own argmax, what verification compares drafts with),
`top1_*` / `top5_*` accuracies and `acceptance_trunk` / `acceptance_gold` (per-offset accuracies
multiplied as if independent), and at the positions where decoding drafts
(training/draft_metrics.py) `accept_o{o}`, `chain_o{o}` and `tau_est` = 1 + sum of the chains.
Split "eval" scores the reference text; "eval_distilled" the same sources with the trunk's own
translations as targets (data.eval_target_file), where `tau_est` is the figure that predicts
decoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gptk_jax.training.draft_metrics import DRAFT_KEYS, summarize_drafts


def acceptance_estimate(accuracies: Sequence[float]) -> float:
    """Expected tokens per verify step, 1 + sum_k prod_{i<=k} acc_i, from the top-1 accuracies
    of the draft offsets 2..W in order: the trunk's own token always counts, and draft k is
    accepted only when it and every earlier draft match (the accuracies taken as independent)."""
    total, run = 1.0, 1.0
    for acc in accuracies:
        run *= float(acc)
        total += run
    return total


def _ratio(num, den) -> float:
    return float(num) / float(den) if float(den) > 0 else float("nan")


def summarize_train(window: Sequence[dict], offsets: Sequence[int]) -> dict:
    """Metrics of the steps since the last log (each a dict of numpy sums) -> means."""
    total = {k: np.sum([m[k] for m in window], axis=0) for k in window[0]}
    out = {"loss": float(np.mean([m["objective"] for m in window])),
           "grad_norm": float(np.mean([m["grad_norm"] for m in window]))}
    oov = total.get("oov", np.zeros_like(total["count"]))  # targets outside the draft vocab
    for j, o in enumerate(offsets):
        # the loss covers the targets inside the draft vocabulary; top-1 every target (a
        # target outside it is a miss)
        out[f"loss_o{o}"] = _ratio(total["loss_sum"][j], total["count"][j] - oov[j])
        out[f"top1_o{o}"] = _ratio(total["top1"][j], total["count"][j])
        if "oov" in total:
            out[f"oov_o{o}"] = _ratio(oov[j], total["count"][j])
    if "oov" in total:
        out["oov_fraction"] = _ratio(np.sum(oov), np.sum(total["count"]))
    out["tokens"] = float(total["tokens"])            # real tokens (identifies the batches)
    out["supervised_positions"] = float(np.sum(total["count"]))
    out["dropped_positions"] = float(total["dropped_positions"])
    return out


def summarize_eval(total: dict, offsets: Sequence[int]) -> dict:
    """Summed eval metrics ([J] arrays) -> per-offset means and the acceptance estimates."""
    out = {"positions": float(np.sum(total["count"]))}
    for j, o in enumerate(offsets):
        count = total["count"][j]
        for key, value in total.items():
            if key != "count" and key not in DRAFT_KEYS:
                # with a draft vocabulary the loss covers the targets inside it only
                oov = total.get("oov_" + key[len("loss_"):]) if key.startswith("loss_") else None
                out[f"{key}_o{o}"] = _ratio(value[j], count - (0 if oov is None else oov[j]))
    if "oov_trunk" in total:     # fraction of targets outside the draft vocabulary
        for name in ("trunk", "gold"):
            out[f"oov_fraction_{name}"] = _ratio(np.sum(total[f"oov_{name}"]),
                                                 np.sum(total["count"]))
    drafts = [o for o in offsets if o >= 2]
    for name in ("trunk", "gold"):
        out[f"acceptance_{name}"] = acceptance_estimate([out[f"top1_{name}_o{o}"]
                                                         for o in drafts])
    if "draft_count" in total:      # at the positions decoding drafts: accept / chain / tau_est
        out.update(summarize_drafts(total, offsets))
    return out


def _rewrite(path: Path, records: list[dict]) -> None:
    """`path` replaced, atomically, by these records (one JSON line each)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _records(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a kill is left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricWriter:
    """JSON lines + TensorBoard; a no-op on processes other than 0.

    `resume_step`: the step this start resumes from; the rows after it, written by a start
    whose steps are being replayed, are dropped first, and a row of that step written again
    replaces the old one. None: a start from scratch, the file starts over."""

    def __init__(self, workdir: Path, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._resume_step = resume_step
        self._at_resume_step: set = set()    # splits with a row at resume_step in the file
        if not enabled:
            return
        if self.path.is_file():
            kept = [] if resume_step is None else \
                [r for r in _records(self.path) if r.get("step", 0) <= resume_step]
            _rewrite(self.path, kept)
            self._at_resume_step = {r.get("split") for r in kept if r.get("step") == resume_step}
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        if step == self._resume_step and split in self._at_resume_step:
            _rewrite(self.path, [r for r in _records(self.path)
                                 if (r.get("step"), r.get("split")) != (step, split)])
            self._at_resume_step.discard(split)
        record = {"step": int(step), "split": split, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path, split: Optional[str] = None) -> list[dict]:
    """The records of a metrics.jsonl (a restarted run re-logs the steps after its checkpoint:
    later records of a step replace earlier ones)."""
    by_key = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if split is None or record.get("split") == split:
            by_key[(record.get("split"), record.get("step"))] = record
    return sorted(by_key.values(), key=lambda r: (r["step"], str(r.get("split"))))
