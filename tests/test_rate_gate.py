"""The measured-time gate of static batches (decoding/rate_gate.py) on hand-made timings: its
speed estimate and standard error against a hand computation, when it closes, rests and opens
again; the engine's use of it is in tests/test_choose_w.py."""

import math

import pytest

from gptk_jax.decoding.rate_gate import RateGate

B = 8


def _run(gate, draft_ratio, n, steps=50, tokens=400, step_seconds=0.01, token_seconds=1e-4):
    """n batches through the gate: greedy costs step_seconds a loop step and token_seconds a
    padded prompt token; a drafting batch costs greedy's time / draft_ratio(i) (i: its index).
    -> the rest decisions."""
    decisions = []
    for i in range(n):
        rest, _ = gate.rests(B)
        greedy = step_seconds * steps + token_seconds * tokens
        seconds = greedy if rest else greedy / draft_ratio(i)
        prefill = token_seconds * tokens if rest else 0.0
        gate.record(B, rest, prefill, seconds - prefill, steps, tokens)
        decisions.append(rest)
    return decisions


def test_speed_matches_a_hand_count():
    gate = RateGate()
    gate.rests(B)
    gate.record(B, False, 0.0, 1.0, 100, 0)      # greedy unknown yet: kept for later
    assert gate.speed(B) == (None, math.inf)
    gate.rests(B)
    gate.record(B, True, 0.2, 0.5, 100, 1000)    # greedy: 5 ms a step, 0.2 ms a prompt token
    gate.rests(B)
    gate.record(B, False, 0.1, 0.5, 80, 500)     # greedy would take 0.4 + 0.1 s
    g = [0.005 * 100 + 0.0, 0.005 * 80 + 0.0002 * 500]
    d = [1.0, 0.6]
    r = sum(g) / sum(d)
    se = math.sqrt(sum((gi - r * di) ** 2 for gi, di in zip(g, d)) / 1) / (sum(d) / 2 * 2 ** .5)
    speed, error = gate.speed(B)
    assert speed == pytest.approx(r) and error == pytest.approx(se)
    assert r == pytest.approx(0.625)


def test_slower_drafter_rests_then_is_measured_again():
    gate = RateGate(idle_batches=3)
    decisions = _run(gate, lambda i: 0.8, 10)
    # draft, greedy measured, draft -> closes; 3 rests; draft (window emptied), draft -> closes
    assert decisions == [False, True, False, True, True, True, False, False, True, True]
    assert not gate.clocks[B].open and len(gate.clocks[B].window) == 2


def test_faster_drafter_keeps_drafting_and_remeasures_greedy():
    gate = RateGate(remeasure_every=4)
    decisions = _run(gate, lambda i: 1.1, 12)
    assert decisions == [False, True] + [False] * 4 + [True] + [False] * 4 + [True]
    assert gate.clocks[B].open and gate.speed(B)[0] == pytest.approx(1.1)


def test_noisy_break_even_stays_open():
    """Drafting batches alternating 0.8x and 1.3x greedy's speed (batch 1 is greedy's): the
    estimate is just below break-even and the spread wide, so the gate does not close on it;
    at z = 0 (the estimate alone) it closes."""
    ratios = lambda i: 1.3 if i % 2 == 0 and i > 0 else 0.8
    assert _run(RateGate(), ratios, 6) == [False, True, False, False, False, False]
    assert _run(RateGate(z=0.0), ratios, 6) == [False, True, False, True, True, True]


def test_a_probe_follows_rests_not_greedys_timing():
    """`rests` reports the batches rested while the gate was closed (the engine probes after
    them), not a batch that only timed greedy; a rested batch of no loop steps is not a step."""
    gate = RateGate(idle_batches=2, remeasure_every=2)
    seen = []
    for ratio in (1.2, None, 1.2, 1.2, None, 1.2):
        rest, rested = gate.rests(B)
        assert rest == (ratio is None)
        seen.append(rested)
        gate.record(B, rest, 0.0, 0.5 if rest else 0.5 / ratio, 50, 0)
    assert seen == [0, 0, 0, 0, 0, 0]
    gate.record(B, True, 0.0, 0.003, 0, 0)       # every row stopped at once: no step timed
    assert len(gate.clocks[B].greedy_step) == 2
    closed = RateGate(idle_batches=2)
    assert closed.rests(B) == (False, 0)
    closed.record(B, False, 0.0, 1.0, 50, 0)
    _run(closed, lambda i: 0.5, 4)               # greedy timed, a draft: closed, 2 rests
    assert closed.rests(B) == (False, 2)         # the drafter again, after 2 rests


