"""MTP heads on a tiny random trunk: wiring against the trunk's own logits, the LSTM against a
naive numpy re-run from zero (the original code's way), decoding against training, frozen trunk.

Letters: B batch, T positions, J offsets, K tokens per step, D width, V vocab.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.heads import (RECIPES, HeadConfig, HeadConfigError, HeadFeatures,
                            init_head_params, make_head, seed_config, shifted_next_tokens)
from gptk_jax.llama.model import Llama, init_params, params_for_model

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0)
B, T = 2, 7


@pytest.fixture(scope="module")
def trunk_params():
    """Random trunk whose final norm scale is not all ones (so 'copied from the trunk' is
    distinguishable from 'ones'); loop layout, as Llama(CFG) reads it."""
    params = jax.jit(lambda rng: init_params(CFG, rng))(jax.random.PRNGKey(0))
    scale = 1.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(5), (CFG.dim,))
    params = {**params, "norm": {"scale": scale}}
    return params_for_model(params, CFG)


@pytest.fixture(scope="module")
def trunk(trunk_params):
    """Tokens, positions and the trunk's full forward over them."""
    tokens = np.random.RandomState(1).randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    out = jax.jit(Llama(CFG).apply)({"params": trunk_params}, jnp.asarray(tokens),
                                    jnp.asarray(positions))
    return tokens, positions, out


def _feats(trunk, k, next_tokens=None, positions=None, token_mask=None):
    tokens, pos, out = trunk
    return HeadFeatures(
        hidden=out.hidden, hidden_normed=out.hidden_normed,
        positions=jnp.asarray(pos if positions is None else positions), tokens=jnp.asarray(tokens),
        token_mask=jnp.ones((B, T), bool) if token_mask is None else jnp.asarray(token_mask),
        next_tokens=shifted_next_tokens(jnp.asarray(tokens), k) if next_tokens is None
        else jnp.asarray(next_tokens))


def _randomize(params, seed, std=0.3):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def _build(head_config, trunk_params, seed=1, randomize=False):
    head = make_head(head_config, CFG)
    params = jax.jit(init_head_params, static_argnums=0)(head, trunk_params,
                                                         jax.random.PRNGKey(seed))
    return head, _randomize(params, seed + 100) if randomize else params


_JITTED = {}


def _run(head, method, hp, tp, *args, **closed):
    """head.apply under jit (one compile per head, method and shapes instead of many eager ops:
    keeps the tests fast); keyword arguments (deterministic, rngs, gather_index) are closed over."""
    key = (id(head), method) if not closed else None
    if key not in _JITTED:
        fn = jax.jit(lambda hp, tp, *a: head.apply({"params": hp}, tp, *a, method=method,
                                                   **closed))
        if key is None:
            return fn(hp, tp, *args)
        _JITTED[key] = (head, fn)  # keeps head alive, so its id is not reused
    return _JITTED[key][1](hp, tp, *args)


def _draft(head, hp, tp, state, trunk, next_token):
    _, _, out = trunk
    return _run(head, "draft_logits", hp, tp, state, out.hidden[:, -1], out.hidden_normed[:, -1],
                jnp.full((B,), T - 1, jnp.int32), jnp.asarray(next_token))


# --- numpy reference: the LSTM re-run from zero over the whole prefix --------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_lstm_last_output(lstm_params, inputs):
    """inputs [S,D] -> top-layer output after the last input, every layer started from zero."""
    xs = np.asarray(inputs, np.float64)
    for name in sorted(lstm_params):  # layer_0, layer_1, ...
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), lstm_params[name])
        c = h = np.zeros(xs.shape[-1])
        outs = []
        for x in xs:
            gate = {g: x @ p["i" + g]["kernel"] + h @ p["h" + g]["kernel"] + p["h" + g]["bias"]
                    for g in "ifgo"}
            c = _sigmoid(gate["f"]) * c + _sigmoid(gate["i"]) * np.tanh(gate["g"])
            h = _sigmoid(gate["o"]) * np.tanh(c)
            outs.append(h)
        xs = np.stack(outs)
    return xs[-1]


