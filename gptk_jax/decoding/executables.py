"""Compiled executables of a `Decoder` (engine.py), kept in a small least-recently-used cache.

Bounded because every XLA:CPU executable maps its code into the process (hundreds of mappings
each), and a process that compiles many shapes would reach the kernel's vm.max_map_count.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable

import jax
import numpy as np

MAX_COMPILED = 32   # per decoder: 2 per static batch shape; continuous: ~2 + 1 per refill shape


class Executables:
    """Compiled executables, least recently used dropped first once more than `capacity`."""

    def __init__(self, capacity: int = MAX_COMPILED):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def get(self, fn: Callable, statics: tuple, args: tuple, donate: tuple = ()
            ) -> tuple[Any, float]:
        """(executable of fn(*statics, *args), seconds spent compiling it now)."""
        leaves, treedef = jax.tree.flatten(args)
        key = (fn.__module__, fn.__qualname__, statics, treedef,
               tuple((np.shape(x), np.result_type(x).name) for x in leaves))
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], 0.0
        start = time.perf_counter()
        exe = jax.jit(lambda *a: fn(*statics, *a), donate_argnums=donate).lower(*args).compile()
        self._items[key] = exe
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return exe, time.perf_counter() - start
