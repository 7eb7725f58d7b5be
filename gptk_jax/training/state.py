"""The training state and its checkpoints.

    WORKDIR/checkpoints/<step>/                  orbax: TrainState (head params, optimizer state,
                                                 step, rng); the frozen trunk is never saved here
    WORKDIR/data_state/<step>.process<i>.json    process i's data iterator state at that step

Orbax writes each step to a temporary folder and renames it when complete, so a run killed
mid-save restarts from the previous complete step; the data state file of a step is written
(atomically) before its orbax save starts and is only read for steps orbax reports complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import flax.struct
import jax
import orbax.checkpoint as ocp

from gptk_jax.files import atomic_write_text
from gptk_jax.training.settings import TrainingError


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # [] int32, optimizer steps taken
    head_params: Any       # the head's own params: the only thing the optimizer updates
    opt_state: Any         # optax state of head_params (no entry for the frozen trunk)
    rng: jax.Array         # base PRNG key; step s uses fold_in(rng, s), so resume is exact


class TrainCheckpointError(TrainingError):
    """A training checkpoint that cannot be restored."""


def latest_checkpoint_step(workdir: Path) -> Optional[int]:
    """The newest complete checkpoint step in WORKDIR/checkpoints (None: none), read without
    writing anything (no folder is created)."""
    folder = Path(workdir).absolute() / "checkpoints"
    if not folder.is_dir():
        return None
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    manager = ocp.CheckpointManager(folder, options=options)
    try:
        return manager.latest_step()
    finally:
        manager.close()


_DATA_STATE_RE = re.compile(r"^(\d+)\.process(\d+)\.json$")


class Checkpointer:
    """Saves / restores TrainState + per-process data iterator states under a workdir."""

    def __init__(self, workdir: Path, max_to_keep: int, process_index: int):
        self.process_index = process_index
        self.data_dir = Path(workdir) / "data_state"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints",
                                             options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def _data_file(self, step: int) -> Path:
        return self.data_dir / f"{step}.process{self.process_index}.json"

    def save(self, step: int, state: TrainState, data_state: dict) -> bool:
        """Starts saving `step` (async); False when that step is already saved."""
        if step in self.manager.all_steps():
            return False
        target = self._data_file(step)
        atomic_write_text(target, json.dumps(data_state))
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._prune(keep={step, *self.manager.all_steps()})
        return True

    def _prune(self, keep: set) -> None:
        for path in self.data_dir.iterdir():
            m = _DATA_STATE_RE.match(path.name)
            if m and int(m.group(2)) == self.process_index and int(m.group(1)) not in keep:
                path.unlink(missing_ok=True)

    def restore(self, abstract_state: TrainState, step: int) -> tuple[TrainState, dict]:
        """State (shapes / shardings of abstract_state) and this process's data state."""
        data_file = self._data_file(step)
        if not data_file.is_file():
            raise TrainCheckpointError(f"checkpoint step {step} has no data iterator state "
                                       f"{data_file} (was it written by another process "
                                       f"layout?)")
        try:
            state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainCheckpointError(f"checkpoint step {step} in {self.manager.directory} does "
                                       f"not match this config's head / optimizer (orbax: "
                                       f"{first_line})") from None
        return state, json.loads(data_file.read_text())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
