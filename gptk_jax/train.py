"""Trains MTP heads on a frozen trunk.

    python -m gptk_jax.train --config configs/lstm_smollm2_wmt14.py --workdir runs/lstm \
        [--config.optimizer.learning_rate=3e-4 ...] \
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]   (multi-host)
        [--distributed=auto]   (multi-host where JAX finds the cluster itself: TPU VMs, SLURM)

Rerunning with the same --workdir resumes from its latest checkpoint. SIGTERM saves a checkpoint
and exits. All logic lives in gptk_jax.training.train_and_evaluate.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:            # configs/*.py import `configs.base`
    sys.path.insert(0, str(ROOT))

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, heads")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-host: HOST:PORT of process 0 (jax.distributed)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto"],
    "auto: jax.distributed.initialize() with no arguments, which detects a TPU pod slice, SLURM "
    "or Open MPI; off: multi-host only with --num_processes > 1")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bars (feature cache build)")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
    """absl parsing, with a one-line error for an unknown or mistyped --config.* key."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --helpshort for the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = " ".join(a for a in argv[1:] if a.startswith("--config."))
        why = str(e).strip("'\"").replace("\\'", "'").replace("\\n", " ")
        sys.exit(f"error: unknown or mistyped config key in {bad}: {why}")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from absl import logging
    if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    import jax
    if _DISTRIBUTED.value == "auto":
        if _NUM_PROCESSES.value or _COORDINATOR.value:
            raise app.UsageError("--distributed=auto finds the cluster itself; do not also pass "
                                 "--coordinator_address / --num_processes")
        jax.distributed.initialize()
    elif _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
        if jax.config.jax_platforms in (None, "", "cpu"):  # CPU arrays need gloo collectives
                                                            # (no effect on GPU/TPU arrays)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from gptk_jax.training import TrainingError, train_and_evaluate
    try:
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if result["status"] in ("completed", "preempted") else 1


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
