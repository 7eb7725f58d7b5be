"""What a decode step costs at each batch size and W: the table auto W (decoding/width.py) reads.

    cost = VerifyCost.load("runs/verify_cost.json")            # measured once per machine
    cost = VerifyCost({8: {1: 1.0, 2: 1.3, 4: 2.2}})           # or given: batch -> W -> cost
    cost = decoder.calibrate([1, 8])                             # or measured now (Decoder)
    cost.save("runs/verify_cost.json")                           # stored with the run

`seconds[batch][W]` is the time (or any cost unit: only ratios at one batch are used) of one
step at that batch and W. `relative(batch, w_max)` gives cost(W) / cost(1) for W = 1..w_max:
W between measured ones is interpolated linearly (and extrapolated from the last two past the
largest; a cost below a smaller W's, i.e. noise, is raised to it), a batch between measured
ones interpolates the two neighbours' ratios linearly, a batch outside them takes the nearest
one's.

`measure_step_seconds` times the decoder's own step (decoding/loop.py `decode_step`: draft,
verify, accept, the drafter's advance) at each W on a dummy batch of `context`-token prompts, in
a jitted `fori_loop` (no dispatch between steps), best of `reps` rounds over every W; so
drafting is counted, which a trunk-only timing (bench/bench_verify_cost.py) leaves out. One
compile per W: a few seconds each on CPU for a 135M trunk. `greedy[batch]` (optional) is
greedy's step, without drafting: under auto W a step at W = 1 drafts only where some step may
verify the drafts (decoding/width.py), and that gate weighs W > 1 against greedy's step;
`Decoder.calibrate` measures it too, in the same rounds as the drafter's W's.

Letters: B batch, W tokens per verify step.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from gptk_jax.errors import GptkError

FORMAT = "gptk-verify-cost/1"


class CostTableError(GptkError, ValueError):
    """A step-cost table file that cannot be read."""


class VerifyCost:
    """Step cost by batch and W (see the module doc). `seconds`: {batch: {W: cost}}, or one
    {W: cost} for every batch. W = 1 must be among each batch's."""

    def __init__(self, seconds: Mapping, *, source: str = "", context: Optional[int] = None,
                 device: Optional[str] = None, greedy: Optional[Mapping] = None):
        if seconds and all(isinstance(v, (int, float)) for v in seconds.values()):
            seconds = {1: seconds}                     # one table for every batch
        table = {}
        for batch, per_w in seconds.items():
            batch = int(batch)
            row = {int(w): float(c) for w, c in dict(per_w).items()}
            if batch < 1 or not row or min(row) < 1:
                raise ValueError(f"VerifyCost: batch sizes and W must be >= 1, got batch {batch} "
                                 f"W {sorted(row)}")
            if 1 not in row:
                raise ValueError(f"VerifyCost: batch {batch} has no cost for W = 1")
            if not all(np.isfinite(c) and c > 0 for c in row.values()):
                raise ValueError(f"VerifyCost: costs must be finite and > 0, got {row}")
            table[batch] = dict(sorted(row.items()))
        self.seconds: dict[int, dict[int, float]] = dict(sorted(table.items()))
        self.greedy: dict[int, float] = {int(b): float(c) for b, c in dict(greedy or {}).items()}
        for b, c in self.greedy.items():
            if b not in self.seconds or not (np.isfinite(c) and c > 0):
                raise ValueError(f"VerifyCost: greedy's step at batch {b} must be > 0 and the "
                                 f"batch in the table, got {c}")
        self.source, self.context, self.device = source, context, device

    def __repr__(self) -> str:
        return f"VerifyCost({self.seconds!r}, source={self.source!r})"

    def __bool__(self) -> bool:
        return bool(self.seconds)

    def __contains__(self, batch: int) -> bool:
        return int(batch) in self.seconds

    def merged(self, other: "VerifyCost") -> "VerifyCost":
        """Both tables; other's rows win where both have a batch."""
        greedy = {b: c for b, c in self.greedy.items() if b not in other.seconds}
        return VerifyCost({**self.seconds, **other.seconds}, source=other.source or self.source,
                          context=other.context or self.context,
                          device=other.device or self.device, greedy={**greedy, **other.greedy})

    # --- the ratios the choice uses ------------------------------------------------------------
    def _row_relative(self, batch: int, w_max: int) -> np.ndarray:
        row = self.seconds[batch]
        ws = np.array(sorted(row), float)
        cs = np.array([row[int(w)] for w in ws]) / row[1]
        targets = np.arange(1, w_max + 1, dtype=float)
        out = np.interp(targets, ws, cs)
        if len(ws) >= 2:                               # linear past the largest measured W
            slope = (cs[-1] - cs[-2]) / (ws[-1] - ws[-2])
            beyond = targets > ws[-1]
            out[beyond] = cs[-1] + slope * (targets[beyond] - ws[-1])
        elif w_max > 1:
            raise ValueError(f"VerifyCost: batch {batch} has W = 1 only; W up to {w_max} needs "
                             f"more")
        return np.maximum.accumulate(np.maximum(out, 1e-6))   # more tokens never cost less

    def relative(self, batch: int, w_max: int) -> tuple[float, ...]:
        """cost(W) / cost(1) for W = 1..w_max at this batch (see the module doc)."""
        if not self.seconds:
            raise ValueError("VerifyCost is empty: measure or load one")
        batches = sorted(self.seconds)
        if batch <= batches[0] or batch >= batches[-1] or batch in self.seconds:
            near = min(batches, key=lambda b: (abs(b - batch), b))
            rel = self._row_relative(near, w_max)
        else:
            lo = max(b for b in batches if b < batch)
            hi = min(b for b in batches if b > batch)
            t = (batch - lo) / (hi - lo)
            rel = (1 - t) * self._row_relative(lo, w_max) + t * self._row_relative(hi, w_max)
        return tuple(float(x) for x in rel)

    def greedy_relative(self, batch: int, missing: Optional[float] = 1.0) -> Optional[float]:
        """greedy's step / cost(W = 1) at the nearest measured batch that has it (`missing`:
        none has)."""
        if not self.greedy:
            return missing
        near = min(self.greedy, key=lambda b: (abs(b - batch), b))
        return float(self.greedy[near] / self.seconds[near][1])

    # --- on disk -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "what": "seconds of one decode step, by batch size and W",
                "source": self.source, "context": self.context, "device": self.device,
                "seconds": {str(b): {str(w): c for w, c in row.items()}
                            for b, row in self.seconds.items()},
                "greedy_seconds": {str(b): c for b, c in self.greedy.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "VerifyCost":
        if data.get("format") != FORMAT or "seconds" not in data:
            raise ValueError(f"not a verify cost table (format {FORMAT!r} with 'seconds')")
        return cls(data["seconds"], source=data.get("source", ""), context=data.get("context"),
                   device=data.get("device"), greedy=data.get("greedy_seconds"))

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VerifyCost":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise CostTableError(f"{path}: not JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise CostTableError(f"{path}: {e}") from None


def as_verify_cost(value: Any) -> Optional[VerifyCost]:
    """None, a VerifyCost, a {batch: {W: cost}} / {W: cost} dict, or a path to a saved one."""
    if value is None or isinstance(value, VerifyCost):
        return value
    if isinstance(value, (str, Path)):
        return VerifyCost.load(value)
    if isinstance(value, Mapping):
        return VerifyCost.from_dict(value) if "format" in value else VerifyCost(value)
    raise TypeError(f"verify_cost must be a VerifyCost, a dict or a path, got {type(value)}")


def device_name() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} ({platform.node()})"


