"""Training with a softmax over a draft vocabulary (loss.draft_vocab_size, training/vocab.py):
the restricted loss by hand, the vocabulary of the training rows by hand, its trip through the
heads folder and evaluation's choice, and a tiny run that writes it."""

import dataclasses
import importlib
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _train_helpers import HAND_ALL, hand_batch, tiny_trunk, with_fields  # noqa: F401

from gptk_jax.heads import HeadConfig, make_head, shifted_next_tokens
from gptk_jax.heads.io import VOCAB_FILE, HeadsError, load_heads, save_heads
from gptk_jax.llama.model import Llama
from gptk_jax.training import ConfigKeyError, RunSettings, train_and_evaluate
from gptk_jax.training import step as step_lib
from gptk_jax.training.metrics import summarize_eval, summarize_train
from gptk_jax.training.vocab import DraftVocab, training_draft_vocab, vocab_sha256


# the draft vocabulary: gold targets 20, 22, 23 in it; 21, 24, 12 (t+o = 2 of row 0) outside
VOCAB = (22, 5, 20, 100, 23, 7)


# --------------------------------------------------------------------------------------------
# The restricted loss, by hand
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,chunk,groups", [("linear", 0, 1), ("linear", 3, 1),
                                               ("linear", 4, 2), ("lstm", 3, 1)])
def test_restricted_loss_is_log_softmax_over_the_vocab_columns(tiny_trunk, kind, chunk, groups):
    """loss = -log_softmax(full logits[..., U])[target's column], summed over the supervised
    entries whose target is in U; those outside are counted (oov), not scored, and never a top-1
    hit; the objective is the weighted mean over the scored entries. Evaluation: the same sums,
    an outside target a miss for top-1 and the drafts."""
    trunk_config, trunk_params = tiny_trunk
    if kind == "lstm":
        head_config = HeadConfig(kind="lstm", recipe="conditioned", k=3, offsets=(1, 2, 3),
                                 lstm_layers=1, lstm_dropout=0.0)
    else:
        head_config = HeadConfig(kind="linear", k=3, offsets=(1, 2, 3))
    head = make_head(head_config, trunk_config)
    batch = hand_batch()
    out = Llama(trunk_config).apply({"params": trunk_params}, batch["tokens"], batch["positions"],
                                    token_mask=batch["token_mask"])
    feats = step_lib._features(batch, out.hidden, out.hidden_normed,
                               shifted_next_tokens(jnp.asarray(batch["tokens"]), 3))
    params = head.init(jax.random.PRNGKey(0), trunk_params, feats,
                       method=head.train_logits)["params"]
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(x.size),
                                                                 x.shape), params)
    full = head.apply({"params": params}, trunk_params, feats, method=head.train_logits)
    restricted = np.asarray(jax.nn.log_softmax(np.asarray(full)[..., list(VOCAB)], -1))
    expected_sum, expected_count, expected_oov = np.zeros(3), np.zeros(3), np.zeros(3)
    expected_top1 = np.zeros(3)
    for b, t, o in HAND_ALL:
        target = int(batch["tokens"][b, t + o])
        expected_count[o - 1] += 1
        if target not in VOCAB:
            expected_oov[o - 1] += 1
            continue
        expected_sum[o - 1] -= restricted[b, t, o - 1, VOCAB.index(target)]
        expected_top1[o - 1] += VOCAB[int(np.argmax(restricted[b, t, o - 1]))] == target
    assert expected_oov.sum() > 0 and (expected_count - expected_oov).sum() > 0

    cfg = step_lib.StepConfig(trunk_config=trunk_config, head_config=head_config, targets="gold",
                              offset_weights=(2.0, 1.0, 1.0), first_target_tokens_only=False,
                              positions_per_row=8, argmax_chunk=3, position_chunk=chunk,
                              pack_groups=groups, draft_vocab=VOCAB)
    tx = optax.sgd(0.0)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), head_params=params,
                                opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
    _, metrics = jax.jit(lambda s, p, b: step_lib.train_step(cfg, tx, s, p, b))(
        state, trunk_params, batch)
    metrics = jax.tree.map(np.asarray, metrics)
    np.testing.assert_allclose(metrics["count"], expected_count)
    np.testing.assert_allclose(metrics["oov"], expected_oov)
    np.testing.assert_allclose(metrics["loss_sum"], expected_sum, rtol=1e-5)
    np.testing.assert_allclose(metrics["top1"], expected_top1)
    means = expected_sum / (expected_count - expected_oov)
    np.testing.assert_allclose(metrics["objective"], (2 * means[0] + means[1] + means[2]) / 4,
                               rtol=1e-5)
    summary = summarize_train([metrics], (1, 2, 3))
    assert summary["oov_fraction"] == pytest.approx(expected_oov.sum() / expected_count.sum())
    np.testing.assert_allclose([summary[f"loss_o{o}"] for o in (1, 2, 3)], means, rtol=1e-5)

    # evaluation against the gold tokens: the same restricted loss, outside targets misses
    cfg_gold_eval = dataclasses.replace(cfg, targets="gold")
    sums = jax.tree.map(np.asarray, jax.jit(lambda h, p, b: step_lib.eval_step(
        cfg_gold_eval, h, p, b))(params, trunk_params, batch))
    np.testing.assert_allclose(sums["loss_gold"], expected_sum, rtol=1e-5)
    np.testing.assert_allclose(sums["oov_gold"], expected_oov)
    np.testing.assert_allclose(sums["top1_gold"], expected_top1)
    summary = summarize_eval(sums, (1, 2, 3))
    np.testing.assert_allclose([summary[f"loss_gold_o{o}"] for o in (1, 2, 3)], means,
                               rtol=1e-5)
    assert summary["oov_fraction_gold"] == pytest.approx(expected_oov.sum() /
                                                         expected_count.sum())


