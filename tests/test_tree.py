"""Two drafts per offset verified in one call (decoding/tree.py): the tree mask gives each branch
the logits and hidden states of its own chain call; decoding with a tree of two drafters is
token-identical to greedy (batch 1 and 8, both paddings, continuous batching), keeps the better
branch per row (an oracle in either branch is accepted fully; two corrupted oracles accept more
than either alone), refuses auto W and rests where its batches are measured slower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mtp import (BUCKET, CFG, K, MAX_NEW, PAD, _assert_same_as_greedy, _continuations,  # noqa: F401
                      decoder, greedy, params, prompts, stop_ids)

from test_choose_w import ScriptedClock

from gptk_jax.decoding.engine import DecodingError
from gptk_jax.decoding.lookup import LookupDrafter
from gptk_jax.decoding.oracle import (OracleDrafter, RandomDrafter, RepeatDrafter,
                                      oracle_variables)
from gptk_jax.decoding.tree import TreeDrafter, branch_index, tree_mask
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama


def test_tree_mask_by_hand():
    m = tree_mask(3)     # root, a1, a2, b1, b2
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [1, 0, 0, 1, 0],
                         [1, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(m, expected)


def test_each_branch_sees_what_its_own_chain_call_sees(params):
    """One call over [root, a1..a3, b1..b3] with the tree mask = two chain calls [root, a..]
    and [root, b..] on the same cache (a prefix of 5 tokens in row 0, 3 in row 1)."""
    rng = np.random.RandomState(0)
    model = Llama(CFG)
    cache = KVCache.init(CFG, 2, 32)
    prefix = rng.randint(1, CFG.vocab_size, (2, 5)).astype(np.int32)
    mask = np.array([[1] * 5, [1] * 3 + [0] * 2], bool)
    out = model.apply({"params": params}, prefix, np.broadcast_to(np.arange(5), (2, 5)),
                      cache=cache, token_mask=mask)
    cache = out.cache.replace(lengths=jnp.array([5, 3], jnp.int32))
    start = np.array([5, 3])
    root = rng.randint(1, CFG.vocab_size, (2, 1))
    a, b = (rng.randint(1, CFG.vocab_size, (2, K - 1)) for _ in range(2))
    depth = np.concatenate([[0], np.arange(1, K), np.arange(1, K)])
    tree = model.apply({"params": params}, np.concatenate([root, a, b], 1).astype(np.int32),
                       start[:, None] + depth[None], cache=cache, tree_mask=tree_mask(K))
    for branch, cols in ((a, np.arange(K)), (b, np.concatenate([[0], np.arange(K, 2 * K - 1)]))):
        chain = model.apply({"params": params}, np.concatenate([root, branch], 1).astype(np.int32),
                            start[:, None] + np.arange(K)[None], cache=cache)
        np.testing.assert_allclose(np.asarray(tree.logits[:, cols]), np.asarray(chain.logits),
                                   atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(tree.hidden_normed[:, cols]),
                                   np.asarray(chain.hidden_normed), atol=1e-5, rtol=1e-5)


def _oracle(greedy_result, prompts, stop_ids, corrupt, seed):
    variables = oracle_variables(_continuations(greedy_result, stop_ids),
                                 [len(p) for p in prompts], len(prompts), K - 1, seed=seed)
    return OracleDrafter(K - 1, CFG.vocab_size, corrupt), variables


def _tree(first, second):
    (d1, v1), (d2, v2) = first, second
    return TreeDrafter(first=d1, second=d2, max_drafts=K - 1), TreeDrafter.variables(v1, v2)


@pytest.mark.parametrize("batch, padding", [(1, "left"), (8, "left"), (8, "right")])
@pytest.mark.parametrize("pair", ["lookup+oracle", "oracle+random", "noisy+noisy"])
def test_tree_decoding_equals_greedy(decoder, prompts, stop_ids, greedy, batch, padding, pair):
    reference = greedy[batch, padding]
    ps = prompts[:batch]
    lookup = (LookupDrafter(max_drafts=K - 1), LookupDrafter.variables())
    random = (RandomDrafter(K - 1, CFG.vocab_size), jax.random.PRNGKey(7))
    first, second = {
        "lookup+oracle": (lookup, _oracle(reference, ps, stop_ids, 0.0, 1)),
        "oracle+random": (_oracle(reference, ps, stop_ids, 0.0, 1), random),
        "noisy+noisy": (_oracle(reference, ps, stop_ids, 0.4, 1),
                        _oracle(reference, ps, stop_ids, 0.4, 2)),
    }[pair]
    drafter, variables = _tree(first, second)
    tree = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables,
                           tokens_per_step=K)
    result = tree.generate(ps, MAX_NEW, padding=padding, bucket=BUCKET)
    _assert_same_as_greedy(result, reference)
    stats = result.stats
    if pair != "noisy+noisy":   # an exact oracle in either branch: every draft accepted
        for b, accepted in enumerate(stats["accepted_per_row"]):
            assert accepted[:-1] == [K - 1] * (len(accepted) - 1)
    else:                       # the better of two: more than one corrupted oracle alone
        one, v = _oracle(reference, ps, stop_ids, 0.4, 1)
        alone = decoder.replace(stop_ids=stop_ids, drafter=one, drafter_vars=v,
                                tokens_per_step=K).generate(ps, MAX_NEW, padding=padding,
                                                            bucket=BUCKET)
        better, base = stats["mean_accepted_drafts"], alone.stats["mean_accepted_drafts"]
        # batch 1's row stops at its 7th token (test_mtp's stop id): two steps, a tie allowed
        assert better > base if batch == 8 else better >= base


def test_continuous_tree_decoding_equals_greedy(decoder, prompts, stop_ids, greedy):
    reference = greedy[8, "left"]
    # slots are refilled with other prompts: drafters that read only the sequence itself
    drafter, variables = _tree((LookupDrafter(max_drafts=K - 1), LookupDrafter.variables()),
                               (RepeatDrafter(K - 1), ()))
    tree = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables,
                           tokens_per_step=K)
    result = tree.generate_continuous(prompts, MAX_NEW, batch_size=3, bucket=BUCKET)
    _assert_same_as_greedy(result, reference)


def test_tree_refuses_auto_width(decoder):
    drafter = TreeDrafter(first=LookupDrafter(max_drafts=K - 1),
                          second=LookupDrafter(max_drafts=K - 1), max_drafts=K - 1)
    with pytest.raises(DecodingError, match="tree"):
        decoder.replace(drafter=drafter, drafter_vars=TreeDrafter.variables({}, {}),
                        tokens_per_step="auto")


def test_tree_batches_gated_by_measured_time(decoder, prompts, stop_ids, greedy):
    """gate_batches=True with a fixed-W tree (what choose_width gives a tree, factory.py): its
    static batches measured slower than greedy's loop (a scripted clock: twice greedy's time)
    rest, greedy's tokens throughout; continuous batching at that size then rests too. Off by
    default with a fixed W."""
    reference = greedy[8, "left"]
    drafter, variables = _tree((LookupDrafter(max_drafts=K - 1), LookupDrafter.variables()),
                               (RepeatDrafter(K - 1), ()))
    plain = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables,
                            tokens_per_step=K)
    assert not plain.gate_batches
    assert "drafter_rested" not in plain.generate(prompts, MAX_NEW, bucket=BUCKET).stats
    tree = plain.replace(gate_batches=True)
    tree.rate_gate = ScriptedClock(2.0, idle_batches=2)
    results = [tree.generate(prompts, MAX_NEW, bucket=BUCKET) for _ in range(4)]
    for r in results:
        _assert_same_as_greedy(r, reference)
    assert [r.stats["drafter_rested"] for r in results] == [False, True, False, True]
    assert {w for ws in results[0].stats["widths_per_row"] for w in ws} == {K}
    for r in (results[1], results[3]):         # rested: every step at W = 1, no draft missed
        assert {w for ws in r.stats["widths_per_row"] for w in ws} == {1}
        assert r.stats["width_histogram"][2:] == [0] * (K - 1)
    assert results[2].stats["measured_speed"] == pytest.approx(0.5)
    continuous = tree.generate_continuous(prompts, MAX_NEW, batch_size=len(prompts),
                                          bucket=BUCKET)
    _assert_same_as_greedy(continuous, reference)
    assert continuous.stats["drafter_rested"]


def test_tree_mask_and_chains_of_unequal_branches_by_hand():
    m = tree_mask(4, (3, 1))     # root, a1, a2, a3, b1; W = 4 (the longer branch + 1)
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0],
                         [1, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(m, expected)
    index, real = branch_index(4, (3, 1))
    np.testing.assert_array_equal(index, [[0, 1, 2, 3], [0, 4, 0, 0]])
    np.testing.assert_array_equal(real, [[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="longer must equal max_drafts"):
        TreeDrafter(first=LookupDrafter(max_drafts=3), second=LookupDrafter(max_drafts=1),
                    max_drafts=2, first_drafts=3, second_drafts=1)


def _oracle_n(greedy_result, prompts, stop_ids, drafts, corrupt=0.0, seed=1):
    variables = oracle_variables(_continuations(greedy_result, stop_ids),
                                 [len(p) for p in prompts], len(prompts), drafts, seed=seed)
    return OracleDrafter(drafts, CFG.vocab_size, corrupt), variables


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("longer", ["oracle", "random"])
def test_unequal_branches_equal_greedy_and_keep_the_better_one(decoder, prompts, stop_ids,
                                                                greedy, batch, longer):
    """A 5-draft branch and a 2-draft branch (W = 6, 8 tokens verified): token-identical to
    greedy; an exact oracle in the longer branch accepts all 5 drafts a step, in the shorter
    branch (the other one random) 2 a step: the chain past the shorter branch accepts nothing."""
    reference = greedy[batch, "left"]
    ps = prompts[:batch]
    long_n, short_n = 5, 2
    random = lambda n: (RandomDrafter(n, CFG.vocab_size), jax.random.PRNGKey(7))
    if longer == "oracle":
        (d1, v1), (d2, v2) = _oracle_n(reference, ps, stop_ids, long_n), random(short_n)
    else:
        (d1, v1), (d2, v2) = random(long_n), _oracle_n(reference, ps, stop_ids, short_n)
    drafter = TreeDrafter(first=d1, second=d2, max_drafts=long_n, first_drafts=long_n,
                          second_drafts=short_n)
    tree = decoder.replace(stop_ids=stop_ids, drafter=drafter,
                           drafter_vars=TreeDrafter.variables(v1, v2), tokens_per_step=long_n + 1)
    result = tree.generate(ps, MAX_NEW, bucket=BUCKET)
    _assert_same_as_greedy(result, reference)
    expected = long_n if longer == "oracle" else short_n
    for accepted in result.stats["accepted_per_row"]:
        assert accepted[:-1] == [expected] * (len(accepted) - 1)
