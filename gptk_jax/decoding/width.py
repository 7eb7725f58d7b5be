"""Tokens per step chosen by measured cost (`tokens_per_step="auto"`): the choice, on the device.

Each loop iteration picks W in 1..W_max (W_max: the drafter's max_drafts + 1, or less) that
maximises expected tokens per second at this batch:

    E(W) = 1 + sum_{j=2..W} prod_{i=2..j} p_i        (tokens a step emits at W, bonus included)
    W    = argmax_W E(W) / cost(W)                     (the smallest W on ties)

(each cost(W > 1) counted min_gain (10 %) dearer: a W > 1 must beat W = 1 by more than the cost
table's own error, see `AutoWidth.min_gain`)

cost(W) is the measured cost of one decode step at this batch and W, relative to W = 1
(decoding/cost.py's `VerifyCost`: a calibration file or a short measurement at start); p_i is the
running conditional acceptance at offset i (P(draft i accepted | drafts 2..i-1 accepted)), pooled
over the batch's active rows: decayed counts `reached_i`, `passed_i`, updated by every step that
verified offset i for some row (`reached <- decay * reached + rows that reached i`, same for
`passed`); offsets a step did not verify keep their estimate. The counts start at a prior
(`prior_weight` rows at acceptance `prior`) that decays with the evidence like any other.

Confidence: a drafter may score each draft (`Drafter.draft_scored`: heads give the softmax
probability of their draft, prompt lookup 1 where it found a match and 0 where not). The
acceptance is then also counted per (offset, score bin) (`score_bins` equal bins of [0, 1]; the
same decayed counts and prior per bin), and the choice uses each row's own drafts: row b's
p_i = the estimate of offset i in the bin of b's draft i, E_b(W) its expected tokens, and

    W    = argmax_W sum_b E_b(W) / cost(W)        over the active rows

so a step whose drafts are confident verifies more of them than one whose drafts are not (the
acceptance-per-confidence idea of EAGLE-2's dynamic draft trees and of dynamic draft lengths,
calibrated online here instead of trusted as is). A drafter that scores nothing puts every draft
in the top bin: the choice is then the pooled one above, exactly. The drafts of step s+1 are
made at the end of step s (decoding/loop.py), so their scores are known when W is chosen.

Each step computes the next step's W (`WidthStats.next_width`). The loop (decoding/loop.py `run`)
is compiled once per W and runs at its W until the choice differs; the engine then runs the
executable of the chosen W on the same state (buffers and cache slots are sized for W_max, so
every W shares them; the state is donated, so nothing is copied). A `lax.switch` over W inside
one loop would make the same choices but copy the whole cache at each step (XLA does not update
a conditional's operands in place: measured on CPU, +2.5 ms a step for a 10 MB cache). Every W
emits the trunk's own argmax, so the output is greedy decoding's whatever is chosen (exact as
before).

Evidence beyond W: a step at W < W_max also checks the draft after its verified ones against
its bonus token (the trunk's token after the last verified position), which is exactly what a
step at W + 1 would have accepted, so offset W + 1 counts too, for free (where the step's drafts
were made). Without it a score bin whose estimate fell low enough for W to stop short of its
offset learned only at probes and stayed low.

Probing: steps at a smaller W verify no draft beyond W + 1, so those estimates would never move
again. So a step runs at W_max whenever `probe_every` steps in a row ran below it (and the first
step of a run, which has no estimate yet, is such a probe). Bound: of a run's S loop iterations,
at most 1 + floor((S - 1) / (probe_every + 1)) are probes, i.e. forced to W_max though the
estimate chose less. With a drafter that is never right, after the first probe
p_2 <= q = prior * prior_weight * decay / (prior_weight * decay + 1) and falls with each probe,
and the offsets beyond are never reached (p_j stays at the prior), so E(W) < 1 + q / (1 - prior)
for every W (1.47 at the defaults); when every W > 1 costs at least that much more than W = 1
(with the min_gain margin below, 1.47 / 1.1 = 1.34 is enough),
every step but the probes runs at W = 1: the run takes greedy's steps (each emits one token at
any W) and costs greedy's plus at most that many probes at W_max (tests/test_choose_w.py). With
W > 1 cheaper than that, a few more steps run above 1 until p_2 has decayed below the gap.

Drafting only where it pays: the drafts of step s+1 are made at the end of step s, and making
them costs the drafter's work every step (eagle: 15-25 % of a greedy step here). After a step at
W = 1 the loop drafts only if `drafts_may_be_verified`: the next step is a probe, or drafting
pays (`drafting_pays`), measured, not modelled: every step whose drafts were made adds what
drafting and then choosing W brought: `gate_value` += the tokens the choice W* emitted per
active row, `gate_cost` += cost(W*) / greedy_cost (the step's cost in greedy steps), both
decayed by `gate_decay` (about the last 50 such steps), and drafting pays while
gate_value > gate_cost, i.e. while it beats greedy's one token per greedy step (`gate_open`,
with a hysteresis band: an open gate closes only below (1 - close_margin) x gate_cost, since
near break-even, as eagle at batch 1, the value is noisy and a closed gate learns only at
probes). With one row going (batch 1, or a batch's last row) the gate also opens where E(W)
from each offset's best score bin beats greedy's step (the first version of this gate): W then
follows that row's own drafts, so the choice itself spends little on unlikely ones, while the
measured value carries the cost model's error, here as large as batch 1's margin (eagle at a
fixed W = 4 measured 1.08x; the measured gate alone shut it off: 1.01-1.04x). At a probe W*
is the choice the scores made (`WidthStats.choice`) and its tokens are known since the probe
verified every offset (min(accepted, W* - 1) + 1 per row), so the evidence is the rule's own
value even while it is switched off. This counts what a model of E(W) misses: at batch 8 W is
shared by the rows, so a best-score-bin bound (the first version of this gate) stayed open
while eagle ran W = 2 at 1.6 greedy steps for 1.3 tokens a row (0.81x), and a pooled estimate
shuts out informative scores. While drafting does not pay the choice is W = 1 whatever the
drafts would be, so they are not made (the old ones stay, unread; a step after one whose drafts
were not made always runs at W = 1), and the next probe waits `idle_probe_every` steps instead
of `probe_every`: such a drafter costs greedy's steps plus a probe (and the drafting before it)
every `idle_probe_every` steps. The choice among W once drafts are made uses the costs with
drafting for every W, W = 1 included, since drafting goes on while the gate says so.

From batch to batch: a decoder keeps the statistics of its last static batch at each batch size
(`Decoder.width_memory`) and the next batch of that size starts from them
(`resume_width_stats`: the estimates, the gate's value and cost and the probe cadence; its own W
histogram; its first W chosen from its prefill's drafts, not a probe). Batch 1 decodes one
sentence of ~40 steps a call: learning the acceptance and the gate's value from the prior each
time cost a probe per sentence, and a few early misses shut drafting off for the rest of it.
Whether a static batch runs with the drafter at all is decided by its measured time, not by
this gate (decoding/rate_gate.py): where drafting is slower than greedy's loop at a batch size,
`idle_batches` (24) batches in a row run greedy's own loop; the batch after them runs with the
drafter and probes first (`after_rest`). A step at W = 1 under this gate still advances the
drafter's state (eagle: its layer over each new position, ~5 % of a batch-8 step here) and the
probes cost more: eagle at batch 8 spent ~30 % more per W = 1 step than greedy in a short probe.
Until session 15 this gate's own verdict decided the rest, and eagle at batch 8 kept drafting
at 0.88x while the model said it paid.

Letters: B batch, W tokens per verify step (W_max the most), J = W_max - 1 offsets 2..W_max.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.decoding.acceptance import summarize


@dataclasses.dataclass(frozen=True)
class AutoWidth:
    """`tokens_per_step="auto"`, or this for other settings (static under jit: hashable).

    max_width: the largest W (None: the drafter's max_drafts + 1). probe_every: below W_max, a
    probe step at W_max after this many steps in a row (idle_probe_every: the same while
    drafting does not pay, see `drafting_pays`). decay: the per-step weight of the old counts
    (0.9: about the last 10 steps' evidence); gate_decay: the same for the drafting gate's
    measured value and cost (per step whose drafts were made); close_margin: the gate closes
    when the value falls below (1 - close_margin) x the cost and opens again above it (a
    hysteresis band: near break-even the measured value is noisy). idle_batches: while drafting
    is measured slower than greedy at a batch size, that many static batches of it in a row
    run greedy's loop, the drafter resting (decoding/rate_gate.py), before one runs with it
    again and probes.
    prior / prior_weight: the acceptance the counts start at, worth that many row-steps.
    score_bins: bins of the drafts' scores (1: scores ignored, the pooled choice). min_gain:
    probes apart, a W > 1 is chosen only where its expected tokens per cost beat W = 1's by
    more than this fraction (`priced_costs`; the cost table's own error: linear + lookup at
    batch 8, continuous, session 21: priced 1.05x greedy's loop, measured 0.99x).
    Set by the engine per call (leave them): costs, the relative step cost at W = 1..W_max at
    this batch (from its `VerifyCost`; drafting included); greedy_cost, greedy's step (no
    drafting) on the same scale; width, the W an executable of `run` steps at (0 where none:
    prefill, refill)."""
    max_width: Optional[int] = None
    probe_every: int = 16
    idle_probe_every: int = 64
    idle_batches: int = 24
    decay: float = 0.9
    gate_decay: float = 0.98
    close_margin: float = 0.1
    prior: float = 0.5
    prior_weight: float = 1.0
    score_bins: int = 8
    min_gain: float = 0.1
    costs: tuple = ()
    greedy_cost: float = 1.0
    width: int = 0


@flax.struct.dataclass
class WidthStats:
    """Per batch (pooled over its rows), carried by DecodeState."""
    reached: jax.Array     # [J] float32 decayed count of row-steps that verified offset j
    passed: jax.Array      # [J] float32 ... and accepted it
    reached_bins: jax.Array  # [J,C] float32 the same per score bin of the draft at offset j
    passed_bins: jax.Array   # [J,C] float32
    gate_value: jax.Array    # [] float32 decayed tokens per row the choice emitted (drafted steps)
    gate_cost: jax.Array     # [] float32 decayed cost of those steps in greedy steps
    choice: jax.Array        # [] int32 the choice for the next step before a probe forced W_max
    drafted: jax.Array       # [] bool the next step's drafts were made
    gate_open: jax.Array     # [] bool drafting pays (the gate, with its hysteresis)
    since_full: jax.Array  # [] int32 steps in a row below W_max
    histogram: jax.Array   # [W_max+1] int32 loop iterations run at each W (index W)
    skipped: jax.Array     # [] int32 loop iterations at W = 1 that skipped the next drafts
    next_width: jax.Array  # [] int32 the W of the next step (a fixed W: W)


def max_width(tokens_per_step) -> int:
    """W_max: the W buffers and cache slots are sized for (a fixed W: W itself)."""
    if isinstance(tokens_per_step, AutoWidth):
        return tokens_per_step.max_width
    return tokens_per_step


def step_width(tokens_per_step) -> int:
    """The W a step runs at: a fixed W, or an AutoWidth's `width`."""
    if isinstance(tokens_per_step, AutoWidth):
        return tokens_per_step.width
    return tokens_per_step


def _policy(tokens_per_step) -> AutoWidth:
    return tokens_per_step if isinstance(tokens_per_step, AutoWidth) else AutoWidth()


def priced_costs(policy: AutoWidth) -> np.ndarray:
    """cost(W) [W_max] as the choice weighs it: each W > 1 min_gain dearer (the cost table's
    own error); the gate's evidence and a batch's price use the costs as measured."""
    costs = np.asarray(policy.costs, np.float32)
    costs[1:] *= 1.0 + policy.min_gain
    return costs


def init_width_stats(tokens_per_step) -> WidthStats:
    """The prior, and the first W: W_max for auto W (a probe: nothing is measured yet). The
    drafting gate starts from what the choice at the prior acceptance would bring at the
    policy's costs (prior_weight steps of it)."""
    policy, w_max = _policy(tokens_per_step), max_width(tokens_per_step)
    weight, bins = policy.prior_weight, (w_max - 1, policy.score_bins)
    choice, value, cost = w_max, 1.0, 1.0      # the gate's prior: the choice at the prior
    if policy.costs:                           # acceptance, its tokens and cost in greedy steps
        expected = expected_tokens(np.full((w_max - 1,), policy.prior), np)   # on the host
        choice = int(np.argmax(expected / priced_costs(policy))) + 1
        value, cost = float(expected[choice - 1]), policy.costs[choice - 1] / policy.greedy_cost
    return WidthStats(reached=jnp.full((w_max - 1,), weight, jnp.float32),
                      passed=jnp.full((w_max - 1,), weight * policy.prior, jnp.float32),
                      reached_bins=jnp.full(bins, weight, jnp.float32),
                      passed_bins=jnp.full(bins, weight * policy.prior, jnp.float32),
                      gate_value=jnp.array(weight * value, jnp.float32),
                      gate_cost=jnp.array(weight * cost, jnp.float32),
                      choice=jnp.array(choice, jnp.int32), drafted=jnp.array(True),
                      gate_open=jnp.array(value >= (1 - policy.close_margin) * cost),
                      since_full=jnp.array(policy.probe_every, jnp.int32),
                      histogram=jnp.zeros((w_max + 1,), jnp.int32),
                      skipped=jnp.array(0, jnp.int32), next_width=jnp.array(w_max, jnp.int32))


def acceptance_estimate(stats: WidthStats) -> jax.Array:
    """p_j [J], offsets 2..W_max."""
    return stats.passed / jnp.maximum(stats.reached, 1e-12)


def expected_tokens(p: jax.Array, xp=jnp) -> jax.Array:
    """p [J] -> E(W) [W_max] for W = 1..W_max; xp=np: numpy on the host (a prior known at
    trace time, which jnp would stage into the program)."""
    reach = xp.cumprod(p)
    return 1.0 + xp.concatenate([xp.zeros((1,), reach.dtype), xp.cumsum(reach)])


def score_bin(scores: jax.Array, bins: int) -> jax.Array:
    """Draft scores [..] in [0, 1] -> their bin [..] int32 in 0..bins-1 (1.0: the top bin)."""
    return jnp.clip(jnp.floor(scores * bins), 0, bins - 1).astype(jnp.int32)


def row_expected_tokens(stats: WidthStats, scores: jax.Array) -> jax.Array:
    """scores [B,J] of the next drafts -> E_b(W) [B,W_max]: each row's p_i read in its drafts'
    score bins."""
    table = stats.passed_bins / jnp.maximum(stats.reached_bins, 1e-12)          # [J,C]
    bins = score_bin(scores, table.shape[1])                                   # [B,J]
    p = table[jnp.arange(table.shape[0])[None, :], bins]                       # [B,J]
    reach = jnp.cumprod(p, axis=1)
    return 1.0 + jnp.concatenate([jnp.zeros_like(reach[:, :1]), jnp.cumsum(reach, axis=1)], 1)


def choose_width(policy: AutoWidth, stats: WidthStats, scores: Optional[jax.Array] = None,
                 active: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """-> (W, W*) [] int32 in 1..W_max: W* the best expected tokens per cost, W the step's: W*
    while drafting pays (`drafting_pays`), else 1; W_max when probing; 1 where the next drafts
    were not made (`stats.drafted`). W* is what the gate's evidence counts. scores [B,J] (the
    next drafts'; None: pooled estimates) and active [B] the rows still going."""
    w_max = policy.max_width
    if scores is None:
        expected = expected_tokens(acceptance_estimate(stats))                  # [W_max]
    else:
        weight = jnp.ones(scores.shape[:1], jnp.float32) if active is None else active
        expected = (row_expected_tokens(stats, scores) * weight[:, None]).sum(axis=0)
    score = expected / jnp.asarray(priced_costs(policy))
    best = (jnp.argmax(score) + 1).astype(jnp.int32)
    rows = None if active is None else jnp.sum(active)
    w = jnp.where(drafting_pays(policy, stats, rows), best, 1)
    w = jnp.where(stats.since_full >= probe_interval(policy, stats, rows), w_max, w)
    return jnp.where(stats.drafted, w, 1).astype(jnp.int32), best


@functools.partial(jax.jit, static_argnums=0)
def resume_width_stats(policy: AutoWidth, previous: WidthStats, fresh: WidthStats,
                       scores: jax.Array, active: jax.Array) -> WidthStats:
    """The statistics a new batch starts from when the decoder ran one at this batch size
    before (`Decoder.width_memory`): the previous batch's estimates, drafting gate and probe
    cadence, with its own W histogram (fresh's, empty) and its first W chosen from its prefill's
    drafts (scores [B,J], active [B]) instead of a probe. At batch 1 a sentence of ~40 steps
    is too short to learn the acceptance or the gate's value from the prior each time."""
    stats = previous.replace(histogram=fresh.histogram, skipped=fresh.skipped,
                             drafted=jnp.array(True))
    width, choice = choose_width(policy, stats, scores, active)
    return stats.replace(next_width=width, choice=choice)


def after_rest(policy: AutoWidth, memory: WidthStats, rested: int) -> WidthStats:
    """The statistics a batch with the drafter starts from after `rested` batches without it:
    a probe first (the gate has had no evidence since)."""
    if not rested:
        return memory
    return memory.replace(since_full=jnp.maximum(memory.since_full, policy.idle_probe_every))


def rested_stats(memory: WidthStats, iterations) -> WidthStats:
    """What a batch run without the drafter reports: the kept statistics, every one of its
    `iterations` loop iterations at W = 1."""
    return memory.replace(histogram=jnp.zeros_like(memory.histogram).at[1].set(iterations),
                          skipped=jnp.asarray(iterations, jnp.int32))


def drafting_pays(policy: AutoWidth, stats: WidthStats, rows=None) -> jax.Array:
    """[] bool: did drafting and choosing W beat greedy's step, by the measured, decayed tokens
    per row and cost in greedy steps of the steps whose drafts were made (module doc; the
    gate's state `gate_open`, moved by `update_width_stats`)? With one row going (`rows` [] the
    active rows' count), also yes where E(W) from each offset's best score bin beats greedy's
    step for some W > 1. Costs unset (a fixed W): yes."""
    if not policy.costs:
        return jnp.array(True)
    if rows is None:
        return stats.gate_open
    best = jnp.max(stats.passed_bins / jnp.maximum(stats.reached_bins, 1e-12), axis=1)   # [J]
    bound = expected_tokens(jnp.maximum(best, acceptance_estimate(stats)))       # [W_max]
    worth = bound[1:] * policy.greedy_cost / jnp.asarray(priced_costs(policy)[1:]) > 1.0
    return stats.gate_open | ((rows <= 1) & jnp.any(worth))


def _gate_moves(policy: AutoWidth, was_open: jax.Array, value: jax.Array,
                cost: jax.Array) -> jax.Array:
    """The gate after new evidence: open closes below (1 - close_margin) x cost, closed opens
    above cost."""
    return jnp.where(was_open, value >= (1 - policy.close_margin) * cost, value > cost)


def probe_interval(policy: AutoWidth, stats: WidthStats, rows=None) -> jax.Array:
    """[] int32: the steps in a row below W_max after which the next step probes at W_max
    (probe_every, or idle_probe_every while drafting does not pay)."""
    return jnp.where(drafting_pays(policy, stats, rows), policy.probe_every,
                     policy.idle_probe_every).astype(jnp.int32)


def drafts_may_be_verified(policy: AutoWidth, stats: WidthStats,
                           active: Optional[jax.Array] = None) -> jax.Array:
    """[] bool, before a step at W = 1: should the drafts of the step after it be made? Yes
    when drafting pays (`drafting_pays`, active [B] the rows going) or the next step is a
    probe. Where no, the loop skips
    drafting after that step (decoding/loop.py) and the step after it runs at W = 1 at greedy's
    cost (`choose_width` reads `drafted`)."""
    rows = None if active is None else jnp.sum(active)
    return (drafting_pays(policy, stats, rows)
            | (stats.since_full + 1 >= probe_interval(policy, stats, rows)))


def _gate_evidence(tokens_per_step, stats: WidthStats, w: int, accepted: jax.Array,
                   active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The drafting gate's decayed (value, cost) after a step at W = w: what this step's choice
    W* emitted per row, at what cost in greedy steps (a probe ran W_max >= W*, so
    min(accepted, W* - 1) + 1 is known per row; a step below W*, drafting switched off, or
    whose drafts were not made tells nothing)."""
    policy = _policy(tokens_per_step)
    if not (isinstance(tokens_per_step, AutoWidth) and policy.costs):
        return stats.gate_value, stats.gate_cost
    rows, chosen, gate_decay = active.sum(), stats.choice, jnp.float32(policy.gate_decay)
    emitted = jnp.where(active, jnp.minimum(accepted, chosen - 1) + 1, 0).sum()
    cost = jnp.asarray(policy.costs, jnp.float32)[chosen - 1] / jnp.float32(policy.greedy_cost)
    counted = stats.drafted & (rows > 0) & (chosen <= w)
    value = jnp.where(counted, gate_decay * stats.gate_value + emitted / jnp.maximum(rows, 1),
                      stats.gate_value)
    return value, jnp.where(counted, gate_decay * stats.gate_cost + cost, stats.gate_cost)


def update_width_stats(tokens_per_step, stats: WidthStats, w: int, accepted: jax.Array,
                       active: jax.Array, scores: Optional[jax.Array] = None,
                       next_scores: Optional[jax.Array] = None,
                       next_active: Optional[jax.Array] = None,
                       drafted: Optional[jax.Array] = None,
                       accepted_beyond: Optional[jax.Array] = None) -> WidthStats:
    """After a step at W = w: accepted [B] drafts accepted per row (before the stop / limit
    cut), active [B] the rows that took part, scores [B,J] the drafts' scores (None: unscored,
    the top bin). accepted_beyond [B] (None: not known): the same counting the draft after the
    verified ones against the step's bonus token, i.e. what a step at W + 1 would have
    accepted; offset W + 1 then counts too, where this step's drafts were made (`stats.drafted`:
    else they are stale). Without it a score bin whose estimate fell low enough for W to stop
    short of its offset got no evidence but probes, and stayed low (session 18: the linear heads
    ran 68 % of steps at W = 1 and 1.05x, against 1.16x at a fixed W = 4). Then the next
    step's W, from next_scores [B,J] / next_active [B] (the next step's drafts; None: the
    pooled choice) and drafted [] bool (were they made? None: yes)."""
    policy, w_max = _policy(tokens_per_step), stats.reached.shape[0] + 1   # the buffers' W_max
    offsets = jnp.arange(2, w_max + 1)[None, :]                                 # [1,J]
    if accepted_beyond is not None and w < w_max:
        seen_to = jnp.where(stats.drafted, w + 1, w)                            # [] int32
        counted = jnp.where(stats.drafted, accepted_beyond, accepted)           # [B]
    else:
        seen_to, counted = w, accepted
    verified = active[:, None] & (offsets <= seen_to)                           # [B,J]
    row_reached = verified & (counted[:, None] >= offsets - 2)                  # [B,J]
    row_passed = verified & (counted[:, None] >= offsets - 1)
    reached, passed = row_reached.sum(axis=0), row_passed.sum(axis=0)           # [J]
    seen = reached > 0
    decay = jnp.float32(policy.decay)
    bins = stats.reached_bins.shape[1]
    if scores is None:
        scores = jnp.ones(row_reached.shape, jnp.float32)
    onehot = jax.nn.one_hot(score_bin(scores, bins), bins, dtype=jnp.float32)   # [B,J,C]
    reached_b = (row_reached[..., None] * onehot).sum(axis=0)                   # [J,C]
    passed_b = (row_passed[..., None] * onehot).sum(axis=0)
    seen_b = reached_b > 0
    gate_value, gate_cost = _gate_evidence(tokens_per_step, stats, w, accepted, active)
    new = WidthStats(
        reached=jnp.where(seen, decay * stats.reached + reached, stats.reached),
        passed=jnp.where(seen, decay * stats.passed + passed, stats.passed),
        reached_bins=jnp.where(seen_b, decay * stats.reached_bins + reached_b,
                               stats.reached_bins),
        passed_bins=jnp.where(seen_b, decay * stats.passed_bins + passed_b, stats.passed_bins),
        gate_value=gate_value, gate_cost=gate_cost, choice=stats.choice,
        drafted=jnp.array(True) if drafted is None else drafted,
        gate_open=_gate_moves(policy, stats.gate_open, gate_value, gate_cost),
        since_full=jnp.array(0 if w >= w_max else 1, jnp.int32) * (stats.since_full + 1),
        histogram=stats.histogram.at[w].add(1), next_width=stats.next_width,
        skipped=stats.skipped + (0 if drafted is None else (~drafted).astype(jnp.int32)))
    if isinstance(tokens_per_step, AutoWidth):
        width, choice = choose_width(policy, new, next_scores, next_active)
        return new.replace(next_width=width, choice=choice)
    return new


# --- what a result records (engine.py) --------------------------------------------------------

def harvest_widths(state, rows: Sequence[int]) -> list[list[int]]:
    """The W of each verify step of slots `rows` (auto W; one device-to-host copy)."""
    row_steps, width_log = jax.device_get((state.row_steps, state.width_log))
    return [width_log[:row_steps[b], b].tolist() for b in rows]


def summarize_widths(result: Any, widths: Sequence[Sequence[int]]) -> None:
    """result.stats recomputed with each step's W (widths: per row, per step; an offset counts
    as reached only where it was drafted): `width_histogram` over row-steps, `widths_per_row`."""
    s = result.stats
    longest = max([len(a) for a in s["accepted_per_row"]] + [1])
    logs = np.full((3, longest, len(widths)), -1, np.int64)        # accepted, emitted, W
    for i, (acc, emitted, ws) in enumerate(zip(s["accepted_per_row"], s["emitted_per_row"],
                                               widths)):
        logs[0, :len(acc), i], logs[1, :len(emitted), i], logs[2, :len(ws), i] = acc, emitted, ws
    result.stats = summarize(logs[0], logs[1], result.tokens_per_step - 1, width_log=logs[2])


def summarize_fixed_width(result: Any, w: int, steps_per_row: Sequence[int]) -> None:
    """A fixed W: result.stats with every step of each row at W (a rested batch: W = 1)."""
    summarize_widths(result, [[w] * n for n in steps_per_row])


def modelled_loop_cost(policy: AutoWidth, stats: WidthStats,
                       greedy_steps: int) -> tuple[float, float]:
    """A static batch's decode loop priced by the step cost table (host side; the rate gate's
    second test, decoding/rate_gate.py) -> (greedy's loop: greedy_steps x greedy_cost, this
    loop: sum over W of the iterations at W x cost(W), each W = 1 iteration that skipped
    drafting at greedy_cost instead of cost(1)). What it leaves out (the drafter's prefill,
    eagle advancing its state while drafting is skipped, switching executables) all falls on
    the drafter's side, so a loop this prices slower than greedy's was slower."""
    histogram, skipped = jax.device_get((stats.histogram, stats.skipped))
    costs = policy.costs
    loop = sum(int(n) * costs[w - 1] for w, n in enumerate(histogram) if w >= 1 and n)
    loop -= int(skipped) * (costs[0] - policy.greedy_cost)
    return greedy_steps * policy.greedy_cost, loop


def add_width_stats(result: Any, widths: Sequence[Sequence[int]], width_stats,
                     auto_info: dict) -> None:
    """Auto W: result.stats recomputed with each step's W (an offset counts as reached only
    where it was drafted; `width_histogram` over row-steps, `widths_per_row`), plus
    `chosen_w_histogram` (index W: loop iterations run at W), `skipped_drafting` (those at
    W = 1 that did not make the next drafts), `offset_acceptance_estimate`
    (the running p_j at the end, offsets 2..W_max), `expected_tokens` (E(W) from them),
    `step_cost` (cost(W) / cost(1) used), its source and the calibration seconds;
    `acceptance_by_score_bin` / `score_bin_weight`: the running estimate and decayed count per
    offset and draft-score bin (decoding/width.py; unscored drafters fill the top bin only)."""
    summarize_widths(result, widths)
    histogram, estimate, passed, reached, skipped = jax.device_get((
        width_stats.histogram, acceptance_estimate(width_stats), width_stats.passed_bins,
        width_stats.reached_bins, width_stats.skipped))
    result.stats.update(
        tokens_per_step_mode="auto", chosen_w_histogram=histogram.tolist(),
        skipped_drafting=int(skipped),
        offset_acceptance_estimate={str(j + 2): float(p) for j, p in enumerate(estimate)},
        acceptance_by_score_bin={str(j + 2): [round(float(a / max(r, 1e-12)), 4)
                                              for a, r in zip(passed[j], reached[j])]
                                 for j in range(passed.shape[0])},
        score_bin_weight={str(j + 2): [round(float(r), 2) for r in reached[j]]
                          for j in range(reached.shape[0])},
        expected_tokens=[float(e) for e in np.asarray(expected_tokens(estimate))], **auto_info)