def _np_trunk_logits(tp, y):
    y = np.asarray(y, np.float64)
    normed = y / np.sqrt(np.mean(y * y) + CFG.norm_eps) * np.asarray(tp["norm"]["scale"])
    return normed @ np.asarray(tp["output"]["kernel"])


# --- LSTM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [HeadConfig("lstm", k=4), seed_config("lstm", k=4)],
                         ids=["default", "seed"])
def test_lstm_steps_from_context_state_equal_rerun_from_zero(trunk_params, trunk, config):
    head, hp = _build(config, trunk_params, randomize=True)
    tokens, _, out = trunk
    state = head.apply({"params": hp}, trunk_params, B, method=head.init_state)
    state = _run(head, "advance", hp, trunk_params, state, out.hidden_normed,
                       jnp.ones((B, T), bool))
    next_token = np.array([5, 9], np.int32)
    draft_tokens, draft_logits = _draft(head, hp, trunk_params, state, trunk, next_token)

    embedding = np.asarray(trunk_params["tok_embeddings"]["embedding"])
    if config.recipe == "seed":    # the head's own Dense(V, bias)
        w = hp["vocab_proj"]
        project = lambda y: y @ np.asarray(w["kernel"]) + np.asarray(w["bias"])
    else:
        project = lambda y: _np_trunk_logits(trunk_params, y)
    for b in range(B):
        context = np.asarray(out.hidden_normed[b])
        if config.recipe == "seed":    # the head's own offset-1 argmax
            first = int(np.argmax(project(_np_lstm_last_output(hp["lstm"], context))))
        else:
            first = int(next_token[b])
        fed = [first]
        for j in range(config.k - 1):  # offset j + 2, re-run from zero over the whole prefix
            prefix = np.concatenate([context, embedding[fed]], axis=0)
            expected = project(_np_lstm_last_output(hp["lstm"], prefix))
            np.testing.assert_allclose(draft_logits[b, j], expected, atol=2e-5, rtol=1e-5)
            assert int(draft_tokens[b, j]) == int(np.argmax(expected))
            fed.append(int(draft_tokens[b, j]))


def test_lstm_ragged_advance_equals_per_row(trunk_params, trunk):
    head, hp = _build(HeadConfig("lstm"), trunk_params, randomize=True)
    _, _, out = trunk
    mask = np.array([[1, 1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 1, 0, 0]], bool)
    state0 = head.apply({"params": hp}, trunk_params, B, method=head.init_state)
    state0 = _run(head, "advance", hp, trunk_params, state0, out.hidden_normed[:, :2],
                        jnp.ones((B, 2), bool))  # a non-zero start
    ragged = _run(head, "advance", hp, trunk_params, state0, out.hidden_normed, mask)
    for b in range(B):
        row_state = jax.tree.map(lambda x: x[b:b + 1], state0)
        kept = out.hidden_normed[b:b + 1, np.flatnonzero(mask[b])]
        row = _run(head, "advance", hp, trunk_params, row_state, kept,
                         jnp.ones(kept.shape[:2], bool))
        for got, want in zip(jax.tree.leaves(ragged), jax.tree.leaves(row)):
            np.testing.assert_allclose(got[b], want[0], atol=1e-6)
    nothing = _run(head, "advance", hp, trunk_params, state0, out.hidden_normed,
                         np.zeros((B, T), bool))
    for got, want in zip(jax.tree.leaves(nothing), jax.tree.leaves(state0)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config", [HeadConfig("lstm", k=4), seed_config("lstm", k=4)],
                         ids=["teacher", "argmax"])
