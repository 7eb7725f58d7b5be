"""train_and_evaluate(config, workdir): MTP heads on a frozen trunk, end to end.

    settings  <- the ConfigDict, validated once, its paths made absolute (settings.py)
    trunk     <- converted folder / random-tiny (inputs.py); placed replicated or model-sharded
    pipelines <- WMT text -> prompts -> grain batches (gptk_jax.data), per-process rows
    state     <- fresh head params + optimizer state, or the latest checkpoint in WORKDIR
    loop: batch (+ cached trunk features) -> train_step -> metrics (sums) -> log / eval /
          checkpoint every N steps; SIGTERM saves and exits; a non-finite loss stops with an
          error naming its step
    end:  checkpoint, evaluation, WORKDIR/heads (heads_io format, for gptk_jax.evaluate)

Resume: the same command with the same WORKDIR continues from the latest checkpoint: head
params, optimizer state, step, rng and the data iterator's position are restored, so the steps
after it are the ones an uninterrupted run takes (same batches, same losses).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from gptk_jax.heads import make_head
from gptk_jax.heads.config import HeadConfigError
from gptk_jax.training import inputs
from gptk_jax.training.features import FeatureCache
from gptk_jax.training.metrics import MetricWriter, summarize_eval, summarize_train
from gptk_jax.training.optim import make_optimizer
from gptk_jax.training.settings import RunSettings, TrainingError
from gptk_jax.training.sharding import Parallel, ParallelError
from gptk_jax.training.state import Checkpointer
from gptk_jax.training.step import StepConfig, eval_step, init_train_state, train_step

HEADS_DIR = "heads"


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    path = Path(workdir).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"workdir {path} is not writable: {e}") from None
    return path


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


@dataclasses.dataclass
class _Run:
    """What the loop works with (built once by `_setup`)."""
    settings: RunSettings
    workdir: Path
    trunk: Any
    train_pipe: Any
    eval_pipe: Any
    parallel: Parallel
    step_cfg: StepConfig
    eval_cfg: Optional[StepConfig]
    num_steps: int
    tx: Any
    cache: Optional[FeatureCache]
    cache_seconds: float      # spent opening / building the feature cache
    log: Any


def _setup(config, workdir: Path, progress: bool) -> _Run:
    settings = RunSettings.from_config(config)
    is_main = jax.process_index() == 0
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    trunk = inputs.load_trunk(settings, workdir)
    try:
        make_head(settings.head, trunk.config)
    except HeadConfigError as e:
        raise TrainingError(f"config.head: {e}") from None
    fmt = inputs.prompt_format(settings.data)
    train_pipe, eval_pipe = inputs.build_pipelines(settings, trunk.tokenizer, fmt)
    try:
        parallel = Parallel(settings.parallel, settings.training.global_batch_size)
    except ParallelError as e:
        raise TrainingError(f"config.parallel / training.global_batch_size: {e}") from None
    loop = settings.training
    num_steps = loop.num_train_steps or max(
        1, int(loop.num_epochs * len(train_pipe.rows) // loop.global_batch_size))
    offsets, first_only = settings.head.offsets, settings.loss.first_target_tokens_only
    step_cfg = StepConfig(
        trunk_config=trunk.config, head_config=settings.head, targets=settings.loss.targets,
        offset_weights=settings.offset_weights, first_target_tokens_only=first_only,
        positions_per_row=settings.loss.positions_per_row or
        inputs.positions_per_row(train_pipe, offsets, first_only),
        argmax_chunk=settings.loss.argmax_chunk, position_chunk=settings.loss.position_chunk,
        pack_groups=parallel.pack_groups)
    eval_cfg = None
    if eval_pipe is not None:
        eval_cfg = dataclasses.replace(step_cfg, first_target_tokens_only=False,
                                       positions_per_row=inputs.positions_per_row(
                                           eval_pipe, offsets, False))
    log(f"trunk {trunk.path} ({trunk.config.n_layers} layers, dim {trunk.config.dim}, vocab "
        f"{trunk.config.vocab_size}); head {settings.head.kind} offsets {offsets}")
    log(f"train: {train_pipe.stats.summary()}")
    if eval_pipe is not None:
        log(f"eval: {eval_pipe.stats.summary()}")
    log(f"{num_steps} steps of {loop.global_batch_size} rows ({train_pipe.steps_per_epoch:.1f} "
        f"steps/epoch); {step_cfg.positions_per_row} supervised positions/row at most; "
        f"{parallel.describe()}")
    cache, cache_start = None, time.perf_counter()
    if settings.features.cache:
        root = Path(settings.features.cache_dir) if settings.features.cache_dir \
            else workdir / "feature_cache"
        cache = FeatureCache.open_or_build(
            root, trunk, train_pipe.rows, settings.head, settings.features.dtype,
            settings.features.build_batch_size, settings.loss.argmax_chunk, log=log,
            progress=progress and is_main)
    return _Run(settings=settings, workdir=workdir, trunk=trunk, train_pipe=train_pipe,
                eval_pipe=eval_pipe, parallel=parallel, step_cfg=step_cfg, eval_cfg=eval_cfg,
                num_steps=num_steps, tx=make_optimizer(settings.optimizer, num_steps),
                cache=cache, cache_seconds=time.perf_counter() - cache_start, log=log)


def _device_batch(run: _Run, batch: dict) -> dict:
    if run.cache is not None:
        batch = run.cache.attach(batch)
    batch = {k: v for k, v in batch.items() if k != "example_index"}
    return run.parallel.put_batch(batch)


def _evaluate(run: _Run, eval_fn, state, trunk_params) -> dict:
    totals = None
    for batch in run.eval_pipe.iterator():
        batch = {k: v for k, v in batch.items() if k != "example_index"}
        sums = run.parallel.fetch(eval_fn(state.head_params, trunk_params,
                                          run.parallel.put_batch(batch)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return summarize_eval(totals, run.settings.head.offsets)


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
    return (f"step {step}/{num_steps} | loss {summary['loss']:.4f} | {per_offset} | "
            f"{rate:.2f} steps/s {tokens / seconds if seconds > 0 else 0:.0f} tok/s | "
            f"ETA {eta_text}")


def _eval_line(step: int, summary: dict, offsets) -> str:
    parts = [f"o{o} top1 {100 * summary[f'top1_gold_o{o}']:.1f}%/{100 * summary[f'top1_trunk_o{o}']:.1f}%"
             for o in offsets]
    return (f"eval @ {step}: " + " ".join(parts) + f" (gold/trunk) | acceptance estimate "
            f"{summary['acceptance_trunk']:.3f} (trunk) {summary['acceptance_gold']:.3f} (gold)")


def _export_heads(run: _Run, state) -> Optional[Path]:
    """WORKDIR/heads in the heads_io format (what gptk_jax.evaluate --heads reads)."""
    params = run.parallel.head_params_host(state)
    if jax.process_index() != 0:
        return None
    out = run.workdir / HEADS_DIR
    meta = {"step": run.num_steps, "config": json.loads(json.dumps(
        dataclasses.asdict(run.settings), default=str))}
    args = (run.settings.head, params, run.trunk.config, run.trunk.name)
    if jax.process_count() == 1:
        from gptk_jax.heads.io import save_heads
        return save_heads(out, *args, metadata=meta, overwrite=True)
    staged = run.workdir / ".heads-export.pkl"      # written by a single-process helper
    staged.write_bytes(pickle.dumps((out, args, meta)))
    inputs.single_process("import pickle; from pathlib import Path; from gptk_jax.heads.io "
                          "import save_heads; out, args, meta = pickle.loads(Path("
                          f"{str(staged)!r}).read_bytes()); save_heads(out, *args, "
                          "metadata=meta, overwrite=True)")
    staged.unlink()
    return out


def train_and_evaluate(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Trains the heads of `config` (a ConfigDict, see configs/base.py) in `workdir`, resuming
    from its latest checkpoint; the config's relative paths are relative to the working directory
    at this call. Returns {"status", "step", "train", "eval", "heads"}."""
    workdir = prepare_workdir(workdir)
    run = _setup(config, workdir, progress)
    settings, parallel, loop = run.settings, run.parallel, run.settings.training
    offsets = settings.head.offsets
    is_main = jax.process_index() == 0

    fresh = init_train_state(run.step_cfg, run.tx, run.trunk.params, settings.seed)
    checkpoints = Checkpointer(workdir, loop.max_checkpoints_to_keep, jax.process_index())
    iterator = run.train_pipe.iterator()
    step = checkpoints.latest_step() or 0
    if step:
        restored, data_state = checkpoints.restore(parallel.abstract_state(fresh), step)
        iterator.set_state(data_state)
        state = parallel.put_state(restored)
        run.log(f"resumed from {workdir / 'checkpoints'} at step {step}")
    else:
        state = parallel.put_state(fresh)
    del fresh
    trunk_params = parallel.put_trunk(run.trunk.params)
    train_fn = parallel.compile_train(functools.partial(train_step, run.step_cfg, run.tx))
    eval_fn = None if run.eval_cfg is None else \
        parallel.compile_eval(functools.partial(eval_step, run.eval_cfg))
    writer = MetricWriter(workdir, enabled=is_main)
    writer.write(step, "setup", {"feature_cache": run.cache is not None,
                                 "feature_cache_seconds": run.cache_seconds,
                                 "num_steps": run.num_steps,
                                 "train_rows": len(run.train_pipe.rows)})
    result = {"status": "completed", "step": step, "train": None, "eval": None, "heads": None}

    def evaluate(at_step):
        if eval_fn is None:
            return
        summary = _evaluate(run, eval_fn, state, trunk_params)
        writer.write(at_step, "eval", summary)
        run.log(_eval_line(at_step, summary, offsets))
        result["eval"] = summary

    def save(at_step):
        if checkpoints.save(at_step, parallel.state_for_saving(state), iterator.get_state()):
            run.log(f"checkpoint {at_step} -> {workdir / 'checkpoints'}")

    pending, window = [], []
    window_start = epoch_start = time.perf_counter()
    rows = len(run.train_pipe.rows)

    def drain():
        for at_step, metrics in pending:
            host = parallel.fetch(metrics)
            _check_finite(at_step, host)
            window.append(host)
        pending.clear()

    try:
        if loop.eval_at_start and step == 0:
            evaluate(0)
        with PreemptionFlag() as preempted:
            while step < run.num_steps:
                batch = _device_batch(run, next(iterator))
                state, metrics = train_fn(state, trunk_params, batch)
                step += 1
                pending.append((step, metrics))
                if step % loop.log_every_steps == 0 or step == run.num_steps:
                    drain()
                    now = time.perf_counter()
                    summary = summarize_train(window, offsets)
                    tokens = float(sum(np.sum(m["tokens"]) for m in window))
                    summary["steps_per_second"] = len(window) / (now - window_start)
                    summary["tokens_per_second"] = tokens / (now - window_start)
                    writer.write(step, "train", summary)
                    run.log(_console(step, run.num_steps, summary, offsets, now - window_start,
                                     len(window), tokens))
                    result["train"] = summary
                    if summary["dropped_positions"]:
                        run.log(f"warning: {summary['dropped_positions']:.0f} supervised "
                                f"positions did not fit loss.positions_per_row="
                                f"{run.step_cfg.positions_per_row}; raise it (or leave it None)")
                    window, window_start = [], now
                if (step * loop.global_batch_size) // rows > \
                        ((step - 1) * loop.global_batch_size) // rows:
                    drain()  # steps run asynchronously: wait for this epoch's last one to finish
                    now = time.perf_counter()
                    epoch = (step * loop.global_batch_size) // rows
                    writer.write(step, "epoch", {"epoch": epoch, "seconds": now - epoch_start})
                    epoch_start = now
                if loop.eval_every_steps and step % loop.eval_every_steps == 0:
                    evaluate(step)
                if loop.checkpoint_every_steps and step % loop.checkpoint_every_steps == 0:
                    drain()
                    save(step)
                if preempted.is_set():
                    drain()
                    save(step)
                    checkpoints.wait()
                    run.log(f"SIGTERM: saved step {step}; rerun with the same --workdir to resume")
                    result.update(status="preempted", step=step)
                    return result
        drain()
        save(step)
        if result["eval"] is None or loop.eval_every_steps == 0 or \
                step % loop.eval_every_steps:
            evaluate(step)
        checkpoints.wait()
        result["heads"] = _export_heads(run, state)
        result["step"] = step
        if result["heads"] is not None:
            run.log(f"heads -> {result['heads']}")
        return result
    finally:
        checkpoints.close()
        writer.close()
