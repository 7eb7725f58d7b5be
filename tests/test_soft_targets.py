"""Soft targets (loss.targets='trunk_soft', training/soft_targets.py): the soft cross-entropy
by hand, one-hot teachers give the hard loss, train_step's soft loss against numpy over the
trunk's own logits at t+o-1 for every family (packed and per row), the fused chunked gradient,
and the offset weights 0.8^(o-1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _train_helpers import HAND_ALL, hand_batch, tiny_trunk, with_fields  # noqa: F401

from gptk_jax.heads import HeadConfig, make_head, shifted_next_tokens
from gptk_jax.llama.model import Llama
from gptk_jax.training import step as step_lib
from gptk_jax.training.settings import ConfigKeyError, RunSettings
from gptk_jax.training.soft_targets import chunked_soft_cross_entropy, soft_cross_entropy
from gptk_jax.training.chunked_loss import chunked_cross_entropy


def test_soft_cross_entropy_by_hand():
    logits = np.array([1.0, 2.0, 3.0])
    teacher = np.array([0.0, np.log(2.0), 0.0])          # p = (1/4, 1/2, 1/4)
    log_q = logits - np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))
    want = -(0.25 * log_q[0] + 0.5 * log_q[1] + 0.25 * log_q[2])
    # by hand: logsumexp = 3 + log(1 + e^-1 + e^-2) = 3.40760596, sum p*s = 2.0
    assert want == pytest.approx(1.40760596, rel=1e-6)
    got = soft_cross_entropy(jnp.asarray(logits), jnp.asarray(teacher))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_one_hot_teacher_gives_the_hard_loss():
    rs = np.random.RandomState(0)
    logits = rs.randn(3, 4, 11).astype(np.float32)
    targets = rs.randint(0, 11, (3, 4))
    teacher = np.where(np.arange(11) == targets[..., None], 0.0, -1e9).astype(np.float32)
    np.testing.assert_allclose(soft_cross_entropy(logits, teacher),
                               step_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(targets)),
                               rtol=1e-6)


def test_chunked_soft_equals_chunked_hard_for_one_hot_teachers():
    """w = identity (V = D, tied): logits are h; a teacher h of 1e4 * onehot(target) is a
    one-hot distribution, so loss, top-1 and gradient equal the hard fused loss."""
    rs = np.random.RandomState(1)
    z, y, c, j, d = 3, 2, 4, 2, 8
    w = jnp.eye(d)
    h = jnp.asarray(rs.randn(z, y, c, j, d).astype(np.float32))
    targets = jnp.asarray(rs.randint(0, d, (z, y, c, j)))
    mask = jnp.asarray(rs.rand(z, y, c, j) < 0.6).at[1].set(False)      # chunk 1 skipped
    teacher_h = 1e4 * jax.nn.one_hot(targets, d)
    soft = lambda h: chunked_soft_cross_entropy(True, w, h, teacher_h, targets, mask)
    hard = lambda h: chunked_cross_entropy(True, w, h, targets, mask)
    for got, want in zip(soft(h), hard(h)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    weights = jnp.array([0.7, 0.3])
    g_soft = jax.grad(lambda h: jnp.sum(weights * soft(h)[0]))(h)
    g_hard = jax.grad(lambda h: jnp.sum(weights * hard(h)[0]))(h)
    np.testing.assert_allclose(g_soft, g_hard, atol=1e-6)
    assert np.abs(g_soft).max() > 0 and np.all(np.asarray(g_soft)[1] == 0)




def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _randomized(params, seed, std=0.3):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


HEADS = {"linear": HeadConfig("linear", k=3, offsets=(1, 2, 3)),
         "poma": HeadConfig("poma", k=3, offsets=(1, 2, 3), poma_max_positions=16),
         "lstm-conditioned": HeadConfig("lstm", k=3, offsets=(1, 2, 3), recipe="conditioned",
                                        lstm_layers=1, lstm_dropout=0.0),
         "lstm-default": HeadConfig("lstm", k=3, offsets=(1, 2, 3), lstm_layers=1,
                                    lstm_dropout=0.0)}


def _setup(tiny_trunk, name):
    from gptk_jax.heads import init_head_params
    trunk_config, trunk_params = tiny_trunk
    head_config = HEADS[name]
    head = make_head(head_config, trunk_config)
    head_params = _randomized(init_head_params(head, trunk_params, jax.random.PRNGKey(3)), 4)
    return trunk_config, trunk_params, head_config, head, head_params


def _cfg(trunk_config, head_config, chunk, groups):
    return step_lib.StepConfig(trunk_config=trunk_config, head_config=head_config,
                               targets="trunk_soft", offset_weights=(1.0, 0.8, 0.64),
                               first_target_tokens_only=False, positions_per_row=8,
                               argmax_chunk=3, position_chunk=chunk, pack_groups=groups)


def _one_step(cfg, head_params, trunk_params, batch, lr):
    tx = optax.sgd(lr)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), head_params=head_params,
                                opt_state=tx.init(head_params), rng=jax.random.PRNGKey(0))
    return jax.jit(lambda s, p, b: step_lib.train_step(cfg, tx, s, p, b))(
        state, trunk_params, batch)


@pytest.mark.parametrize("name,chunk,groups,cached", [
    ("linear", 3, 2, True), ("poma", 4, 1, True), ("lstm-conditioned", 0, 1, False),
    ("lstm-default", 0, 1, True)])
def test_soft_loss_is_against_the_trunk_distribution_at_t_plus_o_minus_1(tiny_trunk, name, chunk,
                                                                        groups, cached):
    """Expected sums from numpy over the trunk's own logits (its forward, not the loss code's
    recomputation) and the head's logits; cached: the batch carries only the field the head
    reads (PoMa, the conditioned LSTM: 'hidden'; so the teacher's hidden_normed is recomputed)."""
    trunk_config, trunk_params, head_config, head, head_params = _setup(tiny_trunk, name)
    batch = hand_batch()
    out = jax.jit(Llama(trunk_config).apply)({"params": trunk_params}, batch["tokens"],
                                             batch["positions"], token_mask=batch["token_mask"])
    trunk_argmax = np.asarray(jnp.argmax(out.logits, -1))
    feats = step_lib._features(batch, out.hidden, out.hidden_normed,
                               step_lib.argmax_targets(jnp.asarray(trunk_argmax), 3))
    head_logp = _log_softmax(jax.jit(lambda hp, tp, f: head.apply(
        {"params": hp}, tp, f, method=head.train_logits))(head_params, trunk_params, feats))
    trunk_p = np.exp(_log_softmax(out.logits))                              # [B,T,V]
    expected = np.zeros(3)
    for b, t, o in HAND_ALL:
        expected[o - 1] -= np.sum(trunk_p[b, t + o - 1] * head_logp[b, t, o - 1])
    if cached:
        field = head_config.trunk_field
        batch = {**batch, field: np.asarray(getattr(out, field)), "trunk_argmax": trunk_argmax}
    _, metrics = _one_step(_cfg(trunk_config, head_config, chunk, groups), head_params,
                           trunk_params, batch, 0.0)
    np.testing.assert_allclose(metrics["loss_sum"], expected, rtol=2e-5)
    np.testing.assert_allclose(metrics["count"], [5, 5, 4])
    means = expected / np.array([5, 5, 4])
    np.testing.assert_allclose(metrics["objective"],
                               (means[0] + 0.8 * means[1] + 0.64 * means[2]) / 2.44, rtol=2e-5)


@pytest.mark.parametrize("name", ["lstm-conditioned"])
def test_packed_soft_update_equals_the_per_row_update(tiny_trunk, name):
    """The fused chunked gradient (custom vjp) gives the update autodiff gives per row."""
    trunk_config, trunk_params, head_config, _, head_params = _setup(tiny_trunk, name)
    batch = hand_batch()
    new = {}
    for chunk in (0, 3):
        state, _ = _one_step(_cfg(trunk_config, head_config, chunk, 1), head_params,
                             trunk_params, batch, 0.5)
        new[chunk] = state.head_params
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(new[0]),
                                                 jax.tree.leaves(head_params))]
    assert max(moved) > 1e-4
    for a, b in zip(jax.tree.leaves(new[0]), jax.tree.leaves(new[3])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_head_reading_hidden_refuses_a_cache_of_hidden_normed_only(tiny_trunk):
    # PoMa reads the state before the final norm (the conditioned LSTM no longer does)
    trunk_config, trunk_params, head_config, _, head_params = _setup(tiny_trunk, "poma")
    assert head_config.trunk_field == "hidden"
    batch = hand_batch()
    batch["hidden_normed"] = np.zeros((2, 8, trunk_config.dim), np.float32)
    with pytest.raises(step_lib.TrainingError, match="holds only 'hidden_normed'"):
        _one_step(_cfg(trunk_config, head_config, 4, 1), head_params, trunk_params, batch, 0.0)


def test_offset_weight_decay():
    from configs import tiny
    settings = RunSettings.from_config(with_fields(tiny.get_config(), {
        "head.offsets": (1, 2, 3), "loss.offset_weight_decay": 0.8, "loss.targets": "trunk_soft"}))
    assert settings.offset_weights == pytest.approx((1.0, 0.8, 0.64))
    assert RunSettings.from_config(tiny.get_config()).offset_weights == (1.0, 1.0)
    with pytest.raises(ConfigKeyError, match="not both"):
        RunSettings.from_config(with_fields(tiny.get_config(), {
            "loss.offset_weight_decay": 0.8, "loss.offset_weights": (1.0, 1.0)}))
    with pytest.raises(ConfigKeyError, match="targets must be one of"):
        RunSettings.from_config(with_fields(tiny.get_config(), {"loss.targets": "soft"}))