def test_lstm_draft_equals_train_logits_on_the_drafted_tokens(trunk_params, trunk, config):
    head, hp = _build(config, trunk_params, randomize=True)
    _, _, out = trunk
    state = head.apply({"params": hp}, trunk_params, B, method=head.init_state)
    state = _run(head, "advance", hp, trunk_params, state, out.hidden_normed,
                       jnp.ones((B, T), bool))
    next_token = np.array([3, 60], np.int32)
    draft_tokens, draft_logits = _draft(head, hp, trunk_params, state, trunk, next_token)
    # Teacher inputs at the last position: the trunk's token, then the drafts (the last entry,
    # offset K's own target, is never an input).
    next_tokens = np.zeros((B, T, config.k), np.int32)
    next_tokens[:, -1] = np.concatenate([next_token[:, None], np.asarray(draft_tokens)], axis=1)
    logits = _run(head, "train_logits", hp, trunk_params,
                  _feats(trunk, config.k, next_tokens))                     # [B,T,J,V]
    assert logits.shape == (B, T, len(config.offsets), CFG.vocab_size)
    drafted = logits[:, -1, list(config.draft_offset_indices)]              # offsets 2..K
    np.testing.assert_allclose(drafted, draft_logits, atol=1e-5)
    np.testing.assert_array_equal(jnp.argmax(drafted, -1), draft_tokens)


def test_lstm_param_count_independent_of_k(trunk_params):
    def n_params(config):
        head = make_head(config, CFG)
        shapes = jax.eval_shape(lambda tp: init_head_params(head, tp, jax.random.PRNGKey(0)),
                                trunk_params)
        return sum(x.size for x in jax.tree.leaves(shapes))

    for recipe in RECIPES:    # 'seed' projects with its own Dense(V, bias)
        counts = {n_params(seed_config("lstm", k=k, recipe=recipe)) for k in (2, 5)}
        assert len(counts) == 1, (recipe, counts)
    assert n_params(seed_config("lstm")) == \
        n_params(HeadConfig("lstm")) + CFG.dim * CFG.vocab_size + CFG.vocab_size


def test_lstm_dropout_only_when_not_deterministic(trunk_params, trunk):
    head, hp = _build(HeadConfig("lstm", lstm_dropout=0.5), trunk_params)
    feats = _feats(trunk, 3)
    run = lambda det, seed: _run(head, "train_logits", hp, trunk_params, feats,
                                 deterministic=det, rngs={"dropout": jax.random.PRNGKey(seed)})
    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    assert not np.allclose(run(False, 0), run(True, 0))


# --- PoMa ---------------------------------------------------------------------------------------
def test_poma_at_init_reproduces_trunk_logits(trunk_params, trunk):
    config = HeadConfig("poma", k=4, offsets=(1, 2, 3, 4))
    head, hp = _build(config, trunk_params)
    np.testing.assert_array_equal(hp["offset_norm"]["scale"][2], trunk_params["norm"]["scale"])
    _, _, out = trunk
    logits = _run(head, "train_logits", hp, trunk_params, _feats(trunk, config.k))
    for j in range(len(config.offsets)):
        np.testing.assert_allclose(logits[:, :, j], out.logits, atol=1e-5)
    _, draft_logits = _draft(head, hp, trunk_params, (), trunk, np.zeros(B, np.int32))
    for j in range(config.k - 1):
        np.testing.assert_allclose(draft_logits[:, j], out.logits[:, -1], atol=1e-5)
    # the seed's fresh norm (ones) is different from the trunk's, so the copy above is real
    _, seed_hp = _build(config.replace(recipe="seed"), trunk_params)
    np.testing.assert_array_equal(seed_hp["offset_norm"]["scale"], 1.0)


def test_poma_position_matrix_indexes_real_positions(trunk_params, trunk):
    config = HeadConfig("poma", k=3, poma_max_positions=32, recipe="seed")  # normal table
    head, hp = _build(config, trunk_params)
    _, pos, out = trunk
    shifted = pos + 9
    logits = _run(head, "train_logits", hp, trunk_params, _feats(trunk, 3, positions=shifted))
    base = _run(head, "train_logits", hp, trunk_params, _feats(trunk, 3))
    assert not np.allclose(logits, base, atol=1e-3)
    table, scale = np.asarray(hp["position_table"]), np.asarray(hp["offset_norm"]["scale"])
    for j in range(len(config.offsets)):
        h = np.asarray(out.hidden, np.float64) + table[j][shifted]        # [B,T,D]
        normed = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + CFG.norm_eps) * scale[j]
        expected = normed @ np.asarray(trunk_params["output"]["kernel"])
        np.testing.assert_allclose(logits[:, :, j], expected, atol=2e-5, rtol=1e-5)
    # draft at the last real position equals training at that position
    _, draft_logits = _run(head, "draft_logits", hp, trunk_params, (), out.hidden[:, -1],
                                 out.hidden_normed[:, -1], jnp.asarray(shifted[:, -1]),
                                 jnp.zeros(B, jnp.int32))
    np.testing.assert_allclose(draft_logits, logits[:, -1], atol=1e-5)


