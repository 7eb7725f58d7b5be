"""Auto W with draft scores (decoding/width.py): the per-(offset, score bin) counts by hand, the
choice read from each row's own drafts, and on a tiny random trunk a drafter whose scores say
which drafts are right: the output is greedy's, the bins learn that high scores pass and low ones
fail, and the run costs less than the same drafts unscored."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.decoding import Decoder, DecodingError
from gptk_jax.decoding.oracle import OracleDrafter, oracle_variables
from gptk_jax.decoding.width import (AutoWidth, choose_width, drafting_pays,
                                     drafts_may_be_verified, init_width_stats,
                                     row_expected_tokens, score_bin, update_width_stats)
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import init_params, params_for_model

CFG = LlamaConfig(vocab_size=23, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0, max_seq_len=256)
K = 4
MAX_NEW = 24
DEAR = {1: 1.0, 2: 1.5, 3: 1.75, 4: 2.0}
# W > 1 dear enough that the half-wrong drafts do not pay unscored (the drafting gate of
# decoding/width.py then runs W = 1 mostly) and cheap enough that the scored ones do
MID = {1: 1.0, 2: 1.35, 3: 1.6, 4: 1.8}


def test_score_bins_by_hand():
    assert score_bin(jnp.array([0.0, 0.24, 0.25, 0.74, 0.99, 1.0]), 4).tolist() == \
        [0, 0, 1, 2, 3, 3]
    policy = AutoWidth(max_width=3, score_bins=2, prior=0.5, prior_weight=1.0, decay=0.5,
                       costs=(1.0, 1.5, 2.0))
    stats = init_width_stats(policy)                     # J=2 offsets x 2 bins, all 1 / 0.5
    # One step at W=3, two rows. Row 0: drafts scored (0.9, 0.8), both accepted. Row 1: drafts
    # scored (0.1, 0.9), the first rejected (so offset 3 is not reached for row 1).
    accepted = jnp.array([2, 0])
    scores = jnp.array([[0.9, 0.8], [0.1, 0.9]])
    new = update_width_stats(policy, stats, 3, accepted, jnp.array([True, True]), scores)
    # offset 2: bin 1 reached by row 0 (passed), bin 0 by row 1 (failed)
    # offset 3: bin 1 reached by row 0 (passed); bin 0 not seen (keeps its prior)
    np.testing.assert_allclose(new.reached_bins, [[0.5 + 1, 0.5 + 1], [1.0, 0.5 + 1]])
    np.testing.assert_allclose(new.passed_bins, [[0.25 + 0, 0.25 + 1], [0.5, 0.25 + 1]])
    np.testing.assert_allclose(new.reached, [0.5 + 2, 0.5 + 1])     # pooled, as before
    np.testing.assert_allclose(new.passed, [0.25 + 1, 0.25 + 1])
    # Per row expected tokens: p(offset 2, bin 1) = 1.25/1.5, p(offset 2, bin 0) = 0.25/1.5 ...
    table = np.asarray(new.passed_bins) / np.asarray(new.reached_bins)
    nxt = jnp.array([[0.9, 0.9], [0.1, 0.1]])
    e = np.asarray(row_expected_tokens(new, nxt))
    np.testing.assert_allclose(e[0], [1, 1 + table[0, 1], 1 + table[0, 1] + table[0, 1] *
                                      table[1, 1]], rtol=1e-6)
    np.testing.assert_allclose(e[1], [1, 1 + table[0, 0], 1 + table[0, 0] + table[0, 0] *
                                      table[1, 0]], rtol=1e-6)
    # The choice sums the active rows: confident row alone -> W = 3; unsure row alone -> W = 1.
    # (drafting pays here: the gate's measured value above its cost; the gate is tested below)
    stats = new.replace(since_full=jnp.array(0, jnp.int32), gate_open=jnp.array(True))
    assert int(choose_width(policy, stats, nxt, jnp.array([1.0, 0.0]))[0]) == 3
    assert int(choose_width(policy, stats, nxt, jnp.array([0.0, 1.0]))[0]) == 1
    # probing still forces W_max
    probing = stats.replace(since_full=jnp.array(policy.probe_every, jnp.int32))
    assert int(choose_width(policy, probing, nxt, jnp.array([0.0, 1.0]))[0]) == 3


def test_the_draft_after_the_verified_ones_counts_against_the_bonus_token():
    """A step at W = 2 of W_max = 4: offset 3's draft is checked against the step's bonus token
    (what a step at W = 3 would have accepted), so offset 3 counts too, in its score bin; offset
    4 does not. Where the step's drafts were not made (stale), only the verified offset counts."""
    policy = AutoWidth(max_width=4, score_bins=2, prior=0.5, prior_weight=1.0, decay=0.5,
                       costs=(1.0, 1.1, 1.2, 1.3))
    stats = init_width_stats(policy)                    # 3 offsets x 2 bins, all 1 / 0.5
    # Row 0: d2 accepted, d3 equals the bonus token (accepted_beyond 2). Row 1: d2 accepted,
    # d3 differs (1). Row 2: d2 rejected (0: offset 3 not reached).
    accepted, beyond = jnp.array([1, 1, 0]), jnp.array([2, 1, 0])
    scores = jnp.array([[0.9, 0.9, 0.9], [0.9, 0.1, 0.9], [0.1, 0.1, 0.1]])
    active = jnp.array([True, True, True])
    new = update_width_stats(policy, stats, 2, accepted, active, scores, accepted_beyond=beyond)
    # offset 2: bin 1 reached by rows 0, 1 (both passed), bin 0 by row 2 (failed)
    np.testing.assert_allclose(new.reached_bins[0], [0.5 + 1, 0.5 + 2])
    np.testing.assert_allclose(new.passed_bins[0], [0.25 + 0, 0.25 + 2])
    # offset 3: reached by rows 0 (bin 1, passed) and 1 (bin 0, failed)
    np.testing.assert_allclose(new.reached_bins[1], [0.5 + 1, 0.5 + 1])
    np.testing.assert_allclose(new.passed_bins[1], [0.25 + 0, 0.25 + 1])
    np.testing.assert_allclose(new.reached, [0.5 + 3, 0.5 + 2, 1.0])    # offset 4 untouched
    np.testing.assert_allclose(new.passed, [0.25 + 2, 0.25 + 1, 0.5])
    # the same step with stale drafts: offset 3 keeps its prior
    stale = update_width_stats(policy, stats.replace(drafted=jnp.array(False)), 2, accepted,
                               active, scores, accepted_beyond=beyond)
    np.testing.assert_allclose(stale.reached, [0.5 + 3, 1.0, 1.0])
    np.testing.assert_allclose(stale.passed, [0.25 + 2, 0.5, 0.5])
    # a step at W = 1 learns offset 2 from its bonus token alone
    one = update_width_stats(policy, stats, 1, jnp.array([0, 0, 0]), active, scores,
                             accepted_beyond=jnp.array([1, 0, 0]))
    np.testing.assert_allclose(one.reached, [0.5 + 3, 1.0, 1.0])
    np.testing.assert_allclose(one.passed, [0.25 + 1, 0.5, 0.5])
    # at W = W_max there is no draft beyond: as without it
    top = update_width_stats(policy, stats, 4, jnp.array([3, 0, 1]), active, scores,
                             accepted_beyond=jnp.array([3, 0, 1]))
    ref = update_width_stats(policy, stats, 4, jnp.array([3, 0, 1]), active, scores)
    np.testing.assert_allclose(top.reached, ref.reached)
    np.testing.assert_allclose(top.passed_bins, ref.passed_bins)


