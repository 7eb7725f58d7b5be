"""Tokens per step chosen by measured cost (`tokens_per_step="auto"`, decoding/width.py and
decoding/cost.py) on a tiny random trunk: the output is greedy's whatever W is chosen (heads,
lookup; static batches and refilled slots); a drafter that is never right settles at W = 1 and
runs greedy's steps with at most the stated number of probes at W_max; the oracle settles at
W_max; the cost table's interpolation and file round trip; a short measured calibration."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.decoding import Decoder, DecodingError, head_drafter
from gptk_jax.decoding.acceptance import acceptance_stats
from gptk_jax.decoding.cost import VerifyCost, as_verify_cost
from gptk_jax.decoding.lookup import LookupDrafter
from gptk_jax.decoding.oracle import OracleDrafter, RepeatDrafter, oracle_variables
from gptk_jax.decoding.rate_gate import RateGate
from gptk_jax.decoding.width import AutoWidth, expected_tokens
from gptk_jax.heads import HeadConfig, init_head_params, make_head
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import init_params, params_for_model

CFG = LlamaConfig(vocab_size=23, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0, max_seq_len=256)
K = 4             # W_max: the trunk's token + 3 drafts
MAX_NEW = 24
PAD = 0
BUCKET = 8
PROMPT_LENGTHS = [3, 9, 5, 12, 1, 7, 4, 10]
PROBE_EVERY = 4   # probes often: W changes often, so the run switches executables often
CPU_LIKE = {1: 1.0, 2: 1.1, 3: 1.25, 4: 1.4}      # W > 1 costs a little more
DEAR = {1: 1.0, 2: 1.5, 3: 1.75, 4: 2.0}          # W > 1 costs a lot more
CHEAP = {w: 1.1 ** (w - 1) for w in range(1, K + 1)}  # ~1.1x per extra token


@pytest.fixture(scope="module")
def setup():
    params = params_for_model(init_params(CFG, jax.random.PRNGKey(7)), CFG)
    rs = np.random.RandomState(3)
    prompts = []
    for n in PROMPT_LENGTHS:     # a repeated phrase gives the lookup something to find
        phrase = rs.randint(1, CFG.vocab_size, 3).tolist()
        prompts.append((phrase + rs.randint(1, CFG.vocab_size, n).tolist() + phrase)[:n + 3])
    decoder = Decoder(CFG, params, stop_ids=[], pad_id=PAD)
    greedy = decoder.generate(prompts, MAX_NEW, bucket=BUCKET)
    return decoder, prompts, greedy


def _same_as_greedy(result, greedy):
    assert result.tokens == greedy.tokens
    assert result.stop_reasons == greedy.stop_reasons
    assert result.num_generated == greedy.num_generated


def _check_width_stats(result):
    s = result.stats
    iterations = (result.loop_iterations if hasattr(result, "loop_iterations")
                  else result.num_steps - 1)
    assert s["tokens_per_step_mode"] == "auto" and result.tokens_per_step == K
    assert sum(s["chosen_w_histogram"]) == iterations
    assert sum(s["width_histogram"]) == s["verify_steps"] == sum(s["steps_per_row"])
    assert all(len(w) == n for w, n in zip(s["widths_per_row"], s["steps_per_row"]))
    # every step emits >= 1 token; a step at W accepts at most W - 1 drafts
    for acc, ws in zip(s["accepted_per_row"], s["widths_per_row"]):
        assert all(0 <= a <= w - 1 for a, w in zip(acc, ws))
    assert s["tokens_from_verify_steps"] == sum(n - 1 for n in result.num_generated)


def _probe_bound(iterations):
    """decoding/width.py: at most 1 + floor((S - 1) / (probe_every + 1)) probes in S steps."""
    return 1 + (iterations - 1) // (PROBE_EVERY + 1)


@pytest.mark.parametrize("name, continuous", [("lstm-heads", False), ("lookup", False),
                                              ("lookup", True)])
def test_auto_w_equals_greedy(setup, name, continuous):
    decoder, prompts, greedy = setup
    if name == "lookup":
        drafter, variables = LookupDrafter(K - 1), LookupDrafter.variables()
    else:
        head_config = HeadConfig(kind="lstm", k=K)
        head_params = init_head_params(make_head(head_config, CFG), decoder.params,
                                       jax.random.PRNGKey(5))
        drafter, variables = head_drafter(head_config, head_params, CFG, decoder.params)
    auto = decoder.replace(drafter=drafter, drafter_vars=variables,
                           tokens_per_step=AutoWidth(probe_every=PROBE_EVERY),
                           verify_cost={1: CPU_LIKE, 8: DEAR})
    if continuous:
        result = auto.generate_continuous(prompts, MAX_NEW, batch_size=3, bucket=BUCKET)
        between = VerifyCost({1: CPU_LIKE, 8: DEAR}).relative(3, K)   # B=3: interpolated
        assert result.stats["step_cost"] == pytest.approx(list(between))
    else:
        result = auto.generate(prompts, MAX_NEW, bucket=BUCKET)
        assert result.stats["step_cost"] == pytest.approx(list(DEAR.values()))
    _same_as_greedy(result, greedy)
    _check_width_stats(result)
    assert result.stats["step_cost_source"] == "given"
    assert result.stats["chosen_w_histogram"][K] >= 1          # the first step probes
    if name == "lookup":   # the lookup is right often enough here for W to change
        assert sum(1 for n in result.stats["chosen_w_histogram"] if n) >= 2


def _never_right(decoder, prompts, greedy, kind):
    """The decoder with auto W, costs DEAR (greedy's step 0.8 of a drafting W = 1 step: the
    drafting costs) and a drafter of `kind` (an OracleDrafter) whose every draft is wrong (the
    oracle's continuation, every token shifted)."""
    references = oracle_variables([t for t in greedy.tokens], [len(p) for p in prompts],
                                  len(prompts), K - 1)
    return decoder.replace(drafter=kind(K - 1, CFG.vocab_size, corrupt_prob=1.0),
                           drafter_vars=references,
                           tokens_per_step=AutoWidth(probe_every=PROBE_EVERY,
                                                     idle_probe_every=PROBE_EVERY),
                           verify_cost=VerifyCost(DEAR, greedy={1: 0.8 * DEAR[1]}))


def test_never_right_settles_at_one(setup):
    """Every draft wrong (the oracle's continuation, every token shifted) and W > 1 dear: every
    step but the probes runs at W = 1, so the run takes greedy's steps (each emits one token
    either way) and its cost is greedy's plus at most the bound's probes at W_max."""
    decoder, prompts, greedy = setup
    auto = _never_right(decoder, prompts, greedy, OracleDrafter)
    result = auto.generate(prompts, MAX_NEW, bucket=BUCKET)
    _same_as_greedy(result, greedy)
    _check_width_stats(result)
    steps, greedy_steps = result.num_steps - 1, greedy.num_steps - 1
    hist = result.stats["chosen_w_histogram"]
    probes = sum(hist[2:])
    assert hist[2] == hist[3] == 0 and probes == hist[K]       # only probes run above W = 1
    assert probes <= _probe_bound(steps)
    assert steps <= greedy_steps + _probe_bound(steps)
    cost = sum(n * DEAR[w] for w, n in enumerate(hist) if n)
    assert cost <= greedy_steps * DEAR[1] + _probe_bound(steps) * (DEAR[K] - DEAR[1])
    assert result.stats["offset_acceptance_estimate"]["2"] < 0.05
    assert result.stats["per_offset_acceptance"]["2"] < 0.05


DRAFT_CALLS = []


class _Counting:
    """A drafter mixin counting on the host each time its drafts are made (once per call)."""

    def draft_scored(self, variables, state, hidden, hidden_normed, positions, next_token):
        jax.debug.callback(lambda: DRAFT_CALLS.append(1))
        return super().draft_scored(variables, state, hidden, hidden_normed, positions,
                                    next_token)


@dataclasses.dataclass(frozen=True)
class CountingOracle(_Counting, OracleDrafter):
    """The oracle, counting its drafts."""


def test_no_drafting_while_nothing_could_be_verified(setup):
    """After a step at W = 1 the next drafts are made only if some step could verify them (a
    probe next, or drafting pays: decoding/width.py `drafting_pays`): a never-right drafter drafts
    at the prefill, at the probes and at the steps just before them, not at the other steps;
    the output is still greedy's."""
    decoder, prompts, greedy = setup
    auto = _never_right(decoder, prompts, greedy, CountingOracle)
    DRAFT_CALLS.clear()
    result = auto.generate(prompts, MAX_NEW, bucket=BUCKET)
    jax.effects_barrier()
    _same_as_greedy(result, greedy)
    hist = result.stats["chosen_w_histogram"]
    steps, probes = sum(hist), hist[K]
    assert hist[1] >= 2 * probes                       # mostly W = 1, as above
    assert len(DRAFT_CALLS) <= 1 + 2 * probes          # prefill; each probe and the step before
    assert len(DRAFT_CALLS) < steps / 2


def test_estimates_carry_to_the_next_batch(setup):
    """A decoder's next static batch at the same batch size starts from the last one's
    statistics (Decoder.width_memory, width.resume_width_stats): after a never-right drafter's
    first batch the second does not open with a probe at W_max; the output is still greedy's.
    The batch gate is off (with it on, the second batch would time greedy's loop instead)."""
    decoder, prompts, greedy = setup
    auto = _never_right(decoder, prompts, greedy, OracleDrafter).replace(gate_batches=False)
    first = auto.generate(prompts, MAX_NEW, bucket=BUCKET)
    n = len(prompts)
    assert [w[0] for w in first.stats["widths_per_row"]] == [K] * n        # a probe first
    assert n in auto.width_memory
    # (no probe due at the start: the cadence carries on too, and could fall on that step)
    auto.width_memory[n] = auto.width_memory[n].replace(since_full=jnp.array(0, jnp.int32))
    second = auto.generate(prompts, MAX_NEW, bucket=BUCKET)
    assert second.tokens == first.tokens == greedy.tokens
    assert [w[0] for w in second.stats["widths_per_row"]] == [1] * n       # carried on
    assert "drafter_rested" not in second.stats and second.stats["chosen_w_histogram"][K] >= 0
    assert sum(second.stats["chosen_w_histogram"]) == second.num_steps - 1
    assert not auto.replace(verify_cost=DEAR).width_memory               # a new decoder: none


class ScriptedClock(RateGate):
    """The rate gate with its seconds replaced (the real ones are this machine's noise): a
    greedy loop step costs 1 ms, prefill nothing, a batch with the drafter `slow` x greedy's
    time on its prompts. Keeps what the engine reported (rested, greedy steps)."""

    def __init__(self, slow: float, use_price: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.slow, self.use_price = slow, use_price
        self.reported, self.fresh, self.prices = [], [], []

    def record(self, batch, rested, prefill_seconds, decode_seconds, greedy_steps, padded_tokens,
               fresh=False, priced=None):
        self.reported.append((rested, greedy_steps))
        self.fresh.append(fresh)
        self.prices.append(priced)
        seconds = 1e-3 * greedy_steps * (1.0 if rested else self.slow)
        super().record(batch, rested, 0.0, seconds, greedy_steps, padded_tokens,   # not fresh
                       priced=priced if self.use_price else None)


def _gated_batches(setup, clock, n):
    """n static batches of the never-right counting oracle (idle_batches=2) through the rate
    gate `clock` -> (the decoder, each batch's result, the drafts each batch made)."""
    decoder, prompts, greedy = setup
    auto = _never_right(decoder, prompts, greedy, CountingOracle)
    auto = auto.replace(tokens_per_step=dataclasses.replace(auto.width_policy, idle_batches=2))
    auto.rate_gate = clock
    results, calls = [], []
    for _ in range(n):
        DRAFT_CALLS.clear()
        results.append(auto.generate(prompts, MAX_NEW, bucket=BUCKET))
        jax.effects_barrier()
        calls.append(len(DRAFT_CALLS))
    return auto, results, calls


def test_drafter_rests_while_drafting_is_slower(setup):
    """Static batches measured slower with the drafter than greedy's loop (decoding/rate_gate.py;
    a scripted clock: twice greedy's time): the first batch drafts, the second runs greedy's
    loop (greedy measured), the third drafts and closes the gate, the next idle_batches run
    greedy's loop: the drafter drafts nothing (counted), every step at W = 1, the result says it
    rested; the batch after them drafts again and probes first. Every output is greedy's, and
    the greedy steps the engine reports for each batch are greedy's own on those prompts."""
    decoder, prompts, greedy = setup
    auto, results, calls = _gated_batches(setup, ScriptedClock(2.0, idle_batches=2), 6)
    for r in results:
        _same_as_greedy(r, greedy)
        _check_width_stats(r)
    rested = [False, True, False, True, True, False]
    assert [r.stats["drafter_rested"] for r in results] == rested
    assert auto.rate_gate.reported == [(r, greedy.num_steps - 1) for r in rested]
    # compiled for the first drafting batch only: a rested batch runs greedy's loop with
    # greedy's shapes, on the executables the greedy decoder compiled for these prompts
    assert auto.rate_gate.fresh == [True, False, False, False, False, False]
    assert auto.greedy_executables is decoder.executables
    assert [c > 0 for c in calls] == [not r for r in rested]
    for r in results[3:5]:
        assert r.stats["chosen_w_histogram"][2:] == [0] * (K - 1)
        assert all(w == 1 for ws in r.stats["widths_per_row"] for w in ws)
    # after rests while the gate was closed: a probe first (not after greedy's timing batch)
    assert [w[0] for w in results[5].stats["widths_per_row"]] == [K] * len(prompts)
    assert results[2].stats["measured_speed"] == pytest.approx(0.5)
    assert not results[2].stats["rate_gate_open"] and results[5].stats["rate_gate_open"]


def test_drafter_keeps_drafting_while_faster(setup):
    """Measured faster than greedy (scripted: 0.8 x greedy's time): every batch drafts but the
    second and the one after remeasure_every drafting batches, which measure greedy."""
    decoder, prompts, greedy = setup
    auto = _never_right(decoder, prompts, greedy, OracleDrafter)
    auto.rate_gate = ScriptedClock(0.8, remeasure_every=2)
    rested = [auto.generate(prompts, MAX_NEW, bucket=BUCKET).stats["drafter_rested"]
              for _ in range(6)]
    assert rested == [False, True, False, False, True, False]


def test_priced_slower_rests_at_break_even_time(setup):
    """A never-right drafter whose batches the clock finds exactly as fast as greedy's (the
    timing test cannot close on that) is priced slower by the step cost table (DEAR, greedy's
    step 0.8 of a drafting step): the price closes the gate after two drafting batches (the
    first, freshly compiled, counts), as the timing would at 2x. The price is the batch's own
    W histogram at DEAR's costs, W = 1 steps that skipped drafting at greedy's 0.8, against
    greedy's loop steps at 0.8 (a hand count from the result's statistics)."""
    decoder, prompts, greedy = setup
    auto, results, calls = _gated_batches(
        setup, ScriptedClock(1.0, use_price=True, idle_batches=2), 4)
    for r in results:
        _same_as_greedy(r, greedy)
    assert [r.stats["drafter_rested"] for r in results] == [False, True, False, True]
    first, steps = results[0].stats, greedy.num_steps - 1
    hist, skipped = first["chosen_w_histogram"], first["skipped_drafting"]
    assert hist[1] - skipped == calls[0] - 1 - sum(hist[2:])   # W = 1 steps that drafted
    loop = sum(n * DEAR[w] for w, n in enumerate(hist) if n) - skipped * (DEAR[1] - 0.8)
    assert auto.rate_gate.prices[0] == (pytest.approx(0.8 * steps), pytest.approx(loop))
    assert auto.rate_gate.prices[1] is None                    # a rested batch has no price
    assert results[2].stats["priced_speed"] < 1.0 and results[2].stats["priced_batches"] == 2
    assert not results[2].stats["rate_gate_open"]
    assert results[2].stats["measured_speed"] == pytest.approx(1.0)


@dataclasses.dataclass(frozen=True)
class CountingRepeat(_Counting, RepeatDrafter):
    """RepeatDrafter (per-row state only: continuous batching takes it), counting its drafts."""


@pytest.mark.slow   # timed static and continuous runs
def test_continuous_rests_where_static_batches_measured_slower(setup):
    """Continuous batching at a batch size: drafts while its static batches are unmeasured,
    runs greedy's loop (no drafting, every step at W = 1, said in the result) once they measured
    drafting slower (a scripted clock: twice greedy's time); greedy's tokens either way."""
    decoder, prompts, greedy = setup
    auto = decoder.replace(drafter=CountingRepeat(K - 1),
                           tokens_per_step=AutoWidth(probe_every=PROBE_EVERY),
                           verify_cost={1: CPU_LIKE, 8: DEAR})
    auto.rate_gate = ScriptedClock(2.0)
    results, calls = [], []
    for static_batches in (0, 3):
        for _ in range(static_batches):                     # draft, greedy, draft: closed
            auto.generate(prompts[:4], MAX_NEW, bucket=BUCKET)
        DRAFT_CALLS.clear()
        results.append(auto.generate_continuous(prompts, MAX_NEW, batch_size=4, bucket=BUCKET))
        jax.effects_barrier()
        calls.append(len(DRAFT_CALLS))
    assert not auto.rate_gate.clocks[4].open
    assert calls[0] > 0 and calls[1] == 0
    assert [r.stats["drafter_rested"] for r in results] == [False, True]
    for r in results:
        _same_as_greedy(r, greedy)
        _check_width_stats(r)
    assert results[1].stats["chosen_w_histogram"][2:] == [0] * (K - 1)


def test_oracle_settles_at_max(setup):
    decoder, prompts, greedy = setup
    references = oracle_variables([t for t in greedy.tokens], [len(p) for p in prompts],
                                  len(prompts), K - 1)
    auto = decoder.replace(drafter=OracleDrafter(K - 1, CFG.vocab_size),
                           drafter_vars=references,
                           tokens_per_step=AutoWidth(probe_every=PROBE_EVERY), verify_cost=CHEAP)
    result = auto.generate(prompts, MAX_NEW, bucket=BUCKET)
    _same_as_greedy(result, greedy)
    _check_width_stats(result)
    hist = result.stats["chosen_w_histogram"]
    assert hist[K] == sum(hist) == result.num_steps - 1          # every step at W_max
    assert result.stats["offset_acceptance_estimate"]["2"] > 0.9


@pytest.mark.slow  # one compile per W for the calibration, then the loop's (~10 s CPU)
def test_measured_calibration(setup):
    """No table given: a short calibration of this decoder's step at the batch it runs (kept
    on the decoder, so the next call at that batch does not measure again)."""
    decoder, prompts, greedy = setup
    auto = decoder.replace(drafter=RepeatDrafter(K - 1), tokens_per_step="auto")
    assert auto.width_policy.max_width == K and auto.tokens_per_step == K
    result = auto.generate(prompts[:2], MAX_NEW, bucket=BUCKET)
    assert result.tokens == greedy.tokens[:2]
    assert result.stats["step_cost_source"] == "measured"
    costs = result.stats["step_cost"]
    assert len(costs) == K and costs[0] == 1.0 and costs == sorted(costs)
    assert 2 in auto.measured_cost and set(auto.measured_cost.seconds[2]) == set(range(1, K + 1))
    assert auto.measured_cost.greedy[2] > 0                   # greedy's step, the gate's yardstick
    assert result.stats["greedy_step_cost"] == pytest.approx(auto.measured_cost.greedy[2] /
                                                           auto.measured_cost.seconds[2][1])
    again = auto.generate(prompts[:2], MAX_NEW, bucket=BUCKET)
    assert again.stats["calibration_seconds"] < result.stats["calibration_seconds"]


def test_verify_cost_table(tmp_path):
    cost = VerifyCost({1: {1: 2.0, 2: 2.2, 4: 3.0}, 8: {1: 10.0, 2: 14.0, 4: 22.0, 8: 40.0}},
                      source="test")
    assert cost.relative(1, 4) == pytest.approx([1.0, 1.1, 1.3, 1.5])   # W=3 between 2 and 4
    assert cost.relative(1, 5) == pytest.approx([1.0, 1.1, 1.3, 1.5, 1.7])  # past 4: linear
    assert cost.relative(8, 4) == pytest.approx([1.0, 1.4, 1.8, 2.2])
    assert cost.relative(16, 2) == pytest.approx([1.0, 1.4])            # the nearest batch
    assert cost.relative(4, 2) == pytest.approx([1.0, 1.1 + 0.3 * 3 / 7])  # between 1 and 8
    noisy = VerifyCost({1: 1.0, 2: 0.9, 3: 1.2})                          # any batch
    assert noisy.relative(5, 3) == pytest.approx([1.0, 1.0, 1.2])       # never below a smaller W
    path = tmp_path / "cost.json"
    cost.save(path)
    loaded = VerifyCost.load(path)
    assert loaded.seconds == cost.seconds and loaded.source == "test"
    assert as_verify_cost(str(path)).seconds == cost.seconds
    assert as_verify_cost(cost.to_dict()).seconds == cost.seconds
    with pytest.raises(ValueError, match="W = 1"):
        VerifyCost({8: {2: 1.0}})
    with pytest.raises(ValueError, match="W = 1 only"):
        VerifyCost({1: 1.0}).relative(1, 2)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a verify cost table"):
        VerifyCost.load(tmp_path / "bad.json")
    # greedy's step (no drafting) beside the drafting steps: the gate's yardstick
    assert cost.greedy_relative(8) == 1.0                                 # none: W = 1's
    both = VerifyCost(cost.seconds, greedy={1: 1.6, 8: 9.0}, source="test")
    assert both.greedy_relative(1) == pytest.approx(0.8)
    assert both.greedy_relative(6) == pytest.approx(0.9)                  # the nearest batch
    both.save(path)
    assert VerifyCost.load(path).greedy == {1: 1.6, 8: 9.0}
    assert both.merged(VerifyCost({8: {1: 5.0, 2: 6.0}})).greedy == {1: 1.6}
    with pytest.raises(ValueError, match="greedy's step at batch 2"):
        VerifyCost(cost.seconds, greedy={2: 1.0})


def test_expected_tokens_and_stats_with_widths():
    assert np.asarray(expected_tokens(np.array([1.0, 0.5, 0.0]))).tolist() == [1, 2, 2.5, 2.5]
    # steps at W = 1, 4, 2, 4: offset 3 is reached only in the W = 4 steps that accepted 1
    stats = acceptance_stats([0, 3, 1, 1], [1, 4, 2, 2], 3, widths=[1, 4, 2, 4])
    assert stats["per_offset_acceptance"] == {"2": 1.0, "3": 0.5, "4": 1.0}
    assert stats["width_histogram"] == [0, 1, 1, 0, 2]


def test_auto_settings_are_checked(setup):
    decoder, _, _ = setup
    assert decoder.replace(tokens_per_step="auto").tokens_per_step == 1    # no drafter: greedy
    with pytest.raises(DecodingError, match="max_width"):
        decoder.replace(drafter=RepeatDrafter(K - 1), tokens_per_step=AutoWidth(max_width=K + 1))
    with pytest.raises(DecodingError, match="probe_every"):
        decoder.replace(drafter=RepeatDrafter(K - 1), tokens_per_step=AutoWidth(probe_every=0))
    with pytest.raises(DecodingError, match="'auto'"):
        decoder.replace(drafter=RepeatDrafter(K - 1), tokens_per_step="fast")
    narrow = decoder.replace(drafter=RepeatDrafter(K - 1), tokens_per_step=AutoWidth(max_width=2))
    assert narrow.tokens_per_step == 2
    assert narrow.replace(stop_ids=[3]).width_policy == narrow.width_policy   # kept by replace