def test_poma_positions_past_the_table(trunk_params, trunk):
    config = HeadConfig("poma", k=3, poma_max_positions=T + 2)
    head, hp = _build(config, trunk_params)
    _, pos, _ = trunk
    too_far = np.array(pos)
    too_far[1, -1] = T + 2
    with pytest.raises(ValueError, match="poma_max_positions"):
        head.apply({"params": hp}, trunk_params, _feats(trunk, 3, positions=too_far),
                   method=head.train_logits)
    # under jit no Python error is possible: that entry's logits are NaN, the rest are finite
    logits = np.asarray(_run(head, "train_logits", hp, trunk_params,
                             _feats(trunk, 3, positions=too_far)))
    assert np.isnan(logits[1, -1]).all() and np.isfinite(logits[:, :-1]).all()
    # padding (mask False, e.g. left-padding position -1) is neither an error nor NaN
    padded = np.array(pos) - 1
    mask = padded >= 0
    logits = _run(head, "train_logits", hp, trunk_params, _feats(trunk, 3, positions=padded,
                                                             token_mask=mask))
    assert np.isfinite(np.asarray(logits)).all()


# --- linear -------------------------------------------------------------------------------------
def test_linear_zero_init_reproduces_trunk_logits(trunk_params, trunk):
    config = seed_config("linear", k=4)  # offsets 1..4
    head, hp = _build(config, trunk_params)
    _, _, out = trunk
    logits = _run(head, "train_logits", hp, trunk_params, _feats(trunk, 4))
    assert logits.shape == (B, T, 4, CFG.vocab_size)
    for j in range(4):
        np.testing.assert_allclose(logits[:, :, j], out.logits, atol=1e-5)


def test_linear_draft_agrees_with_train_logits(trunk_params, trunk):
    config = seed_config("linear", k=4)
    head, hp = _build(config, trunk_params, randomize=True)
    logits = _run(head, "train_logits", hp, trunk_params, _feats(trunk, 4))
    draft_tokens, draft_logits = _draft(head, hp, trunk_params, (), trunk, np.zeros(B, np.int32))
    np.testing.assert_allclose(draft_logits, logits[:, -1, 1:], atol=1e-5)  # offsets 2..4
    np.testing.assert_array_equal(draft_tokens, jnp.argmax(logits[:, -1, 1:], -1))
    assert not np.allclose(logits[:, :, 0], logits[:, :, 1])  # per-offset matrices differ


@pytest.mark.parametrize("config", [HeadConfig("linear", k=4), HeadConfig("poma", k=4),
                                    HeadConfig("lstm", k=4)], ids=["linear", "poma", "lstm"])
def test_all_offsets_in_one_unembedding(trunk_params, trunk, config):
    head, hp = _build(config, trunk_params)
    feats = _feats(trunk, config.k)
    jaxpr = jax.make_jaxpr(lambda p: head.apply({"params": p}, trunk_params, feats,
                                                method=head.train_logits))(hp)
    to_vocab = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
                and e.outvars[0].aval.shape[-1] == CFG.vocab_size]
    assert len(to_vocab) == 1
    assert to_vocab[0].outvars[0].aval.shape == (B, T, config.k - 1, CFG.vocab_size)


# --- shared -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [HeadConfig("linear"), HeadConfig("poma"), HeadConfig("lstm"),
                                    seed_config("lstm")],
                         ids=["linear", "poma", "lstm", "lstm-seed"])
