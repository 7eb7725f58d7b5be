"""Trains MTP heads on a frozen trunk.

    python -m gptk_jax.train --config configs/lstm_smollm2_wmt14.py --workdir runs/lstm \
        [--config.optimizer.learning_rate=3e-4 ...] \
        [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]   (multi-host)
        [--distributed=auto]   (multi-host where JAX finds the cluster itself: TPU VMs, SLURM)

Rerunning with the same --workdir resumes from its latest checkpoint; a rerun that changes the
run (trunk, head, data) is refused, one that changes its optimizer or step count needs
--config.training.allow_changed_resume=True. SIGTERM saves a checkpoint and exits. All logic
lives in gptk_jax.training.train_and_evaluate.

Exit status: 0 completed or preempted (rerun to continue); 2 bad flags, a config that does not
load or validate, or a run that cannot start or continue: one line on stderr, "error: ...".
"""

from __future__ import annotations

import sys
import sysconfig
import traceback
from pathlib import Path
from typing import NoReturn, Optional

from absl import app, flags
from ml_collections import config_flags

from gptk_jax.cli import ConfigsNotFound, configs_module, use_compilation_cache
from gptk_jax.errors import CLI_ERRORS

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


ERROR_EXIT = 2


def _one_line(text: str) -> str:
    """A message on one line; one that carries a traceback keeps its first and last lines."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = [lines[0], lines[-1]]
    return " ".join(lines) if lines else "(no message)"


def _fail(message: str) -> NoReturn:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(ERROR_EXIT)


def _config_frame(error: BaseException):
    """The innermost frame of `error` in a config file or the project (None: the error came
    from the flags libraries alone, e.g. an override naming no config key)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        name = frame.filename
        if not (name.startswith(("<", stdlib)) or "site-packages" in name or name == __file__):
            return frame
    return None


def _config_file(argv) -> Optional[Path]:
    """The file of --config FILE[:ARG] in argv (None: not given)."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            return Path(arg[len("--config="):].partition(":")[0])
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1].partition(":")[0])
    return None


def _register_configs(argv) -> None:
    """The package `configs` that config files import (`from configs import base`): the
    --config file's own folder when it is that package (so a path works from any working
    directory), else $GPTK_CONFIGS or configs/ in the working directory. Without any, a config
    file that imports it fails when loaded, in one line."""
    path = _config_file(argv)
    folder = path.parent if path is not None and (path.parent / "__init__.py").is_file() \
        and path.parent.name == "configs" else None
    try:
        configs_module(folder=folder)
    except ConfigsNotFound:
        pass


def _parse_flags(argv):
    """absl parsing (which runs the config file and applies --config.* overrides); any failure
    is one line and exit status 2."""
    _register_configs(argv)
    from absl import logging
    logging.set_verbosity(logging.ERROR)       # before parsing absl logs to stderr; --verbosity
    try:                                       # (parsed here) sets it again
        return flags.FLAGS(argv)
    except flags.Error as e:
        given = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
        if given and "--config=None" in str(e):
            _fail("--config: get_config() returned None, not an ml_collections.ConfigDict")
        hint = "" if "Traceback" in str(e) else " (--helpshort lists the flags)"
        _fail(f"{e}{hint}")
    except SyntaxError as e:
        _fail(f"--config: {e.msg} ({e.filename}, line {e.lineno})")
    except Exception as e:  # noqa: BLE001 - whatever the config file raises, said in one line
        frame = _config_frame(e)
        if frame is not None:
            _fail(f"--config: {type(e).__name__}: {e} ({frame.filename}, line {frame.lineno})")
        if not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
            raise
        bad = " ".join(a for a in argv[1:] if a.startswith("--config."))
        why = str(e).strip("'\"").replace("\\'", "'").replace("\\n", " ")
        _fail(f"unknown or mistyped config key in {bad}: {why}")


def _loaded_config():
    """The --config ConfigDict; ml_collections defers a file that cannot be read to here."""
    from ml_collections import ConfigDict
    config = _CONFIG.value
    try:
        config.keys()
    except OSError as e:
        _fail(f"cannot load --config: {str(e).strip().splitlines()[-1].strip()}")
    except AttributeError:
        pass
    if not isinstance(config, ConfigDict):
        _fail(f"--config: get_config() returned {type(config).__name__}, not an "
              f"ml_collections.ConfigDict")
    return config


def _start_distributed() -> None:
    import jax
    if _DISTRIBUTED.value == "auto":
        if _NUM_PROCESSES.value or _COORDINATOR.value:
            _fail("--distributed=auto finds the cluster itself; do not also pass "
                  "--coordinator_address / --num_processes")
        jax.distributed.initialize()
    elif _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
        if jax.config.jax_platforms in (None, "", "cpu"):  # CPU arrays need gloo collectives
                                                            # (no effect on GPU/TPU arrays)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def main(argv) -> int:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags only; --helpshort lists them)")
    config = _loaded_config()
    use_compilation_cache()
    _start_distributed()
    from gptk_jax.training import train_and_evaluate
    try:
        result = train_and_evaluate(config, _WORKDIR.value, progress=_PROGRESS.value)
    except CLI_ERRORS as e:
        _fail(str(e))
    return 0 if result["status"] in ("completed", "preempted") else 1


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