def measure_step_seconds(config, drafter, params, drafter_vars, batch: int,
                         widths: Sequence[int], *, context: int = 64, steps: int = 8,
                         reps: int = 5, seed: int = 0, greedy: bool = False) -> dict:
    """Seconds of one decode step at each W in widths, at this batch (see the module doc):
    {W: seconds}, and with greedy=True also {"greedy": greedy's step} (no drafter, W = 1) timed
    in the same rounds, so a burst of the machine's noise hits it and the W's alike (at batch 8
    here, greedy's step measured apart ranged 0.94-1.30x a drafter's W = 1 step within one
    process, session 22). params: the trunk in the layout `Llama(config)` reads (a Decoder's);
    the drafter and its variables as the decoder runs them (per-row variables, e.g. the
    oracle's, must have this batch's rows)."""
    import jax

    from gptk_jax.decoding.inputs import pad_prompts, stop_id_array
    from gptk_jax.decoding.loop import NoDrafter, cache_slots, decode_step, prefill_state

    drafter = drafter or NoDrafter()
    w_max = max(widths)
    rng = np.random.RandomState(seed)
    prompts = pad_prompts([rng.randint(1, config.vocab_size, context).tolist()
                           for _ in range(batch)], 0, bucket=1)
    m = steps * w_max + 2
    slots = cache_slots(prompts.padded_length, m, w_max)
    stops, pad = stop_id_array([]), np.int32(0)

    def start(drafter, drafter_vars, state_w):      # state_w: the W its buffers are sized for
        return jax.jit(prefill_state, static_argnums=(0, 1, 2, 3, 4))(
            config, drafter, state_w, m, slots, params, drafter_vars, prompts, stops, pad)

    def program(drafter, drafter_vars, w, state):
        """(executable of `steps` decode steps at W = w from state, its arguments), warmed up."""
        def loop(params, drafter_vars, state):
            step = lambda _, s: decode_step(config, drafter, w, params, drafter_vars, s, stops)
            return jax.lax.fori_loop(0, steps, step, state)
        exe = jax.jit(loop).lower(params, drafter_vars, state).compile()
        jax.block_until_ready(exe(params, drafter_vars, state))   # warm
        return exe, (params, drafter_vars, state)

    state = start(drafter, drafter_vars, w_max)                   # one prefill for every W
    programs = {int(w): program(drafter, drafter_vars, int(w), state) for w in widths}
    if greedy:
        programs["greedy"] = program(NoDrafter(), (), 1, start(NoDrafter(), (), 1))
    best = {key: float("inf") for key in programs}
    for _ in range(reps):            # rounds over every program: a burst of noise hits them alike
        for key, (exe, args) in programs.items():
            begin = time.perf_counter()
            jax.block_until_ready(exe(*args))
            best[key] = min(best[key], time.perf_counter() - begin)
    return {key: t / steps for key, t in best.items()}