def test_gather_index_equals_gathering_all_logits(trunk_params, trunk, config):
    head, hp = _build(config, trunk_params, randomize=True)
    feats = _feats(trunk, config.k)
    index = jnp.array([[6, 0, 3], [2, 2, 5]], jnp.int32)                   # [B,M]
    full = _run(head, "train_logits", hp, trunk_params, feats)              # [B,T,J,V]
    gathered = _run(head, "train_logits", hp, trunk_params, feats, gather_index=index)
    np.testing.assert_allclose(gathered, full[np.arange(B)[:, None], index], atol=1e-5)


def _draft_over(head, hp, tp, state, trunk, next_token, draft_vocab):
    """draft_logits with decoding's draft vocabulary, as decoding/heads.py passes it: the
    collection DRAFT_VOCAB_COLLECTION ({"ids"}: filter the full projection; + "rows": project
    onto those rows only)."""
    from gptk_jax.heads.common import DRAFT_VOCAB_COLLECTION
    _, _, out = trunk
    fn = jax.jit(lambda hp, tp, vocab, *a: head.apply(
        {"params": hp, DRAFT_VOCAB_COLLECTION: vocab}, tp, *a, method="draft_logits"))
    return fn(hp, tp, draft_vocab, state, out.hidden[:, -1], out.hidden_normed[:, -1],
              jnp.full((B,), T - 1, jnp.int32), jnp.asarray(next_token))


def test_draft_vocab_restricts_the_argmax(trunk_params, trunk):
    from gptk_jax.decoding.heads import head_drafter
    allowed = (3, 17, 40, 41, 63)
    config = HeadConfig("linear", k=3)
    head, hp = _build(config, trunk_params, randomize=True)
    _, variables = head_drafter(config, hp, CFG, trunk_params, draft_vocab=np.array(allowed))
    draft_tokens, draft_logits = _draft_over(head, hp, trunk_params, (), trunk,
                                             np.zeros(B, np.int32),
                                             {"ids": variables["draft_vocab"]["ids"]})
    ids = np.array(allowed)
    np.testing.assert_array_equal(draft_tokens,
                                  ids[np.argmax(np.asarray(draft_logits)[..., ids], -1)])


@pytest.mark.parametrize("kind", ["linear", "poma", "lstm"])
def test_precomputed_draft_rows_give_the_filtered_full_argmax(trunk_params, trunk, kind):
    """Projecting onto the draft vocabulary's unembedding rows (decoding's cheap path) drafts
    what the full projection filtered to those ids drafts (the LSTM feeds each draft back, so
    every step must agree); an untied trunk's output kernel is sliced the same way."""
    from gptk_jax.decoding.heads import draft_vocabulary, head_drafter
    allowed = (3, 17, 40, 41, 63, 0, 9)
    config = HeadConfig(kind, k=4)
    head, hp = _build(config, trunk_params, randomize=True)
    drafter, variables = head_drafter(config, hp, CFG, trunk_params, draft_vocab=allowed)
    vocab = variables["draft_vocab"]
    next_token = np.array([17, 5], np.int32)
    state = _state(head, hp, trunk_params)
    full_tokens, full_logits = _draft_over(head, hp, trunk_params, state, trunk, next_token,
                                           {"ids": vocab["ids"]})
    assert vocab["rows"].shape == (len(allowed), CFG.dim)
    fast_tokens, fast_logits = _draft_over(head, hp, variables["trunk"], state, trunk,
                                           next_token, vocab)
    np.testing.assert_array_equal(fast_tokens, full_tokens)
    assert set(np.asarray(fast_tokens).ravel()) <= set(allowed)
    np.testing.assert_allclose(fast_logits, np.asarray(full_logits)[..., list(allowed)],
                               atol=2e-5, rtol=1e-5)
    # the decoding loop's drafter drafts the same (it passes the vocabulary to the head)
    _, _, out = trunk
    np.testing.assert_array_equal(jax.jit(drafter.draft)(
        variables, state, out.hidden[:, -1], out.hidden_normed[:, -1],
        jnp.full((B,), T - 1, jnp.int32), jnp.asarray(next_token)), fast_tokens)
    untied = CFG.replace(tie_embeddings=False)
    kernel = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (CFG.dim, CFG.vocab_size)))
    rows = draft_vocabulary(untied, {**trunk_params, "output": {"kernel": kernel}},
                            allowed)["rows"]
    np.testing.assert_array_equal(rows, kernel[:, list(allowed)].T)


