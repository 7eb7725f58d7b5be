"""Where training runs: one jit over a ('data', 'model') device mesh, or pmap data parallelism.
Both give the same numbers (up to float summation order); this file is the one jit / pmap site.

mesh  The batch's leading axis is sharded over 'data'; head params and optimizer state are
      replicated; the frozen trunk is replicated, or with model_axis_size > 1 sharded over
      'model' by a name rule (attention heads, FFN width, vocabulary). Multi-host: every
      process feeds its own rows and `jax.make_array_from_process_local_data` assembles the
      global batch.
pmap  Every local device holds a replica of the state and the trunk; each process's rows are
      split over its local devices; the step sums grads and metrics over the 'data' axis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptk_jax.errors import GptkError
from gptk_jax.training.settings import ParallelSettings

DATA_AXIS, MODEL_AXIS = "data", "model"

# Trunk leaf -> axis (counted from the end) split over 'model'. Leaves are found by the module
# name above `kernel` / `embedding`; a leaf whose axis does not divide evenly stays replicated.
_MODEL_AXIS_RULES = {
    "wq": -2, "wk": -2, "wv": -2,     # [..., D, N|K, H]: heads
    "wo": -3,                         # [..., N, H, D]
    "w1": -1, "w3": -1,               # [..., D, F]
    "w2": -2,                         # [..., F, D]
    "tok_embeddings": -2,             # [V, D]
    "output": -1,                     # [D, V]
}


class ParallelError(GptkError, ValueError):
    """A batch size or axis size the devices cannot be split into."""


def trunk_partition_spec(path: tuple, shape: tuple, model_size: int) -> P:
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    module = names[-2] if len(names) >= 2 else ""
    axis = _MODEL_AXIS_RULES.get(module)
    if model_size == 1 or axis is None or len(shape) < -axis or shape[axis] % model_size:
        return P()
    spec = [None] * len(shape)
    spec[len(shape) + axis] = MODEL_AXIS
    return P(*spec)


def to_host(tree: Any) -> Any:
    """Device arrays (replicated, possibly spanning processes) -> numpy."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(one, tree)


class Parallel:
    """Puts state / trunk / batches on devices and compiles the step functions."""

    def __init__(self, settings: ParallelSettings, global_batch_size: int):
        self.mode = settings.mode
        self.process_count = jax.process_count()
        self.local_devices = jax.local_devices()
        if global_batch_size % self.process_count:
            raise ParallelError(f"global_batch_size {global_batch_size} is not divisible by "
                                f"the {self.process_count} processes")
        self.local_batch_size = global_batch_size // self.process_count
        if self.mode == "mesh":
            devices = jax.devices()
            model = settings.model_axis_size
            if len(devices) % model:
                raise ParallelError(f"model_axis_size {model} does not divide the "
                                    f"{len(devices)} devices")
            self.num_data = len(devices) // model
            self.mesh = Mesh(np.asarray(devices).reshape(self.num_data, model),
                             (DATA_AXIS, MODEL_AXIS))
            self.replicated = NamedSharding(self.mesh, P())
            self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
            self.model_size = model
        else:
            self.num_data = len(jax.devices())
            if self.local_batch_size % len(self.local_devices):
                raise ParallelError(f"per-process batch {self.local_batch_size} is not "
                                    f"divisible by the {len(self.local_devices)} local devices")
        if global_batch_size % self.num_data:
            raise ParallelError(f"global_batch_size {global_batch_size} is not divisible by the "
                                f"{self.num_data}-way data axis")

    @property
    def pack_groups(self) -> int:
        """Row groups a step sees that must not be mixed (mesh: the data shards of the global
        batch; pmap: each device's step sees its own rows only, one group)."""
        return self.num_data if self.mode == "mesh" else 1

    def describe(self) -> str:
        if self.mode == "mesh":
            return (f"mesh data={self.num_data} x model={self.model_size} over "
                    f"{self.process_count} process(es)")
        return f"pmap over {self.num_data} devices ({self.process_count} process(es))"

    # --- placement ---------------------------------------------------------------------------
    def _replicate_pmap(self, tree):
        n = len(self.local_devices)
        stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)
        return jax.pmap(lambda t: t)(stacked)

    def _global(self, tree, sharding_of: Callable):
        def one(path, x):
            host = to_host(x)
            sharding = sharding_of(path, host.shape)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        return jax.tree_util.tree_map_with_path(one, tree)

    def put_trunk(self, params):
        if self.mode == "pmap":
            return self._replicate_pmap(params)
        return self._global(params, lambda path, shape: NamedSharding(
            self.mesh, trunk_partition_spec(path, shape, self.model_size)))

    def put_state(self, state):
        if self.mode == "pmap":
            return self._replicate_pmap(state)
        return self._global(state, lambda path, shape: self.replicated)

    def put_batch(self, local_batch: dict) -> dict:
        """This process's rows [B_local, ...] -> the step's input."""
        if self.mode == "pmap":
            n = len(self.local_devices)
            return {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:])
                    for k, v in local_batch.items()}
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}

    def state_for_saving(self, state):
        if self.mode == "pmap":
            return jax.device_get(jax.tree.map(lambda x: x[0], state))
        return state

    def abstract_state(self, state):
        """Restore target for an unplaced state: shapes and dtypes (on a mesh also the
        replicated sharding; pmap restores to the host and replicates with put_state)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=self.replicated), state)

    def head_params_host(self, state):
        params = state.head_params
        if self.mode == "pmap":
            params = jax.tree.map(lambda x: x[0], params)
        return to_host(params)

    def fetch(self, metrics) -> dict:
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda x: x[0], metrics)
        return to_host(metrics)

    # --- compilation (the one jit / pmap site) ------------------------------------------------
    def compile_train(self, step_fn: Callable) -> Callable:
        """step_fn(state, trunk_params, batch, axis_name=None) -> (state, metrics)."""
        if self.mode == "pmap":
            return jax.pmap(functools.partial(step_fn, axis_name=DATA_AXIS),
                            axis_name=DATA_AXIS, donate_argnums=(0,))
        return jax.jit(step_fn, donate_argnums=(0,),
                       out_shardings=(self.replicated, self.replicated))

    def compile_eval(self, eval_fn: Callable) -> Callable:
        """eval_fn(head_params, trunk_params, batch, axis_name=None) -> metrics."""
        if self.mode == "pmap":
            return jax.pmap(functools.partial(eval_fn, axis_name=DATA_AXIS), axis_name=DATA_AXIS)
        return jax.jit(eval_fn, out_shardings=self.replicated)

    def eval_params(self, state):
        return state.head_params
