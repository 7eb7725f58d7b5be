"""The training loop of one start: restore or init the state, step, log, evaluate, checkpoint.

    TrainingLoop(run)    state <- fresh head params + optimizer state, or the checkpoint the
                         start resumes from (head params, optimizer state, step, rng and the data
                         iterator's position), so the steps after it are those of an
                         uninterrupted run
    .run()               batch (+ cached trunk features) -> train_step -> metrics (sums) -> log /
                         eval / checkpoint every N steps; SIGTERM saves and returns 'preempted';
                         a non-finite loss stops with an error naming its step; at the end a
                         checkpoint and an evaluation
    .close()             waits for the checkpoint writes, closes the writers
"""

from __future__ import annotations

import functools
import math
import signal
import threading
import time

import jax
import numpy as np

from gptk_jax.training.metrics import MetricWriter, summarize_eval, summarize_train
from gptk_jax.training.settings import TrainingError
from gptk_jax.training.state import Checkpointer
from gptk_jax.training.step import eval_step, init_train_state, train_step


class PreemptionFlag:
    """Set by SIGTERM (the loop saves a checkpoint and exits); with several processes the flag
    is OR-ed over all of them each step so they stop at the same step."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def is_set(self) -> bool:
        flag = self._event.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag


def _device_batch(run, batch: dict) -> dict:
    if run.cache is not None:
        batch = run.cache.attach(batch)
    batch = {k: v for k, v in batch.items() if k != "example_index"}
    return run.parallel.put_batch(batch)


def _check_finite(step: int, metrics: dict) -> None:
    values = np.concatenate([np.ravel(metrics["objective"]), np.ravel(metrics["loss_sum"])])
    if not np.all(np.isfinite(values)):
        raise TrainingError(f"non-finite loss at step {step} (objective "
                            f"{float(np.ravel(metrics['objective'])[0])}, per-offset sums "
                            f"{np.ravel(metrics['loss_sum']).tolist()}); stopping without "
                            f"checkpointing it")


def _console(step: int, num_steps: int, summary: dict, offsets, seconds: float, steps: int,
             tokens: float) -> str:
    rate = steps / seconds if seconds > 0 else float("nan")
    eta = (num_steps - step) / rate if rate > 0 else float("nan")
    per_offset = " ".join(f"o{o} {summary[f'loss_o{o}']:.3f}/{100 * summary[f'top1_o{o}']:.1f}%"
                          for o in offsets)
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    oov = (f" | outside draft vocab {100 * summary['oov_fraction']:.1f}%"
           if "oov_fraction" in summary else "")
    return (f"step {step}/{num_steps} | loss {summary['loss']:.4f} | {per_offset}{oov} | "
            f"{rate:.2f} steps/s {tokens / seconds if seconds > 0 else 0:.0f} tok/s | "
            f"ETA {eta_text}")


def _eval_line(step: int, summary: dict, offsets, split: str = "eval") -> str:
    parts = [f"o{o} top1 {100 * summary[f'top1_gold_o{o}']:.1f}%/{100 * summary[f'top1_trunk_o{o}']:.1f}%"
             for o in offsets]
    drafts = [o for o in offsets if o >= 2]
    chain = "/".join(f"{100 * summary.get(f'chain_o{o}', float('nan')):.1f}" for o in drafts)
    return (f"{split} @ {step}: " + " ".join(parts) + f" (gold/trunk) | acceptance estimate "
            f"{summary['acceptance_trunk']:.3f} (trunk) {summary['acceptance_gold']:.3f} (gold)"
            f" | chain {chain}% tau_est {summary.get('tau_est', float('nan')):.3f}"
            f" tau_walked {summary.get('tau_walked', float('nan')):.3f}" +
            (f" | outside draft vocab {100 * summary['oov_fraction_trunk']:.1f}% (trunk)"
             if "oov_fraction_trunk" in summary else ""))


class TrainingLoop:
    """One start of a run (`run`: trainer._Run, its inputs loaded and checked)."""

    def __init__(self, run):
        self.run_, self.parallel = run, run.parallel
        self.loop, self.offsets = run.settings.training, run.settings.head.offsets
        self.checkpoints = Checkpointer(run.workdir, self.loop.max_checkpoints_to_keep,
                                        jax.process_index())
        try:
            self.step, self.state, self.iterator = self._initial_state()
            self.trunk_params = self.parallel.put_trunk(run.trunk.params)
            self.train_fn = self.parallel.compile_train(
                functools.partial(train_step, run.step_cfg, run.tx))
            self.eval_fn = None if run.eval_cfg is None else \
                self.parallel.compile_eval(functools.partial(eval_step, run.eval_cfg))
            self.writer = MetricWriter(run.workdir, enabled=jax.process_index() == 0,
                                       resume_step=run.start_step)
        except BaseException:
            self.checkpoints.close()
            raise
        self.first_step = self.step
        self.result = {"status": "completed", "step": self.step, "steps_run": 0, "train": None,
                       "eval": None, "eval_distilled": None, "heads": None}
        self.evaluated_at = None                  # the step of the last validation run here
        self.pending, self.window = [], []
        self.window_start = self.epoch_start = time.perf_counter()

    def _initial_state(self):
        run = self.run_
        fresh = init_train_state(run.step_cfg, run.tx, run.trunk.params, run.settings.seed)
        iterator = run.train_pipe.iterator()
        if not run.start_step:
            return 0, self.parallel.put_state(fresh), iterator
        restored, data_state = self.checkpoints.restore(self.parallel.abstract_state(fresh),
                                                        run.start_step)
        try:
            iterator.set_state(data_state)
        except ValueError as e:
            raise TrainingError(f"checkpoint step {run.start_step} in {run.workdir}: {e}") \
                from None
        run.log(f"resumed from {run.workdir / 'checkpoints'} at step {run.start_step}")
        return run.start_step, self.parallel.put_state(restored), iterator

    def evaluate(self, at_step: int) -> None:
        """Split 'eval' (reference text) and, with data.eval_target_file, 'eval_distilled'
        (the trunk's own translations of the same sources)."""
        self.evaluated_at = at_step
        if self.eval_fn is None:
            return
        run = self.run_
        for split, pipe in (("eval", run.eval_pipe), ("eval_distilled", run.distilled_pipe)):
            if pipe is None:
                continue
            cache, totals = run.eval_caches.get(split), None
            for batch in pipe.iterator():
                if cache is not None:
                    batch = cache.attach(batch)
                batch = {k: v for k, v in batch.items() if k != "example_index"}
                sums = self.parallel.fetch(self.eval_fn(
                    self.state.head_params, self.trunk_params, self.parallel.put_batch(batch)))
                totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
            summary = summarize_eval(totals, self.offsets)
            self.writer.write(at_step, split, summary)
            run.log(_eval_line(at_step, summary, self.offsets, split))
            self.result[split] = summary

    def save(self, at_step: int) -> None:
        if self.checkpoints.save(at_step, self.parallel.state_for_saving(self.state),
                                 self.iterator.get_state()):
            self.run_.log(f"checkpoint {at_step} -> {self.run_.workdir / 'checkpoints'}")

    def drain(self) -> None:
        """Waits for the pending steps (they run asynchronously) and checks their losses."""
        for at_step, metrics in self.pending:
            host = self.parallel.fetch(metrics)
            _check_finite(at_step, host)
            self.window.append(host)
        self.pending.clear()

    def _log_window(self) -> None:
        self.drain()
        now, run = time.perf_counter(), self.run_
        summary = summarize_train(self.window, self.offsets)
        tokens = float(sum(np.sum(m["tokens"]) for m in self.window))
        summary["steps_per_second"] = len(self.window) / (now - self.window_start)
        summary["tokens_per_second"] = tokens / (now - self.window_start)
        self.writer.write(self.step, "train", summary)
        run.log(_console(self.step, run.num_steps, summary, self.offsets,
                         now - self.window_start, len(self.window), tokens))
        self.result["train"] = summary
        if summary["dropped_positions"]:
            run.log(f"warning: {summary['dropped_positions']:.0f} supervised positions did not "
                    f"fit loss.positions_per_row={run.step_cfg.positions_per_row}; raise it (or "
                    f"leave it None)")
        self.window, self.window_start = [], now

    def _after_step(self) -> None:
        step, loop, rows = self.step, self.loop, len(self.run_.train_pipe.rows)
        if step % loop.log_every_steps == 0 or step == self.run_.num_steps:
            self._log_window()
        epoch = (step * loop.global_batch_size) // rows
        if epoch > ((step - 1) * loop.global_batch_size) // rows:
            self.drain()  # steps run asynchronously: wait for this epoch's last one to finish
            now = time.perf_counter()
            self.writer.write(step, "epoch", {"epoch": epoch, "seconds": now - self.epoch_start})
            self.epoch_start = now
        if loop.eval_every_steps and step % loop.eval_every_steps == 0:
            self.evaluate(step)
        if loop.checkpoint_every_steps and step % loop.checkpoint_every_steps == 0:
            self.drain()
            self.save(step)

    def run(self) -> dict:
        """Steps to num_steps (or to a SIGTERM); the result dict of train_and_evaluate."""
        run = self.run_
        self.writer.write(self.step, "setup", {
            "feature_cache": run.cache is not None, "feature_cache_seconds": run.cache_seconds,
            "num_steps": run.num_steps, "train_rows": len(run.train_pipe.rows),
            # target tokens of the rows: the positions whose next tokens the heads learn
            "train_target_tokens": int(sum(len(r.tokens) - r.prompt_len
                                           for r in run.train_pipe.rows))})
        if self.step >= run.num_steps:
            run.log(f"the checkpoint is at step {self.step}, the config asks for "
                    f"{run.num_steps} steps: no step was run")
        if self.loop.eval_at_start and self.step == 0:
            self.evaluate(0)
        with PreemptionFlag() as preempted:
            while self.step < run.num_steps:
                batch = _device_batch(run, next(self.iterator))
                self.state, metrics = self.train_fn(self.state, self.trunk_params, batch)
                self.step += 1
                self.pending.append((self.step, metrics))
                self._after_step()
                if preempted.is_set():
                    self.drain()
                    self.save(self.step)
                    self.checkpoints.wait()
                    run.log(f"SIGTERM: saved step {self.step}; rerun with the same --workdir to "
                            f"resume")
                    self.result.update(status="preempted", step=self.step)
                    return self._finished()
        self.drain()
        self.save(self.step)
        if self.evaluated_at != self.step:      # the last step's validation, once
            self.evaluate(self.step)
        self.checkpoints.wait()
        return self._finished()

    def _finished(self) -> dict:
        self.result.update(step=self.step, steps_run=self.step - self.first_step)
        return self.result

    def close(self) -> None:
        self.checkpoints.close()
        self.writer.close()
