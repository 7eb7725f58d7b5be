"""Whether a static batch runs with its drafter, decided by measured time (auto W; host side).

The in-loop gate (decoding/width.py `drafting_pays`) decides from a model: E(W) over the step
cost table. Where the model is off it stays open at a loss (eagle at batch 8: 0.88x greedy with
the gate open in every batch, session 15, docs/results.md), and its verdict follows the
calibration's noise (the same drafter and settings gave 0.96x in session 14 with the gate
closed). This gate times what each static batch really cost instead, per batch size.

What greedy would have spent on a batch is known without running it: greedy emits one token
per row per loop step, so on the same prompts it runs `greedy_steps` = the longest row's tokens
- 1 loop steps (its prefill emits the first token; the rows' tokens are greedy's, exactly), and
its prefill reads the same padded prompt tokens. A batch run with greedy's own loop (the drafter
resting) measures greedy's seconds per loop step and per padded prompt token at this batch
size; each batch with the drafter then compares its seconds with

    greedy_equivalent = step_seconds x greedy_steps + token_seconds x padded_prompt_tokens

(the shared prompt prefix, prefilled once per decoder, is left out of both). The window holds
the drafting batches since the gate last opened (their greedy-equivalent from greedy's current
estimates, so the first batch, run before greedy is measured, counts too); the speed estimate
is R = sum greedy_equivalent / sum seconds, with the ratio estimator's standard error
se = sqrt(sum (g_i - R d_i)^2 / (n - 1)) / (mean d x sqrt n). The gate closes when
n >= min_batches and R + z x se < 1 (drafting slower than greedy beyond the batches' spread;
per-batch ratios of eagle here: sd 0.21 at batch 1, 0.11 at batch 8).

Schedule per batch size: the first batch runs with the drafter; the second with greedy's loop
(greedy's cost measured; it costs greedy's time, no loss); then the drafter while the gate is
open, with one greedy batch after every `remeasure_every` drafting batches (greedy's own time
drifts by a few per cent over minutes on this machine: the last `history` greedy batches are
averaged). A closed gate rests `idle_batches` batches in a row (each at greedy's cost exactly),
then opens with an empty window: the drafter runs again until the test closes it (at least
min_batches batches), so a drafter whose speed changed (another domain, a drifting machine) is
measured anew. The output is greedy's in every case (a rested batch runs greedy's loop).

A second test needs no clock: with W chosen per step the engine also prices each drafting
batch's loop by the step cost table (decoding/width.py `modelled_loop_cost`: its iterations at
each W, each at cost(W), against greedy's steps at greedy's cost; what the price leaves out is
all on the drafter's side), and the gate closes as well when the priced batches since it opened
(at least min_batches, freshly compiled ones included since a price does not depend on the
first call's speed) sum slower than greedy (`priced_floor`). In session 19 eagle at batch 8
chose W = 1 on 92 % of its steps, still paid for drafting and probes and ran at 0.94x greedy;
the timing test did not close in 25 batches, most of them freshly compiled (a new prompt width
or W) and so left out, the rest within the batches' spread. The price said 0.93x after two.

Continuous batching (`Decoder.generate_continuous`) runs greedy's loop at a batch size where
this gate is closed (`resting`), the drafter otherwise; its own time does not move the gate.

Left out: the cache width's effect on greedy's step (batches of other prompt widths share one
step estimate) and the drafter's compile time (excluded from both sides).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Optional


@dataclasses.dataclass
class BatchClock:
    """What the gate measured at one batch size. greedy_step / greedy_token: seconds per loop
    step and per padded prompt token of the last greedy batches; window: (greedy steps, padded
    prompt tokens, seconds) of the drafting batches since the gate opened; priced: their
    (greedy's loop, the drafter's loop) by the step cost table (fresh ones too); rested:
    batches in a row run without the drafter; since_greedy: drafting batches since greedy was
    last measured."""
    greedy_step: collections.deque
    greedy_token: collections.deque
    window: list = dataclasses.field(default_factory=list)
    priced: list = dataclasses.field(default_factory=list)
    open: bool = True
    fresh_skips: int = 0
    rested: int = 0
    since_greedy: int = 0

    def greedy_means(self) -> tuple[Optional[float], Optional[float]]:
        """(seconds per greedy loop step, per padded prompt token); None before greedy ran."""
        if not self.greedy_step:
            return None, None
        return (sum(self.greedy_step) / len(self.greedy_step),
                sum(self.greedy_token) / len(self.greedy_token))


class RateGate:
    """Per batch size: rest the drafter for this static batch? (`rests`, before it) and what it
    cost (`record`, after it); see the module doc."""

    def __init__(self, idle_batches: int = 24, remeasure_every: int = 16, min_batches: int = 2,
                 z: float = 1.0, history: int = 8, max_window: int = 32,
                 priced_floor: float = 1.0):
        self.idle_batches, self.remeasure_every = idle_batches, remeasure_every
        self.priced_floor = priced_floor
        self.min_batches, self.z, self.max_window = min_batches, z, max_window
        self.history = history
        self.clocks: dict[int, BatchClock] = {}

    def _clock(self, batch: int) -> BatchClock:
        if batch not in self.clocks:
            self.clocks[batch] = BatchClock(collections.deque(maxlen=self.history),
                                            collections.deque(maxlen=self.history))
        return self.clocks[batch]

    def rests(self, batch: int) -> tuple[bool, int]:
        """Before a static batch of `batch` rows -> (run it with greedy's loop?, the batches in
        a row that rested before it while the gate was closed: 0 after a batch that only
        measured greedy, whose drafting evidence is still current)."""
        c = self._clock(batch)
        rested, was_closed = c.rested, not c.open
        if not c.greedy_step:                    # greedy unmeasured: after the first batch
            rest = c.since_greedy > 0             # (fresh ones too: not in the window)
        elif c.open:                             # drafting, greedy re-measured now and then
            rest = c.since_greedy >= self.remeasure_every
        elif c.rested >= self.idle_batches:      # rested long enough: measure the drafter anew
            c.open, c.window, c.priced, rest = True, [], [], False
        else:
            rest = True
        c.rested = rested + 1 if rest else 0
        return rest, rested if was_closed else 0

    def record(self, batch: int, rested: bool, prefill_seconds: float, decode_seconds: float,
               greedy_steps: int, padded_tokens: int, fresh: bool = False,
               priced: Optional[tuple[float, float]] = None) -> None:
        """After a static batch: its prefill and decode seconds (compilation and the shared
        prefix excluded), greedy's loop steps on its prompts and its padded prompt tokens.
        fresh: its executables were compiled for it. A first call runs slower (session 16: a
        rested batch 4-15 % slower than greedy's warm one on the same prompts, which kept the
        LSTM drafting at 0.95x), so a fresh rested batch does not time greedy (twice in a row
        at most): the next batch rests again. (Rested batches run greedy's own executables
        (engine.py), so this applies where greedy has not yet run a batch of that shape.) A
        fresh drafting batch is left out of the window: in session 18 every batch-1 run with W
        chosen per step closed the gate on its first two drafting batches (the very first, and
        one with newly compiled W's), rested 24, closed again on the next two and then drafted
        to the end (57 of 200 batches rested; eagle 1.16x against 1.24x at a fixed W = 4).
        priced: (greedy's loop, the drafter's loop) by the step cost table (auto W,
        width.modelled_loop_cost; fresh batches too): see `priced_speed`."""
        c = self._clock(batch)
        if rested and fresh and c.fresh_skips < 2:
            c.fresh_skips += 1
            return
        if rested:
            c.fresh_skips = 0
            if greedy_steps > 0:                 # else its time is overhead, not steps
                c.greedy_step.append(decode_seconds / greedy_steps)
            c.greedy_token.append(prefill_seconds / max(padded_tokens, 1))
            c.since_greedy = 0
            return
        c.since_greedy += 1
        if priced is not None and priced[1] > 0:  # the cost table's verdict: no timing noise
            c.priced.append(priced)
            del c.priced[:-self.max_window]
            speed = self.priced_speed(batch)
            if len(c.priced) >= self.min_batches and speed < self.priced_floor:
                c.open = False
        if fresh:     # its first calls ran slow: not evidence (session 18, below)
            return
        c.window.append((greedy_steps, padded_tokens, prefill_seconds + decode_seconds))
        del c.window[:-self.max_window]
        speed, se = self.speed(batch)
        if speed is not None and len(c.window) >= self.min_batches and speed + self.z * se < 1:
            c.open = False

    def speed(self, batch: int) -> tuple[Optional[float], float]:
        """(R, its standard error) over the window, each batch's greedy-equivalent seconds
        from greedy's current estimates; (None, inf) before greedy is measured or with fewer
        than two batches."""
        c = self._clock(batch)
        n = len(c.window)
        if n < 2 or not c.greedy_step:
            return None, math.inf
        step, token = c.greedy_means()
        pairs = [(step * s + token * t, d) for s, t, d in c.window]
        total_g, total_d = sum(g for g, _ in pairs), sum(d for _, d in pairs)
        r = total_g / total_d
        spread = sum((g - r * d) ** 2 for g, d in pairs) / (n - 1)
        return r, math.sqrt(spread) / (total_d / n * math.sqrt(n))

    def priced_speed(self, batch: int) -> Optional[float]:
        """Greedy's loop / the drafter's loop over the priced batches since the gate opened,
        by the step cost table (None: none priced)."""
        c = self._clock(batch)
        if not c.priced:
            return None
        return sum(g for g, _ in c.priced) / max(sum(d for _, d in c.priced), 1e-12)

    def resting(self, batch: int) -> bool:
        """A continuous call at this batch size: run greedy's loop? Yes where its static
        batches measured drafting slower (the gate closed); a continuous call's own time is not
        measured (left out: its rows are ragged)."""
        c = self.clocks.get(batch)
        return c is not None and not c.open

    def summary(self, batch: int) -> dict:
        """What a result records: the gate, its speed estimate and evidence at this size."""
        c = self._clock(batch)
        speed, se = self.speed(batch)
        step, _ = c.greedy_means()
        return {"rate_gate_open": c.open, "measured_speed": speed,
                "priced_speed": self.priced_speed(batch), "priced_batches": len(c.priced),
                "measured_speed_se": None if speed is None else se,
                "measured_batches": len(c.window), "greedy_step_seconds": step}
