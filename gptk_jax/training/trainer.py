"""train_and_evaluate(config, workdir): MTP heads on a frozen trunk, end to end.

    settings  <- the ConfigDict, validated once, its paths made absolute (settings.py)
    record    <- WORKDIR/run.json: a rerun that changes what the run is (trunk, head, data) is
                 refused before anything is loaded; a changed optimizer / step count needs
                 training.allow_changed_resume and is recorded (run_record.py)
    trunk     <- converted folder / random-tiny (inputs.py); placed replicated or model-sharded
    pipelines <- WMT text -> prompts -> grain batches (gptk_jax.data), per-process rows; their
                 fingerprints (trunk, training rows) checked against the record, then it is
                 written and the feature cache opened or built (each process its share)
    loop      <- loop.TrainingLoop: fresh or restored state, steps, metrics, eval, checkpoints
    end:      WORKDIR/heads (heads_io format, for gptk_jax.evaluate), its metadata saying what
              was run: the real step, the steps this start ran, the settings and their changes

Resume: the same command with the same WORKDIR continues from the latest checkpoint with the
same losses as an uninterrupted run; metrics.jsonl keeps one row per step and split. One run per
WORKDIR: process 0 holds WORKDIR/train.lock (gptk_jax/locks.py) for the run; a second one is
refused naming the first's PID and start time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any, Optional

import jax

from gptk_jax.data.prompts import prompt_record
from gptk_jax.heads import make_head
from gptk_jax.heads.config import HeadConfigError
from gptk_jax.training import inputs
from gptk_jax.features.shares import CacheError
from gptk_jax.features.cache import FeatureCache
from gptk_jax.training.loop import TrainingLoop
from gptk_jax.training.optim import make_optimizer
from gptk_jax.training.run_record import RunRecord, input_fingerprints
from gptk_jax.training.settings import RunSettings, TrainingError
from gptk_jax.training.sharding import Parallel, ParallelError
from gptk_jax.training.state import latest_checkpoint_step
from gptk_jax.training.step import StepConfig

HEADS_DIR = "heads"
LOCK_FILE = "train.lock"      # held by the run writing the workdir (gptk_jax/locks.py)


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    path = Path(workdir).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        from gptk_jax.files import os_error_reason
        raise TrainingError(f"workdir {path} is not writable: "
                            f"{os_error_reason(e, path, folder=True)}") from None
    return path


@dataclasses.dataclass
class _Run:
    """What the loop works with (built once by `_start`)."""
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
    log: Any
    start_step: Optional[int]  # the checkpoint this start resumes from; None: from scratch
    record: Optional[dict] = None  # WORKDIR/run.json as this start wrote it
    cache: Optional[FeatureCache] = None
    cache_seconds: float = 0.0  # spent opening / building the feature cache
    distilled_pipe: Any = None  # validation rows with the trunk's own translations (or None)
    eval_caches: dict = dataclasses.field(default_factory=dict)  # split -> FeatureCache
    prompt_format: Optional[dict] = None  # prompt_record of the rows (heads.json records it)
    draft_vocab: Optional[dict] = None  # loss.draft_vocab_size: {"ids", "size", "sha256",
                                        # "source"} (exported with the heads)


def _load(settings: RunSettings, workdir: Path, start_step: Optional[int], log) -> _Run:
    """The trunk, the pipelines and the step functions' configs (nothing written but the
    random-tiny trunk, once)."""
    trunk = inputs.load_trunk(settings, workdir)
    try:
        make_head(settings.head, trunk.config)
    except HeadConfigError as e:
        raise TrainingError(f"config.head: {e}") from None
    fmt = inputs.prompt_format(settings.data)
    prompt = prompt_record(fmt, trunk.tokenizer)
    inputs.warn_distilled_format(settings.data, prompt, log)
    train_pipe, eval_pipe = inputs.build_pipelines(settings, trunk.tokenizer, fmt)
    distilled_pipe = inputs.build_distilled_eval(settings, trunk.tokenizer, fmt)
    try:
        parallel = Parallel(settings.parallel, settings.training.global_batch_size)
    except ParallelError as e:
        raise TrainingError(f"config.parallel / training.global_batch_size: {e}") from None
    loop = settings.training
    num_steps = loop.num_train_steps or max(
        1, int(loop.num_epochs * len(train_pipe.rows) // loop.global_batch_size))
    offsets, first_only = settings.head.offsets, settings.loss.first_target_tokens_only
    draft_vocab = _draft_vocab(settings, train_pipe, trunk, log)
    step_cfg = StepConfig(
        trunk_config=trunk.config, head_config=settings.head, targets=settings.loss.targets,
        offset_weights=settings.offset_weights, first_target_tokens_only=first_only,
        positions_per_row=settings.loss.positions_per_row or
        inputs.positions_per_row(train_pipe, offsets, first_only),
        argmax_chunk=settings.loss.argmax_chunk, position_chunk=settings.loss.position_chunk,
        pack_groups=parallel.pack_groups,
        draft_vocab=tuple(draft_vocab["ids"]) if draft_vocab else ())
    eval_cfg = None
    eval_pipes = [p for p in (eval_pipe, distilled_pipe) if p is not None]
    if eval_pipes:
        eval_cfg = dataclasses.replace(step_cfg, first_target_tokens_only=False,
                                       positions_per_row=max(inputs.positions_per_row(
                                           p, offsets, False) for p in eval_pipes))
    log(f"trunk {trunk.path} ({trunk.config.n_layers} layers, dim {trunk.config.dim}, vocab "
        f"{trunk.config.vocab_size}); head {settings.head.kind} offsets {offsets}")
    log(f"train: {train_pipe.stats.summary()}")
    if eval_pipe is not None:
        log(f"eval: {eval_pipe.stats.summary()}")
    if distilled_pipe is not None:
        log(f"eval_distilled ({settings.data.eval_target_file}): "
            f"{distilled_pipe.stats.summary()}")
    log(f"{num_steps} steps of {loop.global_batch_size} rows ({train_pipe.steps_per_epoch:.1f} "
        f"steps/epoch); {step_cfg.positions_per_row} supervised positions/row at most; "
        f"{parallel.describe()}")
    return _Run(settings=settings, workdir=workdir, trunk=trunk, train_pipe=train_pipe,
                eval_pipe=eval_pipe, parallel=parallel, step_cfg=step_cfg, eval_cfg=eval_cfg,
                num_steps=num_steps, tx=make_optimizer(settings.optimizer, num_steps), log=log,
                start_step=start_step, prompt_format=prompt, distilled_pipe=distilled_pipe,
                draft_vocab=draft_vocab)


def _draft_vocab(settings: RunSettings, train_pipe, trunk, log) -> Optional[dict]:
    """loss.draft_vocab_size: the most frequent target ids of the training rows
    (training/vocab.py), or None."""
    size = settings.loss.draft_vocab_size
    if not size:
        return None
    from gptk_jax.training.vocab import training_draft_vocab, vocab_sha256
    start = time.perf_counter()
    try:
        ids = training_draft_vocab(train_pipe.rows, trunk.tokenizer, size)
    except ValueError as e:
        raise TrainingError(f"config.loss.draft_vocab_size: {e}") from None
    covered = total = 0
    in_vocab = set(ids)
    for row in train_pipe.rows:
        target = row.tokens[row.prompt_len:].tolist()
        total += len(target)
        covered += sum(t in in_vocab for t in target)
    record = {"ids": [int(i) for i in ids], "size": len(ids), "sha256": vocab_sha256(ids),
              "source": f"the {len(train_pipe.rows)} training rows' target tokens "
                        "(stop ids first, then by count, ties by id)",
              "train_target_coverage": covered / max(total, 1)}
    log(f"draft vocabulary: the heads' softmax over {len(ids)} of {trunk.config.vocab_size} ids "
        f"(the training rows' most frequent target tokens: {100 * record['train_target_coverage']:.2f}% "
        f"of their {total} target tokens; sha256 {record['sha256'][:12]}; "
        f"{time.perf_counter() - start:.1f}s)")
    return record


def _open_cache(run: _Run, progress: bool) -> None:
    features, start = run.settings.features, time.perf_counter()
    if not features.cache:
        return
    root = Path(features.cache_dir) if features.cache_dir else run.workdir / "feature_cache"
    try:       # every process: each builds its share of the rows (features/shares.py)
        run.cache = FeatureCache.open_or_build(
            root, run.trunk, run.train_pipe.rows, run.settings.head, features.dtype,
            features.build_batch_size, run.settings.loss.argmax_chunk, log=run.log,
            progress=progress and jax.process_index() == 0)
        # the validation rows too: evaluation then runs the heads only
        for split, pipe in (("eval", run.eval_pipe), ("eval_distilled", run.distilled_pipe)):
            if pipe is not None:
                run.eval_caches[split] = FeatureCache.open_or_build(
                    root, run.trunk, pipe.rows, run.settings.head, features.dtype,
                    features.build_batch_size, run.settings.loss.argmax_chunk, log=run.log,
                    progress=progress and jax.process_index() == 0)
    except CacheError as e:
        raise TrainingError(f"config.features.cache_dir: {e}") from None
    run.cache_seconds = time.perf_counter() - start


def _start(config, workdir: Path, progress: bool) -> _Run:
    """Settings checked against the workdir's record before anything is loaded, the inputs
    after loading; then the record written and the feature cache opened."""
    settings = RunSettings.from_config(config)
    is_main = jax.process_index() == 0
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    start_step = latest_checkpoint_step(workdir) or None
    record = RunRecord(workdir)
    changes = record.check_settings(settings, start_step)
    run = _load(settings, workdir, start_step, log)
    fingerprints = input_fingerprints(run.trunk.config, run.trunk.path, run.train_pipe.rows)
    record.check_inputs(fingerprints, start_step)
    run.record = record.commit(settings, fingerprints, start_step, changes, write=is_main,
                               log=log)
    _open_cache(run, progress)
    return run


def _export_heads(run: _Run, state, result: dict) -> Optional[Path]:
    """WORKDIR/heads in the heads_io format (what gptk_jax.evaluate --heads reads)."""
    params = run.parallel.head_params_host(state)
    if jax.process_index() != 0:
        return None
    out = run.workdir / HEADS_DIR
    meta = {"step": result["step"],               # optimizer steps the heads have taken
            "steps_run": result["steps_run"],     # of them, by the start that wrote this
            "num_steps": run.num_steps,           # what that start's config asked for
            "config": json.loads(json.dumps(dataclasses.asdict(run.settings), default=str)),
            "prompt_format": run.prompt_format,   # template, shots, BOS, stop rule of the rows
            "resumes": run.record["resumes"],     # settings changed at resumes (run.json)
            # distill's target files: lines written of lines asked for (incomplete: a warning)
            "distilled_targets": run.record.get("distilled_targets")}
    args = (run.settings.head, params, run.trunk.config, run.trunk.name)
    vocab = run.draft_vocab
    if jax.process_count() == 1:
        from gptk_jax.heads.io import save_heads
        return save_heads(out, *args, metadata=meta, overwrite=True, draft_vocab=vocab)
    staged = run.workdir / ".heads-export.pkl"      # written by a single-process helper
    staged.write_bytes(pickle.dumps((out, args, meta, vocab)))
    inputs.single_process("import pickle; from pathlib import Path; from gptk_jax.heads.io "
                          "import save_heads; out, args, meta, vocab = pickle.loads(Path("
                          f"{str(staged)!r}).read_bytes()); save_heads(out, *args, "
                          "metadata=meta, overwrite=True, draft_vocab=vocab)")
    staged.unlink()
    return out


def train_and_evaluate(config, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Trains the heads of `config` (a ConfigDict, see configs/base.py) in `workdir`, resuming
    from its latest checkpoint; the config's relative paths are relative to the working directory
    at this call. Returns {"status", "step", "steps_run", "train", "eval", "eval_distilled",
    "heads"} ("eval_distilled": the validation on the trunk's own translations, or None): "step" is
    the heads' real step (a checkpoint past the config's step count runs no step: "steps_run"
    0)."""
    path = prepare_workdir(workdir)
    with _workdir_lock(path):
        run = _start(config, path, progress)
        loop = TrainingLoop(run)
        try:
            result = loop.run()
            if result["status"] == "completed":
                result["heads"] = _export_heads(run, loop.state, result)
                if result["heads"] is not None:
                    run.log(f"heads -> {result['heads']}")
            return result
        finally:
            loop.close()


def _workdir_lock(workdir: Path):
    """One run per workdir: process 0 holds WORKDIR/LOCK_FILE for the run (the other
    processes of a multi-host run share its workdir); a second run is refused (LockHeld, a
    GptkError: one line, exit 2) naming the first's PID and start time."""
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    from gptk_jax.locks import exclusive_lock
    return exclusive_lock(workdir / LOCK_FILE, f"--workdir {workdir}",
                          log=lambda msg: print(msg, flush=True))