def _state(head, hp, trunk_params):
    """A decoding state that has consumed the trunk's sequence (stateless heads: ())."""
    if head.head_config.kind != "lstm":
        return ()
    state = head.apply({"params": hp}, trunk_params, B, method=head.init_state)
    return jax.tree.map(lambda x: x + 0.1, state)


def test_frequent_token_ids():
    from gptk_jax.decoding.draft_vocab import frequent_token_ids

    class Chars:   # one id per character
        def encode(self, text, bos=False):
            return [ord(c) for c in text]
    lines = ["abca", "ba", "", "cd"]
    # counts: a 3, b 2, c 2, d 1, ' ' (prefix) 3 -> ties by id
    assert frequent_token_ids(Chars(), lines, 3) == (ord("a"), ord("b"), ord("c"))
    assert frequent_token_ids(Chars(), lines, 3, prefix=" ") == (ord(" "), ord("a"), ord("b"))
    assert frequent_token_ids(Chars(), lines, 3, always=[ord("d")]) == (ord("d"), ord("a"),
                                                                        ord("b"))
    with pytest.raises(ValueError, match="only 4 distinct"):
        frequent_token_ids(Chars(), lines, 5)


@pytest.mark.parametrize("config", [HeadConfig("lstm"), seed_config("lstm"), HeadConfig("poma"),
                                    HeadConfig("linear")],
                         ids=["lstm", "lstm-seed", "poma", "linear"])
def test_gradients_reach_head_params_only(trunk_params, trunk, config):
    head, hp = _build(config, trunk_params, randomize=config.kind == "lstm")
    tokens, _, _ = trunk
    feats = _feats(trunk, config.k)
    gold = shifted_next_tokens(jnp.asarray(tokens), config.k)             # [B,T,K]
    targets = gold[..., np.asarray(config.offsets) - 1]                     # [B,T,J]

    def loss(head_params, trunk_params):
        logits = head.apply({"params": head_params}, trunk_params, feats,
                            method=head.train_logits)                     # [B,T,J,V]
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

    grads = jax.jit(jax.grad(loss))(hp, trunk_params)
    assert jax.tree.structure(grads) == jax.tree.structure(hp)
    assert set(grads) == set(hp) and not set(grads) & set(trunk_params)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
    # and the trunk is frozen even for a caller who differentiates with respect to it
    trunk_grads = jax.jit(jax.grad(loss, argnums=1))(hp, trunk_params)
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(trunk_grads))


def test_shifted_next_tokens_by_hand():
    tokens = jnp.array([[10, 11, 12, 13]])
    np.testing.assert_array_equal(shifted_next_tokens(tokens, 3, pad_id=-1)[0],
                                  [[11, 12, 13], [12, 13, -1], [13, -1, -1], [-1, -1, -1]])


def test_head_config_defaults_and_seed():
    assert HeadConfig("linear", k=4).offsets == (2, 3, 4)
    assert HeadConfig("linear", k=4).draft_offset_indices == (0, 1, 2)
    seed = seed_config("lstm")
    assert seed.offsets == (1, 2, 3) and seed.draft_offset_indices == (1, 2)
    assert seed.recipe == "seed" and HeadConfig("lstm").recipe == "default"
    assert HeadConfig.from_dict(seed.to_dict()) == seed