@dataclasses.dataclass(frozen=True)
class ScoredOracle(OracleDrafter):
    """The corrupted oracle's drafts, scored 1 where a draft is the true continuation, else 0."""

    def draft_scored(self, variables, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        drafts = self.draft(variables, state, last_hidden, last_hidden_normed, last_position,
                            next_token)
        clean = OracleDrafter(self.max_drafts, self.vocab_size).draft(
            variables, state, last_hidden, last_hidden_normed, last_position, next_token)
        return drafts, (drafts == clean).astype(jnp.float32)


@pytest.fixture(scope="module")
def setup():
    params = params_for_model(init_params(CFG, jax.random.PRNGKey(11)), CFG)
    rs = np.random.RandomState(5)
    prompts = [rs.randint(1, CFG.vocab_size, n).tolist() for n in (4, 9, 6, 11)]
    decoder = Decoder(CFG, params, stop_ids=[], pad_id=0)
    greedy = decoder.generate(prompts, MAX_NEW, bucket=8)
    refs = oracle_variables(list(greedy.tokens), [len(p) for p in prompts], len(prompts), K - 1,
                            seed=3)
    return decoder, prompts, greedy, refs


@pytest.mark.parametrize("batch_size", [1, 4])
def test_scores_steer_width(setup, batch_size):
    decoder, prompts, greedy, refs = setup
    policy = AutoWidth(probe_every=8)
    if batch_size == 1:   # the oracle's references are per row: the first prompt alone
        prompts, greedy_tokens = prompts[:1], greedy.tokens[:1]
        refs = oracle_variables(greedy_tokens, [len(prompts[0])], 1, K - 1, seed=3)
    else:
        greedy_tokens = greedy.tokens
    runs = {}
    for name, drafter in [("scored", ScoredOracle(K - 1, CFG.vocab_size, corrupt_prob=0.5)),
                          ("unscored", OracleDrafter(K - 1, CFG.vocab_size, corrupt_prob=0.5))]:
        auto = decoder.replace(drafter=drafter, drafter_vars=refs, tokens_per_step=policy,
                               verify_cost=MID)
        runs[name] = auto.generate(prompts, MAX_NEW, bucket=8)
        assert runs[name].tokens == greedy_tokens
    cost = lambda r: sum(n * MID[w] for w, n in enumerate(r.stats["chosen_w_histogram"]) if n)
    scored, unscored = runs["scored"], runs["unscored"]
    bins = scored.stats["acceptance_by_score_bin"]["2"]
    weight = scored.stats["score_bin_weight"]["2"]
    assert weight[0] > 1 and weight[-1] > 1            # both kinds of drafts were verified
    # right drafts pass, wrong ones fail: one wrong verify moves bin 0 from its prior 0.5 to
    # 0.45 / 1.9 = 0.24 (decay 0.9)
    assert bins[-1] > 0.9 and bins[0] <= 0.25
    assert unscored.stats["score_bin_weight"]["2"][:-1] == [1.0] * 7   # top bin only: priors
    hist = scored.stats["chosen_w_histogram"]
    assert hist[1] > 0 and sum(hist[2:]) > 0           # the scores move W both ways
    assert cost(scored) < cost(unscored)


def test_score_bins_checked(setup):
    decoder, _, _, refs = setup
    with pytest.raises(DecodingError, match="score_bins"):
        decoder.replace(drafter=OracleDrafter(K - 1, CFG.vocab_size), drafter_vars=refs,
                        tokens_per_step=AutoWidth(score_bins=0))


def test_drafting_gate_measures_what_drafting_brought():
    """The drafting gate (decoding/width.py `drafting_pays`) by hand: each step whose drafts
    were made adds the tokens per row its choice W* emitted (known at a probe too) and W*'s cost
    in greedy steps; while the decayed sums say greedy's step is better, W = 1 whatever the
    drafts' scores, no drafting after a W = 1 step, the next probe after idle_probe_every
    steps; a step whose drafts were not made runs at W = 1 and adds nothing."""
    policy = AutoWidth(max_width=3, score_bins=2, prior=0.5, prior_weight=1.0, decay=0.5,
                       gate_decay=0.5, probe_every=4, idle_probe_every=10, close_margin=0.0,
                       costs=(1.0, 1.2, 1.5), greedy_cost=1.0)
    four = jnp.ones(4, bool)
    at = lambda st, n: st.replace(since_full=jnp.array(n, jnp.int32))
    # prior: E(W) = 1, 1.5, 1.75 at acceptance 0.5; per cost 1, 1.25, 1.17 -> W* = 2, 1.5
    # tokens at 1.2 greedy steps: drafting pays
    stats = init_width_stats(policy)
    assert int(stats.choice) == 2 and int(stats.next_width) == 3          # the first step probes
    np.testing.assert_allclose([stats.gate_value, stats.gate_cost], [1.5, 1.2])
    assert bool(drafting_pays(policy, stats))
    # a probe at W = 3, four rows, row 0 accepted both drafts: W* = 2 would have emitted
    # 2 + 1 + 1 + 1 = 5 tokens, 1.25 a row, at 1.2
    low = jnp.array([[0.1, 0.1]] * 4)
    stats = update_width_stats(policy, stats, 3, jnp.array([2, 0, 0, 0]), four, low, low, four)
    np.testing.assert_allclose([stats.gate_value, stats.gate_cost],
                               [0.5 * 1.5 + 1.25, 0.5 * 1.2 + 1.2])
    assert bool(drafting_pays(policy, stats))                             # 2.0 > 1.8
    # a step at W = 2 (its choice) where nothing was accepted: 1 token a row at 1.2
    before_miss = stats.replace(choice=jnp.array(2, jnp.int32))
    stats = update_width_stats(policy, stats.replace(choice=jnp.array(2, jnp.int32)), 2,
                               jnp.zeros(4, jnp.int32), four, low, low, four)
    np.testing.assert_allclose([stats.gate_value, stats.gate_cost], [2.0, 0.5 * 1.8 + 1.2])
    assert not bool(drafting_pays(policy, stats))                         # 2.0 < 2.1
    # with a hysteresis band of 10 % the open gate stays open (2.0 >= 0.9 x 2.1) ...
    banded = dataclasses.replace(policy, close_margin=0.1)
    kept = update_width_stats(banded, before_miss, 2, jnp.zeros(4, jnp.int32), four, low, low,
                              four)
    assert bool(drafting_pays(banded, kept))
    # ... and a closed one opens only above the cost
    shut = kept.replace(gate_open=jnp.array(False), gate_value=jnp.array(1.0),
                        gate_cost=jnp.array(1.0))
    assert not bool(drafting_pays(banded, update_width_stats(
        banded, shut.replace(choice=jnp.array(1, jnp.int32)), 2, jnp.zeros(4, jnp.int32), four,
        low, low, four)))                                                  # 1.5 / 1.5: no
    assert bool(drafting_pays(banded, update_width_stats(
        banded, shut.replace(choice=jnp.array(2, jnp.int32)), 2, jnp.ones(4, jnp.int32), four,
        low, low, four)))                                                  # 2.5 / 1.7: yes
    # now: W = 1 whatever the scores (W* still reads them), no drafting after a W = 1 step, and
    # the next probe after idle_probe_every steps, not probe_every
    confident = jnp.array([[0.95, 0.95]] * 4)
    settled = at(stats, 1)
    width, best = choose_width(policy, settled, confident, four)
    assert int(width) == 1 and int(best) >= 1
    assert not bool(drafts_may_be_verified(policy, settled))
    assert not bool(drafts_may_be_verified(policy, at(stats, policy.probe_every - 1)))
    assert bool(drafts_may_be_verified(policy, at(stats, policy.idle_probe_every - 1)))
    assert int(choose_width(policy, at(stats, policy.probe_every), confident, four)[0]) == 1
    assert int(choose_width(policy, at(stats, policy.idle_probe_every), confident, four)[0]) == 3
    # drafts not made: W = 1 even when a probe is due, and that step adds no evidence
    undrafted = at(stats, policy.idle_probe_every).replace(drafted=jnp.array(False))
    assert int(choose_width(policy, undrafted, confident, four)[0]) == 1
    after = update_width_stats(policy, undrafted, 1, jnp.zeros(4, jnp.int32), four, low,
                               confident, four, drafted=jnp.array(True))
    np.testing.assert_allclose([after.gate_value, after.gate_cost],
                               [stats.gate_value, stats.gate_cost])
    assert bool(after.drafted)
    # a step forced below its choice W* = 2 (drafting off) tells nothing either
    forced = update_width_stats(policy, settled.replace(choice=jnp.array(2, jnp.int32)), 1,
                                jnp.zeros(4, jnp.int32), four, low, low, four)
    np.testing.assert_allclose(forced.gate_value, stats.gate_value)
    # every draft right at a probe, W* = 3: 3 tokens a row at 1.5 against W = 1's cost pays;
    # against a greedy step that costs 0.4 of W = 1 (dear drafting) it costs 3.75 and does not
    fresh = init_width_stats(policy).replace(choice=jnp.array(3, jnp.int32))
    right = update_width_stats(policy, fresh, 3, jnp.full(4, 2), four, confident, confident, four)
    assert bool(drafting_pays(policy, right))
    dear = dataclasses.replace(policy, greedy_cost=0.4)
    wrong = update_width_stats(dear, init_width_stats(dear).replace(choice=jnp.array(3, jnp.int32)),
                               3, jnp.full(4, 2), four, confident, confident, four)
    np.testing.assert_allclose(wrong.gate_cost, 0.5 * float(init_width_stats(dear).gate_cost)
                               + 1.5 / 0.4, rtol=1e-6)
    assert not bool(drafting_pays(dear, wrong))


def test_a_wider_step_must_beat_one_token_by_min_gain():
    """choose_width counts each cost(W > 1) min_gain dearer: pooled acceptance 0.6 at offset 2
    and 0 beyond gives E = (1, 1.6, 1.6); at cost(2) = 1.5, W = 2 is 1.6 / 1.5 = 1.067 tokens per
    cost against W = 1's 1.0, so it is chosen with a gain margin under 6.7 % and not above."""
    def pick(min_gain):
        policy = AutoWidth(max_width=3, score_bins=1, prior=0.6, prior_weight=1.0,
                           costs=(1.0, 1.5, 2.0), min_gain=min_gain)
        stats = init_width_stats(policy).replace(
            passed=jnp.array([0.6, 0.0]), since_full=jnp.array(0, jnp.int32),
            gate_open=jnp.array(True))
        return [int(x) for x in choose_width(policy, stats)]
    assert pick(0.0) == [2, 2]
    assert pick(0.05) == [2, 2]
    assert pick(0.08) == [1, 1]


def test_min_gain_is_checked():
    with pytest.raises(DecodingError, match="min_gain"):
        Decoder(CFG, params_for_model(init_params(CFG, jax.random.PRNGKey(0)), CFG),
                stop_ids=[], pad_id=0, drafter=OracleDrafter(K - 1, CFG.vocab_size),
                tokens_per_step=AutoWidth(min_gain=1.5))