def test_a_freshly_compiled_rested_batch_does_not_time_greedy():
    """A rested batch that ran freshly compiled executables (slower first calls) is not
    greedy's time: the next batch rests again; after two such, the third is taken anyway."""
    gate = RateGate()
    gate.rests(B)
    gate.record(B, False, 0.0, 1.0, 50, 0)
    decisions = []
    for _ in range(4):
        rest, _ = gate.rests(B)
        decisions.append(rest)
        gate.record(B, rest, 0.0, 0.9, 50, 0, fresh=True)
    assert decisions[:3] == [True, True, True] and not decisions[3]
    assert list(gate.clocks[B].greedy_step) == [pytest.approx(0.9 / 50)]


def test_freshly_compiled_drafting_batches_are_not_evidence():
    """Drafting batches that ran freshly compiled executables (slow first calls) do not enter
    the window: three of them at half greedy's speed leave the gate open; two warm ones at the
    same speed close it."""
    gate = RateGate()
    greedy = 0.01 * 50
    for i, (fresh, ratio) in enumerate([(True, 0.5), (None, None), (True, 0.5), (True, 0.5)]):
        rest, _ = gate.rests(B)
        assert rest == (i == 1)                  # the second batch measures greedy
        if rest:
            gate.record(B, True, 0.0, greedy, 50, 0)
        else:
            gate.record(B, False, 0.0, greedy / ratio, 50, 0, fresh=fresh)
    assert gate.clocks[B].open and gate.clocks[B].window == []
    for _ in range(2):
        rest, _ = gate.rests(B)
        assert not rest
        gate.record(B, False, 0.0, greedy / 0.5, 50, 0)
    assert not gate.clocks[B].open


def test_batch_sizes_are_measured_apart():
    gate = RateGate()
    _run(gate, lambda i: 0.5, 3)
    assert not gate.clocks[B].open
    assert gate.rests(1) == (False, 0)           # another size starts unmeasured


def test_price_closes_without_the_clock():
    """The cost table's price (greedy's loop, the drafter's loop) closes the gate when the
    priced batches since it opened sum slower than greedy, freshly compiled ones included,
    whatever the clock says; priced_speed is the sums' ratio; a price at or above greedy's
    leaves the timing test in charge; the window of prices empties when the gate reopens."""
    gate = RateGate(idle_batches=1)
    gate.rests(B)
    gate.record(B, False, 0.0, 1.0, 50, 0, fresh=True, priced=(50.0, 52.0))
    assert gate.clocks[B].open                   # one priced batch: too few
    gate.rests(B)
    gate.record(B, True, 0.0, 1.0, 50, 0)        # greedy's loop: no price
    gate.rests(B)
    gate.record(B, False, 0.0, 1.0, 50, 0, fresh=True, priced=(40.0, 41.0))
    assert gate.priced_speed(B) == pytest.approx(90.0 / 93.0)
    assert not gate.clocks[B].open and gate.clocks[B].window == []   # the clock saw none
    assert gate.summary(B)["priced_batches"] == 2
    assert gate.rests(B) == (True, 0)
    assert gate.rests(B) == (False, 1)           # reopened: the prices start again
    assert gate.priced_speed(B) is None
    paying = RateGate()
    for rest in (False, True, False, False):
        assert paying.rests(B)[0] == rest
        paying.record(B, rest, 0.0, 1.0, 50, 0, priced=None if rest else (50.0, 50.0))
    assert paying.clocks[B].open and paying.priced_speed(B) == pytest.approx(1.0)
