"""Hand-computed acceptance counting (decoding/acceptance.py): K = 4 tokens per step, so each
row has 3 drafts for offsets 2..4 and the trunk's argmax after each of the 4 verify inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.decoding.acceptance import accept_step, accepted_length, summarize
from gptk_jax.decoding.inputs import stop_id_array

TRUNK = [5, 6, 7, 8]  # the trunk's own tokens after next_token, d2, d3, d4


def _step(drafts, trunk, num_emitted, *, max_new=100, stop_ids=(), active=None):
    drafts, trunk = np.atleast_2d(drafts), np.atleast_2d(trunk)
    b = drafts.shape[0]
    active = np.ones(b, bool) if active is None else np.asarray(active)
    out = accept_step(jnp.asarray(drafts, jnp.int32), jnp.asarray(trunk, jnp.int32),
                      jnp.asarray(np.broadcast_to(num_emitted, (b,)), jnp.int32),
                      jnp.asarray(active), max_new_tokens=max_new,
                      stop_ids=stop_id_array(stop_ids))
    return (np.asarray(out.accepted).tolist(), np.asarray(out.emitted).tolist(),
            np.asarray(out.finished).tolist())


@pytest.mark.parametrize("drafts, accepted", [
    ([5, 6, 7], 3),   # all accepted: 3 drafts + bonus 8
    ([9, 6, 7], 0),   # first rejected: later matches do not count
    ([5, 9, 7], 1),   # partial
    ([5, 6, 9], 2),
])
def test_accepted_prefix_plus_bonus(drafts, accepted):
    assert _step(drafts, TRUNK, 0) == ([accepted], [accepted + 1], [False])
    assert int(accepted_length(jnp.asarray([drafts]), jnp.asarray([TRUNK]))[0]) == accepted


def test_stop_id_inside_accepted_block_cuts_after_it():
    # all 3 drafts accepted, but 6 (emitted 2nd) is a stop id: emit 5, 6 and finish
    assert _step([5, 6, 7], TRUNK, 0, stop_ids=[6]) == ([3], [2], [True])


def test_stop_id_as_bonus_token():
    # d2 accepted, d3 rejected: the bonus is the trunk's 6, a stop id
    assert _step([5, 9, 9], TRUNK, 0, stop_ids=[6]) == ([1], [2], [True])


def test_stop_id_past_the_emitted_tokens_is_ignored():
    # 7 and 8 are the trunk's tokens after rejected drafts: never emitted, so no stop
    assert _step([5, 9, 9], TRUNK, 0, stop_ids=[7, 8]) == ([1], [2], [False])


def test_token_limit_inside_block():
    # 8 emitted of 10: 4 would be emitted, only 2 fit
    assert _step([5, 6, 7], TRUNK, 8, max_new=10) == ([3], [2], [True])
    # exactly fills the limit
    assert _step([5, 6, 7], TRUNK, 6, max_new=10) == ([3], [4], [True])
    # one short of the limit, partial acceptance
    assert _step([5, 9, 7], TRUNK, 7, max_new=10) == ([1], [2], [False])


def test_limit_before_a_stop_id():
    # stop id 8 would be the 4th token, but only 3 fit: finished by the limit
    assert _step([5, 6, 7], TRUNK, 7, max_new=10, stop_ids=[8]) == ([3], [3], [True])


def test_inactive_rows_emit_nothing():
    assert _step([[5, 6, 7], [5, 6, 7]], [TRUNK, TRUNK], 0, active=[True, False]) == \
        ([3, 3], [4, 0], [False, False])


def test_rows_finish_at_different_steps():
    """Three rows over three steps with K=4, max_new=9, stop id 2; each row starts with the one
    token the prefill emitted."""
    steps = [  # (drafts [3,3], trunk [3,4])
        ([[5, 6, 7], [5, 9, 9], [9, 9, 9]], [[5, 6, 7, 8], [5, 2, 7, 8], [1, 1, 1, 1]]),
        ([[1, 1, 1], [1, 1, 1], [1, 1, 9]], [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 3, 3]]),
        ([[1, 1, 1], [1, 1, 1], [3, 3, 3]], [[1, 1, 1, 1], [0, 0, 0, 0], [3, 3, 2, 4]]),
    ]
    emitted_total = np.ones(3, np.int32)
    done = np.zeros(3, bool)
    log = []
    for drafts, trunk in steps:
        acc, emitted, finished = _step(drafts, trunk, emitted_total, max_new=9, stop_ids=[2],
                                       active=~done)
        emitted_total += np.asarray(emitted)
        done |= np.asarray(finished)
        log.append((emitted, done.tolist()))
    # row 0: 4 (all accepted), then 4 more would make 9 > 9? 1+4=5, +4 -> 9: limit at step 2
    # row 1: bonus 2 at step 1 is a stop id -> done after 2 tokens
    # row 2: 1, then 3 (two drafts accepted), then 3 (accepted 2: 3, 3, then bonus 2 = stop)
    assert log == [([4, 2, 1], [False, True, False]),
                   ([4, 0, 3], [True, True, False]),
                   ([0, 0, 3], [True, True, True])]
    assert emitted_total.tolist() == [9, 3, 8]


def test_summarize_hand_computed():
    # two rows, K=4: row 0 ran 3 steps (accepted 3, 1, 0), row 1 one step (accepted 0)
    accepted = np.array([[3, 0], [1, -1], [0, -1]])
    emitted = np.array([[4, 1], [2, -1], [1, -1]])
    s = summarize(accepted, emitted, num_drafts=3)
    assert s["verify_steps"] == 4
    assert s["tokens_from_verify_steps"] == 8
    assert s["tau"] == 2.0
    assert s["accepted_histogram"] == [2, 1, 0, 1]
    # offset 2 reached in 4 steps, passed in 2; offset 3 reached 2, passed 1; offset 4: 1 of 1
    assert s["per_offset_acceptance"] == {"2": 0.5, "3": 0.5, "4": 1.0}
    assert s["steps_per_row"] == [3, 1]
    assert s["accepted_per_row"] == [[3, 1, 0], [0]]
    assert s["emitted_per_row"] == [[4, 2, 1], [1]]