def test_drafts_outside_the_vocab_are_misses(tiny_trunk):
    """eval_step's draft metrics with a vocabulary that holds none of the trunk's argmax
    targets: no draft is accepted, whatever the logits."""
    trunk_config, trunk_params = tiny_trunk
    head_config = HeadConfig(kind="linear", k=3, offsets=(2, 3))
    batch = hand_batch()
    out = Llama(trunk_config).apply({"params": trunk_params}, batch["tokens"], batch["positions"],
                                    token_mask=batch["token_mask"])
    argmax = set(np.asarray(jnp.argmax(out.logits, -1)).ravel().tolist())
    vocab = tuple(i for i in range(trunk_config.vocab_size) if i not in argmax)[:8]
    params = {"proj": jnp.zeros((2, 32, 32))}
    sums = {}
    for name, draft_vocab in (("full", ()), ("none", vocab)):
        cfg = step_lib.StepConfig(trunk_config=trunk_config, head_config=head_config,
                                  targets="trunk_argmax", offset_weights=(1.0, 1.0),
                                  first_target_tokens_only=False, positions_per_row=8,
                                  argmax_chunk=8, position_chunk=4, draft_vocab=draft_vocab)
        sums[name] = jax.tree.map(np.asarray, step_lib.eval_step(cfg, params, trunk_params,
                                                                  batch))
    assert sums["none"]["draft_count"].sum() > 0
    assert sums["none"]["draft_top1"].sum() == 0 and sums["none"]["top1_trunk"].sum() == 0
    np.testing.assert_allclose(sums["none"]["oov_trunk"], sums["none"]["count"])
    assert "oov_trunk" not in sums["full"]


# --------------------------------------------------------------------------------------------
# The vocabulary of the training rows
# --------------------------------------------------------------------------------------------

class _Tokenizer:
    """vocab 12; id 9 decodes to a newline (a stop token), 11 is the stop id."""
    vocab_size = 12
    stop_ids = (11,)

    def decode(self, ids):
        return "".join("\n" if i == 9 else chr(65 + i) for i in ids)


def test_vocabulary_of_the_training_rows_by_hand():
    row = lambda tokens, prompt_len: types.SimpleNamespace(
        tokens=np.asarray(tokens, np.int32), prompt_len=prompt_len)
    rows = [row([1, 2, 3, 4, 4, 5, 11], 3),    # prompt 1 2 3 (not counted)
            row([3, 3, 3, 5, 6, 6, 11], 3),
            row([2, 7, 4, 7, 11], 1)]
    # target counts: 4:3, 5:2, 6:2, 7:2, 11:3, 3:0 (prompt only)  -> stops (9, 11) first, then
    # 4 (3), then 5, 6, 7 (2 each, by id)
    assert training_draft_vocab(rows, _Tokenizer(), 5) == (9, 11, 4, 5, 6)
    assert training_draft_vocab(rows, _Tokenizer(), 6) == (9, 11, 4, 5, 6, 7)
    with pytest.raises(ValueError, match="fewer than"):
        training_draft_vocab(rows, _Tokenizer(), 7)


def test_draft_vocab_remap():
    vocab = DraftVocab((7, 2, 5), 10)
    local, in_vocab = vocab.remap(jnp.array([[5, 3], [7, 2]]))
    np.testing.assert_array_equal(local, [[2, 0], [0, 1]])
    np.testing.assert_array_equal(in_vocab, [[True, False], [True, True]])
    np.testing.assert_array_equal(vocab.to_global(jnp.array([2, 0])), [5, 7])
    w = jnp.arange(30.0).reshape(10, 3)
    np.testing.assert_array_equal(vocab.rows(w, True), w[jnp.array([7, 2, 5])])
    np.testing.assert_array_equal(vocab.rows(w.T, False), w.T[:, jnp.array([7, 2, 5])])
    with pytest.raises(ValueError):
        DraftVocab((1, 1), 10)


