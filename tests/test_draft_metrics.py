"""The validation metric on distilled rows (training/draft_metrics.py, what the trainer's
'eval_distilled' split reports) equals a hand count on a tiny case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.data.prompts import shift_targets
from gptk_jax.training.draft_metrics import (chain_lengths, draft_positions, draft_sums,
                                             summarize_drafts, walk)
from gptk_jax.training.metrics import summarize_eval

OFFSETS = (2, 3, 4)     # K = 4: three drafts


def tiny_case():
    """Two rows of 8 positions. Row 0: prompt of 2 tokens, 6 target tokens (positions 2..7).
    Row 1: prompt of 3, 3 target tokens (3..5), then padding.

    Row 0 drafts at t where t+1 is a target (t >= 1) and t+4 is inside the row (t <= 3):
    t = 1, 2, 3. Row 1 would need t >= 2 and t + 4 <= 5: none.
    Hits (offset 2, 3, 4) at row 0's draft positions, set by hand:
        t=1: 1 1 0     chain 1 1 0
        t=2: 0 1 1     chain 0 0 0
        t=3: 1 0 1     chain 1 0 0
    every other position hits everywhere (it must not count)."""
    loss_mask = np.zeros((2, 8), bool)
    loss_mask[0, 2:8] = True
    loss_mask[1, 3:6] = True
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    _, target_mask = shift_targets(tokens, loss_mask, 4, fill_id=0)          # [2,8,4]
    targets = np.full((2, 8, 3), 7, np.int32)
    predictions = targets.copy()
    miss = {(1, 2), (2, 0), (3, 1)}              # (t, column) of the misses in row 0
    for t, column in miss:
        predictions[0, t, column] = 8
    return predictions, targets, target_mask


def test_draft_positions_by_hand():
    _, _, target_mask = tiny_case()
    positions = draft_positions(target_mask, OFFSETS)
    expected = np.zeros((2, 8), bool)
    expected[0, [1, 2, 3]] = True
    np.testing.assert_array_equal(positions, expected)


def test_hand_count():
    predictions, targets, target_mask = tiny_case()
    sums = draft_sums(predictions, targets, draft_positions(target_mask, OFFSETS), OFFSETS)
    np.testing.assert_array_equal(sums["draft_count"], [3, 3, 3])
    np.testing.assert_array_equal(sums["draft_top1"], [2, 2, 2])   # columns of the table
    np.testing.assert_array_equal(sums["draft_chain"], [2, 1, 0])
    summary = summarize_drafts(sums, OFFSETS)
    assert summary["draft_positions"] == 3
    for o in OFFSETS:
        assert summary[f"accept_o{o}"] == pytest.approx(2 / 3)
    assert summary["chain_o2"] == pytest.approx(2 / 3)
    assert summary["chain_o3"] == pytest.approx(1 / 3)
    assert summary["chain_o4"] == 0.0
    assert summary["tau_est"] == pytest.approx(1 + 2 / 3 + 1 / 3 + 0)   # = 2.0


def test_walked_tau_by_hand():
    """Row 0 of the tiny case keeps 2, 0, 1 drafts at t = 1, 2, 3: decoding verifies at t = 1
    (3 tokens) and its span covers t = 2, 3; row 1 has no draft position: 1 step, 3 tokens."""
    predictions, targets, target_mask = tiny_case()
    sums = draft_sums(predictions, targets, draft_positions(target_mask, OFFSETS), OFFSETS)
    np.testing.assert_array_equal(sums["walk_steps"], [1, 1, 1])
    np.testing.assert_array_equal(sums["walk_tokens"], [3, 3, 3])
    assert summarize_drafts(sums, OFFSETS)["tau_walked"] == 3.0


# one sequence of 9 entries: kept drafts where a step would keep them; the last 2 are not draft
# positions (a row's end). Steps at n = 0 (keeps 1: passes n=1), 2 (0), 3 (0), 4 (3: passes
# 5, 6, 7): 4 steps, 2 + 1 + 1 + 4 = 8 tokens, and nothing still covered at the end.
KEPT = np.array([[1, 2, 0, 0, 3, 1, 0, 2, 2]])
POSITIONS = np.array([[True] * 7 + [False] * 2])


def test_walk_by_hand_whole_and_split():
    steps, tokens, skip = walk(KEPT, POSITIONS)
    assert (steps.tolist(), tokens.tolist(), skip.tolist()) == ([4], [8], [0])
    first = walk(KEPT[:, :5], POSITIONS[:, :5])               # split after n = 4: 3 still
    assert (first[0].tolist(), first[1].tolist(), first[2].tolist()) == ([4], [8], [3])
    rest = walk(KEPT[:, 5:], POSITIONS[:, 5:], first[2])      # covered, so no step in the rest
    assert (rest[0].tolist(), rest[1].tolist()) == ([0], [0])
    jitted = jax.jit(walk)(jnp.asarray(KEPT), jnp.asarray(POSITIONS),
                           jnp.zeros((1,), jnp.int32))
    assert [int(x[0]) for x in jitted] == [4, 8, 0]


def test_chain_lengths_count_hits_in_a_row_from_offset_two():
    hit = np.array([[True, True, False], [False, True, True], [True, False, True],
                    [True, True, True]])
    assert chain_lengths(hit, OFFSETS).tolist() == [2, 0, 1, 3]
    assert chain_lengths(hit, (4, 2, 3)).tolist() == [1, 2, 0, 3]   # columns o4, o2, o3


def test_jit_and_batches_add_up():
    """Under jit (as eval_step runs it), row by row and summed: the same counts."""
    predictions, targets, target_mask = tiny_case()
    fn = jax.jit(lambda p, t, m: draft_sums(p, t, draft_positions(m, OFFSETS), OFFSETS))
    whole = jax.device_get(fn(jnp.asarray(predictions), jnp.asarray(targets),
                              jnp.asarray(target_mask)))
    rows = [jax.device_get(fn(predictions[i:i + 1], targets[i:i + 1], target_mask[i:i + 1]))
            for i in range(2)]
    for key in whole:
        np.testing.assert_array_equal(whole[key], rows[0][key] + rows[1][key])
    np.testing.assert_array_equal(whole["draft_chain"], [2, 1, 0])


def test_offset_one_and_order():
    """A trained offset 1 (the trunk's own token) is not a draft: its columns are 0 and the
    chain runs over offsets 2, 3 in increasing order whatever the column order."""
    offsets = (3, 1, 2)
    pred = np.array([[5, 0, 5], [5, 9, 6], [6, 9, 5]])        # [N=3, J]: columns o3, o1, o2
    tgt = np.full((3, 3), 5)
    pos = np.array([True, True, True])
    sums = draft_sums(pred, tgt, pos, offsets)
    # o2 hits at rows 0, 2; o3 at rows 0, 1; chain o2->o3: row 0 only
    np.testing.assert_array_equal(sums["draft_top1"], [2, 0, 2])
    np.testing.assert_array_equal(sums["draft_chain"], [1, 0, 2])
    summary = summarize_drafts(sums, offsets)
    assert summary["tau_est"] == pytest.approx(1 + 2 / 3 + 1 / 3)
    assert "accept_o1" not in summary


def test_summarize_eval_reports_them():
    predictions, targets, target_mask = tiny_case()
    sums = draft_sums(predictions, targets, draft_positions(target_mask, OFFSETS), OFFSETS)
    total = {"count": np.array([4.0, 4.0, 4.0]), "top1_trunk": np.array([2.0, 2.0, 2.0]),
             "top1_gold": np.array([1.0, 1.0, 1.0]), **sums}
    out = summarize_eval(total, OFFSETS)
    assert out["tau_est"] == pytest.approx(2.0)
    assert out["chain_o3"] == pytest.approx(1 / 3)
    assert "draft_top1_o2" not in out
    assert out["top1_trunk_o2"] == 0.5
    assert out["acceptance_trunk"] == pytest.approx(1 + 0.5 + 0.25 + 0.125)


# --------------------------------------------------------------------------------------------
# The trainer's validation split 'eval_distilled'
# --------------------------------------------------------------------------------------------

def test_trainer_reports_eval_distilled(tmp_path):
    """A tiny run whose 'distilled' file is the reference itself: eval_distilled scores the same
    rows with the same targets as eval, so every figure agrees; both splits carry the draft
    figures, in metrics.jsonl too; the validation rows get a feature cache of their own."""
    import importlib

    from configs import base
    from gptk_jax.training import read_metrics, train_and_evaluate
    from tests._train_helpers import with_fields

    config = with_fields(importlib.import_module("configs.tiny").get_config(), {
        "data.max_train_pairs": 16, "data.eval_prefix": f"{base.WMT}/newstest2013",
        "data.eval_line_range": (2701, 2712), "data.eval_max_sentences": None,
        "data.eval_target_file": f"{base.WMT}/newstest2013.en",
        "training.global_batch_size": 4, "training.num_train_steps": 2,
        "features.cache": True, "features.build_batch_size": 4, "head.k": 4})
    result = train_and_evaluate(config, tmp_path, progress=False)
    ref, distilled = result["eval"], result["eval_distilled"]
    assert distilled is not None and set(ref) == set(distilled)
    for key in ref:
        assert distilled[key] == pytest.approx(ref[key], nan_ok=True), key
    assert distilled["draft_positions"] > 0
    assert 1.0 <= distilled["tau_est"] <= 4.0
    assert distilled["tau_est"] == pytest.approx(
        1 + distilled["chain_o2"] + distilled["chain_o3"] + distilled["chain_o4"])
    assert distilled["chain_o3"] <= distilled["chain_o2"]
    rows = read_metrics(tmp_path / "metrics.jsonl", "eval_distilled")
    assert rows and rows[-1]["step"] == 2 and "tau_est" in rows[-1]
    # train rows, validation rows (the 'distilled' rows are the same: the same cache)
    assert len(list((tmp_path / "feature_cache").iterdir())) == 2


def test_no_reference_split_when_eval_reference_is_off(tmp_path):
    """data.eval_reference=False: the run validates on the distilled rows only (no split 'eval'
    in the result or in metrics.jsonl), as `make demo` does."""
    import importlib

    from configs import base
    from gptk_jax.training import read_metrics, train_and_evaluate
    from tests._train_helpers import with_fields

    config = with_fields(importlib.import_module("configs.tiny").get_config(), {
        "data.max_train_pairs": 16, "data.eval_prefix": f"{base.WMT}/newstest2013",
        "data.eval_line_range": (2701, 2712), "data.eval_max_sentences": None,
        "data.eval_target_file": f"{base.WMT}/newstest2013.en", "data.eval_reference": False,
        "training.global_batch_size": 4, "training.num_train_steps": 2,
        "features.cache": False, "head.k": 4})
    result = train_and_evaluate(config, tmp_path, progress=False)
    assert result.get("eval") is None and result["eval_distilled"]["draft_positions"] > 0
    assert read_metrics(tmp_path / "metrics.jsonl", "eval") == []
    assert read_metrics(tmp_path / "metrics.jsonl", "eval_distilled")[-1]["step"] == 2