@pytest.mark.parametrize("fields, message", [
    (dict(kind="gru"), "kind"),
    (dict(kind="lstm", k=1), "k "),
    (dict(kind="lstm", k=4, offsets=(2, 4, 3)), "strictly increasing"),
    (dict(kind="lstm", k=4, offsets=(2, 2, 3, 4)), "strictly increasing"),
    (dict(kind="poma", k=3, offsets=(0, 1, 2, 3)), "1..k"),
    (dict(kind="poma", k=3, offsets=(2, 3, 4)), "1..k"),
    (dict(kind="linear", k=4, offsets=(2, 4)), "miss"),
    (dict(kind="lstm", lstm_first_input="own_argmax"), "offsets must include 1"),
    (dict(kind="lstm", lstm_dropout=1.0), "lstm_dropout"),
    (dict(kind="lstm", lstm_vocab_projection="tied"), "lstm_vocab_projection"),
    (dict(kind="poma", poma_max_positions=0), "poma_max_positions"),
    (dict(kind="poma", poma_position_init="uniform"), "poma_position_init"),
    (dict(kind="poma", recipe="ones"), "recipe must be one of"),
    (dict(kind="lstm", recipe="seed"), "offsets must include 1"),
    (dict(kind="lstm", recipe="seed", lstm_step_inputs="argmax"), "replaced by 'recipe'"),
])
def test_head_config_validation(fields, message):
    with pytest.raises(HeadConfigError, match=message):
        HeadConfig.from_dict(fields)


# What HeadConfig.to_dict wrote before `recipe`: all six options, whatever the kind.
PRE_RECIPE_DEFAULTS = dict(lstm_vocab_projection="trunk", lstm_step_inputs="teacher",
                           lstm_first_input="next_token", poma_position_init="zeros",
                           poma_position_init_std=0.02, poma_norm_init="trunk")
PRE_RECIPE_SEED = {"lstm": dict(lstm_vocab_projection="own", lstm_step_inputs="argmax",
                                lstm_first_input="own_argmax"),
                   "poma": dict(poma_position_init="normal", poma_norm_init="ones")}


def _pre_recipe(kind, **options):
    fields = {k: v for k, v in HeadConfig(kind, offsets=(1, 2, 3)).to_dict().items()
              if k != "recipe"}
    return {**fields, **PRE_RECIPE_DEFAULTS, **options}


@pytest.mark.parametrize("kind", ["lstm", "poma", "linear"])
def test_pre_recipe_options_load_as_their_recipe(kind):
    seed = _pre_recipe(kind, **PRE_RECIPE_SEED.get(kind, {}))  # as old seed_config(kind) wrote
    want_seed = "seed" if kind in PRE_RECIPE_SEED else "default"  # linear: the options were inert
    assert HeadConfig.from_dict(seed) == HeadConfig(kind, offsets=(1, 2, 3), recipe=want_seed)
    assert HeadConfig.from_dict(_pre_recipe(kind)) == HeadConfig(kind, offsets=(1, 2, 3))
    # another family's options were never read: they do not decide the recipe
    other = {"lstm": "poma", "poma": "lstm", "linear": "lstm"}[kind]
    assert HeadConfig.from_dict(_pre_recipe(kind, **PRE_RECIPE_SEED[other])).recipe == "default"


def test_pre_recipe_options_that_mix_recipes_are_refused_naming_the_fields():
    mixed = _pre_recipe("lstm", lstm_vocab_projection="own", lstm_first_input="own_argmax")
    with pytest.raises(HeadConfigError, match=r"for recipe 'default' set "
                       r"lstm_first_input='next_token', lstm_vocab_projection='trunk'; or for "
                       r"recipe 'seed' set lstm_step_inputs='argmax'"):
        HeadConfig.from_dict(mixed)
    # the std was read by the seed's normal init only
    wide = _pre_recipe("poma", poma_position_init_std=0.5)
    assert HeadConfig.from_dict(wide).recipe == "default"
    with pytest.raises(HeadConfigError, match=r"recipe 'seed' set poma_position_init_std=0.02"):
        HeadConfig.from_dict({**wide, **PRE_RECIPE_SEED["poma"]})


@pytest.mark.parametrize("draft_vocab, message", [
    ((), "empty"), ((1, 1), "distinct"), ((1, CFG.vocab_size), "vocab_size")])
def test_head_drafter_checks_the_draft_vocab(trunk_params, draft_vocab, message):
    from gptk_jax.decoding.heads import DraftVocabError, head_drafter
    config = HeadConfig("linear")
    _, hp = _build(config, trunk_params)
    with pytest.raises(DraftVocabError, match=message):
        head_drafter(config, hp, CFG, trunk_params, draft_vocab=draft_vocab)


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(HeadConfigError, match="unknown"):
        HeadConfig.from_dict({"kind": "lstm", "layers": 2})