def test_soft_targets_with_a_draft_vocab_is_a_clear_error():
    config = importlib.import_module("configs.tiny").get_config()
    config.loss.targets = "trunk_soft"
    config.loss.draft_vocab_size = 16
    with pytest.raises(ConfigKeyError, match="draft_vocab_size"):
        RunSettings.from_config(config)
    config.loss.draft_vocab_size = 0                    # 0: the whole vocabulary
    assert RunSettings.from_config(config).loss.draft_vocab_size is None


# --------------------------------------------------------------------------------------------
# Heads folder and evaluation
# --------------------------------------------------------------------------------------------

def test_heads_folder_round_trips_the_vocabulary(tmp_path, tiny_trunk):
    trunk_config, _ = tiny_trunk
    head_config = HeadConfig(kind="linear", k=3, offsets=(2, 3))
    params = {"proj": np.zeros((2, 32, 32), np.float32)}
    ids = (9, 4, 200, 7)
    out = save_heads(tmp_path / "heads", head_config, params, trunk_config, "tiny",
                     draft_vocab={"ids": list(ids), "source": "hand"})
    meta = json.loads((out / "heads.json").read_text())
    assert meta["draft_vocab"] == {"file": VOCAB_FILE, "size": 4, "sha256": vocab_sha256(ids)}
    loaded = load_heads(out, trunk_config, "tiny")
    assert loaded.draft_vocab == ids
    assert loaded.draft_vocab_record["source"] == "hand"
    # heads without one: None
    plain = load_heads(save_heads(tmp_path / "plain", head_config, params, trunk_config, "tiny"),
                       trunk_config, "tiny")
    assert plain.draft_vocab is None
    # a changed id is refused
    record = json.loads((out / VOCAB_FILE).read_text())
    record["ids"][0] = 10
    (out / VOCAB_FILE).write_text(json.dumps(record))
    with pytest.raises(HeadsError, match="sha256"):
        load_heads(out, trunk_config, "tiny")
    with pytest.raises(HeadsError, match="distinct"):
        save_heads(tmp_path / "bad", head_config, params, trunk_config, "tiny",
                   draft_vocab=[1, 1])


def test_evaluation_uses_the_heads_vocabulary_unless_the_flag_is_given(tmp_path, capsys):
    from gptk_jax.evaluation import pipeline
    heads = types.SimpleNamespace(draft_vocab=(3, 1, 2), path=tmp_path,
                                  draft_vocab_record={"sha256": "abc"})
    cfg = types.SimpleNamespace(draft_vocab_size=None, draft_vocab_from=None)
    ids, path = pipeline.draft_vocabulary(cfg, None, True, heads)
    assert ids == (3, 1, 2) and path == tmp_path / VOCAB_FILE
    assert "the heads' own" in capsys.readouterr().out
    assert pipeline.draft_vocabulary(cfg, None, True, None) == (None, None)
    text = tmp_path / "text.en"
    text.write_text("a b\n")

    class Tok:
        vocab_size, stop_ids = 5, (4,)

        def encode(self, text, bos=False):
            return [1 if c == "a" else 2 if c == "b" else 3 for c in text]

        def decode(self, ids):
            return "x"
    flag = types.SimpleNamespace(draft_vocab_size=2, draft_vocab_from=str(text))
    ids, path = pipeline.draft_vocabulary(flag, Tok(), False, heads)
    assert ids == (4, 1) and str(path) == str(text)


# --------------------------------------------------------------------------------------------
# A tiny run
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear"])
def test_tiny_run_with_a_draft_vocab_writes_it(tmp_path, kind):
    config = with_fields(importlib.import_module("configs.tiny").get_config(kind), {
        "data.max_train_pairs": 16, "data.eval_max_sentences": 4,
        "training.global_batch_size": 4, "training.num_train_steps": 2,
        "training.checkpoint_every_steps": 0, "loss.targets": "trunk_argmax",
        "loss.draft_vocab_size": 24})
    result = train_and_evaluate(config, tmp_path, progress=False)
    assert result["status"] == "completed" and result["step"] == 2
    assert np.isfinite(result["train"]["loss"])
    assert 0.0 <= result["train"]["oov_fraction"] < 1.0
    assert 0.0 <= result["eval"]["oov_fraction_trunk"] <= 1.0
    loaded = load_heads(tmp_path / "heads")
    assert loaded.draft_vocab is not None and len(loaded.draft_vocab) == 24
    record = json.loads((tmp_path / "heads" / VOCAB_FILE).read_text())
    assert record["size"] == 24 and record["sha256"] == vocab_sha256(loaded.draft_vocab)
    assert json.loads((tmp_path / "heads" / "heads.json").read_text())[
        "metadata"]["config"]["loss"]["draft_vocab_size"] == 24
