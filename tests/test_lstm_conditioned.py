"""The LSTM drafter conditioned on the trunk (recipe 'conditioned', heads/lstm_conditioned.py):
a numpy re-implementation of its formula, identity at init, drafting against training (teacher
forced and unrolled on its own drafts), drafting from an incrementally decoded KV cache against
recomputing from the prefix, decoding token-identical to greedy (batch 1 and 8, ragged
acceptance, continuous batching), and a one-step run of every family and recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _train_helpers import with_fields
from test_mtp import (BUCKET, CFG, K, MAX_NEW, PAD, _assert_same_as_greedy, decoder,  # noqa: F401
                      greedy, params, prompts, stop_ids)

import test_continuous as tc
from gptk_jax.decoding import Decoder, head_drafter
from gptk_jax.decoding.mtp import mtp_generate
from gptk_jax.decoding.oracle import RepeatDrafter
from gptk_jax.heads import (HeadConfig, HeadConfigError, HeadFeatures, init_head_params,
                            make_head, seed_config)
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Llama, init_params, params_for_model

COND = HeadConfig("lstm", k=K, recipe="conditioned", lstm_layers=1, lstm_dropout=0.0)
B, T = 2, 6


def _randomized(tree, seed, std):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def _head(config, trunk_params, std=0.0, seed=5, cfg=CFG):
    head = make_head(config, cfg)
    hp = init_head_params(head, trunk_params, jax.random.PRNGKey(seed))
    return head, (_randomized(hp, seed + 1, std) if std else hp)


@pytest.fixture(scope="module")
def trunk(params):
    tokens = np.random.RandomState(2).randint(1, CFG.vocab_size, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    out = jax.jit(Llama(CFG).apply)({"params": params}, tokens, positions)
    return tokens, positions, out


def _feats(trunk, next_tokens):
    tokens, positions, out = trunk
    return HeadFeatures(hidden=out.hidden, hidden_normed=out.hidden_normed,
                        positions=jnp.asarray(positions), tokens=jnp.asarray(tokens),
                        token_mask=jnp.ones((B, T), bool), next_tokens=jnp.asarray(next_tokens))


def _apply(head, method):
    return jax.jit(lambda hp, tp, *a: head.apply({"params": hp}, tp, *a, method=method))


# --- numpy reference ---------------------------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_norm(tp, x):
    return x / np.sqrt(np.mean(x * x) + CFG.norm_eps) * np.asarray(tp["norm"]["scale"], np.float64)


def _np_logits(hp, tp, h, tokens, condition_inputs):
    """One position: trunk hidden h [D], step input tokens -> logits per step [W-1, V]."""
    f64 = lambda a: np.asarray(a, np.float64)
    emb, p = f64(tp["tok_embeddings"]["embedding"]), jax.tree.map(f64, hp["lstm"]["layer_0"])
    unembed = emb.T if CFG.tie_embeddings else f64(tp["output"]["kernel"])     # [D,V]
    cond = _np_norm(tp, f64(h))
    c, s = np.zeros_like(cond), np.tanh(cond @ f64(hp["condition_0"]["kernel"]))
    out = []
    for token in tokens:
        x = emb[token] if not condition_inputs else np.concatenate([emb[token], cond])
        gate = {g: x @ p["i" + g]["kernel"] + s @ p["h" + g]["kernel"] + p["h" + g]["bias"]
                for g in "ifgo"}
        c = _sigmoid(gate["f"]) * c + _sigmoid(gate["i"]) * np.tanh(gate["g"])
        s = _sigmoid(gate["o"]) * np.tanh(c)
        out.append((cond + s @ f64(hp["residual"]["kernel"])) @ unembed)
    return np.stack(out)


@pytest.mark.parametrize("condition_inputs", [False, True])
def test_train_logits_equal_the_formula_in_numpy(params, trunk, condition_inputs):
    config = COND.replace(offsets=(1, 2, 3, 4), lstm_condition_inputs=condition_inputs)
    head, hp = _head(config, params, std=0.3)
    tokens, _, out = trunk
    next_tokens = np.random.RandomState(4).randint(0, CFG.vocab_size, (B, T, K))
    logits = np.asarray(_apply(head, "train_logits")(hp, params, _feats(trunk, next_tokens)))
    for b, t in [(0, 0), (1, 3), (0, 5)]:
        want = _np_logits(hp, params, np.asarray(out.hidden[b, t]), next_tokens[b, t, :K - 1],
                          condition_inputs)
        np.testing.assert_allclose(logits[b, t, 1:], want, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(logits[b, t, 0], out.logits[b, t], rtol=1e-5, atol=1e-5)


def test_at_init_every_offset_is_the_trunks_next_token(params, trunk):
    head, hp = _head(COND, params)
    _, _, out = trunk
    next_tokens = np.random.RandomState(5).randint(0, CFG.vocab_size, (B, T, K))
    logits = _apply(head, "train_logits")(hp, params, _feats(trunk, next_tokens))  # [B,T,J,V]
    for j in range(K - 1):
        np.testing.assert_allclose(logits[:, :, j], out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("own_drafts", [False, True])
def test_draft_equals_train_logits_on_the_drafted_tokens(params, trunk, own_drafts):
    """Teacher forcing on [next_token, drafts] and unrolling on its own argmax both reproduce
    what drafting computes (unrolled: whatever the later teacher tokens are)."""
    config = COND.replace(lstm_train_on_drafts=own_drafts)
    head, hp = _head(config, params, std=0.3)
    _, _, out = trunk
    next_token = np.array([3, 60], np.int32)
    draft_tokens, draft_logits = _apply(head, "draft_logits")(
        hp, params, (), out.hidden[:, -1], out.hidden_normed[:, -1],
        jnp.full((B,), T - 1, jnp.int32), jnp.asarray(next_token))
    next_tokens = np.random.RandomState(6).randint(0, CFG.vocab_size, (B, T, K))
    next_tokens[:, -1, 0] = next_token
    if not own_drafts:
        next_tokens[:, -1, 1:] = np.asarray(draft_tokens)
    logits = _apply(head, "train_logits")(hp, params, _feats(trunk, next_tokens))
    np.testing.assert_allclose(logits[:, -1], draft_logits, atol=1e-5)
    np.testing.assert_array_equal(jnp.argmax(logits[:, -1], -1), draft_tokens)
    assert len(set(np.asarray(draft_tokens).ravel())) > 1


def test_drafting_from_incremental_decoding_equals_recomputing_from_the_prefix(params, trunk):
    """The drafter keeps no state (advance is a no-op): its drafts after each position of an
    incremental KV-cache decode equal those from the trunk's forward over the whole prefix."""
    head, hp = _head(COND, params, std=0.3)
    tokens, positions, out = trunk
    state = head.apply({"params": hp}, params, B, method=head.init_state)
    assert state == ()
    assert head.apply({"params": hp}, params, state, out.hidden_normed,
                      jnp.ones((B, T), bool), method=head.advance) == ()
    draft = _apply(head, "draft")
    step = jax.jit(lambda p, tok, pos, cache: Llama(CFG).apply({"params": p}, tok, pos,
                                                               cache=cache))
    cache = KVCache.init(CFG, B, T + 2)
    for t in range(T):
        inc = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        cache = inc.cache
        args = lambda o: (o.hidden[:, -1] if o is inc else o.hidden[:, t],
                          o.hidden_normed[:, -1] if o is inc else o.hidden_normed[:, t])
        next_token = jnp.argmax(out.logits[:, t], -1).astype(jnp.int32)
        from_cache = draft(hp, params, (), *args(inc), jnp.full((B,), t), next_token)
        from_prefix = draft(hp, params, (), *args(out), jnp.full((B,), t), next_token)
        np.testing.assert_array_equal(from_cache, from_prefix)


@pytest.mark.parametrize("batch", [1, 8])
def test_decoding_equals_greedy(params, decoder, prompts, stop_ids, greedy, batch):  # noqa: F811
    """At init the drafts are the trunk's next token repeated (RepeatDrafter's acceptance,
    ragged across rows); with random weights they are other tokens. Both: greedy's output."""
    reference = greedy[batch, "left"]
    for std in ((0.0, 0.3) if batch == 8 else (0.3,)):
        head, hp = _head(COND, params, std=std)
        drafter, variables = head_drafter(COND, hp, CFG, params)
        result = decoder.replace(stop_ids=stop_ids, drafter=drafter,
                                 drafter_vars=variables).generate(prompts[:batch], MAX_NEW,
                                                                  bucket=BUCKET)
        _assert_same_as_greedy(result, reference)
        if std == 0.0 and batch == 8:
            repeat = mtp_generate(CFG, params, RepeatDrafter(K - 1), (), prompts, MAX_NEW,
                                  stop_ids, PAD, tokens_per_step=K, bucket=BUCKET)
            assert result.stats["accepted_per_row"] == repeat.stats["accepted_per_row"]
            assert len({tuple(a) for a in result.stats["accepted_per_row"]}) > 1   # ragged
            assert result.stats["mean_accepted_drafts"] > 0


def test_continuous_batching_equals_greedy():
    cfg = tc.CFG
    trunk_params = params_for_model(init_params(cfg, jax.random.PRNGKey(7)), cfg)
    rs = np.random.RandomState(3)
    prompts = [rs.randint(1, cfg.vocab_size, n).tolist() for n in tc.PROMPT_LENGTHS]
    decoder = Decoder(cfg, trunk_params, stop_ids=[], pad_id=PAD)
    stop = [decoder.generate(prompts[:1], MAX_NEW, bucket=BUCKET).tokens[0][5]]
    decoder = decoder.replace(stop_ids=stop)
    reference = decoder.generate(prompts, MAX_NEW, bucket=BUCKET)
    assert len(set(reference.num_generated)) > 2
    head, hp = _head(COND, trunk_params, std=0.1, cfg=cfg)
    drafter, variables = head_drafter(COND, hp, cfg, trunk_params, draft_vocab=range(3, 20))
    result = decoder.replace(drafter=drafter, drafter_vars=variables).generate_continuous(
        prompts, MAX_NEW, batch_size=3, padding="right", bucket=BUCKET)
    assert result.tokens == reference.tokens
    assert result.stop_reasons == reference.stop_reasons


def test_recipe_options_are_validated():
    with pytest.raises(HeadConfigError, match="LSTM recipe"):
        HeadConfig("poma", recipe="conditioned")
    with pytest.raises(HeadConfigError, match="'conditioned' LSTM recipe only"):
        HeadConfig("lstm", lstm_train_on_drafts=True)
    with pytest.raises(HeadConfigError, match="'conditioned' LSTM recipe only"):
        seed_config("lstm", lstm_condition_inputs=True)
    assert HeadConfig("lstm", recipe="conditioned").trunk_field == "hidden_normed"
    assert not HeadConfig("lstm", recipe="conditioned").reads_sequence
    assert HeadConfig("lstm").reads_sequence and HeadConfig("lstm").trunk_field == "hidden_normed"
    assert HeadConfig.from_dict(HeadConfig("lstm", recipe="conditioned").to_dict()) == \
        HeadConfig("lstm", recipe="conditioned")


# --- one training step of every family and recipe ----------------------------------------------
FAMILIES = [("linear", "default", {}), ("poma", "default", {}), ("poma", "seed", {}),
            ("lstm", "default", {}), ("lstm", "seed", {}), ("lstm", "conditioned", {}),
            ("lstm", "conditioned", {"lstm_train_on_drafts": True,
                                     "lstm_condition_inputs": True})]


@pytest.mark.parametrize("kind,recipe,options", FAMILIES,
                         ids=[f"{k}-{r}{'-options' if o else ''}" for k, r, o in FAMILIES])
def test_one_training_step_of_every_family_and_recipe(kind, recipe, options):
    from gptk_jax.training import step as step_lib
    from gptk_jax.training.inputs import tiny_trunk_config
    from _train_helpers import hand_batch as _hand_batch
    trunk_config = tiny_trunk_config()
    trunk_params = jax.jit(lambda k: init_params(trunk_config, k, stacked=False))(
        jax.random.PRNGKey(1))
    config = HeadConfig(kind, k=3, offsets=(1, 2, 3), recipe=recipe, lstm_layers=1,
                        poma_max_positions=16, **options)
    head = make_head(config, trunk_config)
    head_params = init_head_params(head, trunk_params, jax.random.PRNGKey(2))
    tx = optax.adam(1e-2)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), head_params=head_params,
                                opt_state=tx.init(head_params), rng=jax.random.PRNGKey(0))
    targets = "trunk_soft" if recipe != "seed" else "gold"
    cfg = step_lib.StepConfig(trunk_config=trunk_config, head_config=config, targets=targets,
                              offset_weights=(1.0, 0.8, 0.64), first_target_tokens_only=False,
                              positions_per_row=8, argmax_chunk=4, position_chunk=4)
    new, metrics = jax.jit(lambda s, p, b: step_lib.train_step(cfg, tx, s, p, b))(
        state, trunk_params, _hand_batch())
    assert np.isfinite(float(metrics["objective"])) and float(metrics["grad_norm"]) > 0
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(new.head_params),
                                                       jax.tree.leaves(head_params)))


def test_one_step_run_of_the_conditioned_config(tmp_path):
    """train_and_evaluate end to end (soft targets, 0.8^(o-1), heads.json written and loaded)."""
    import importlib
    from gptk_jax.heads.io import load_heads
    from gptk_jax.training import train_and_evaluate
    config = importlib.import_module("configs.lstm_conditioned_smollm2_wmt14").get_config()
    config = with_fields(config, {
        "trunk_checkpoint": "random-tiny", "data.max_train_pairs": 8, "data.max_len": 384,
        "data.truncate": "truncate_target", "data.eval_max_sentences": 2,
        "data.shots": 0, "data.bucket_lengths": (),       # bytes: 2 shots do not fit
        "training.global_batch_size": 4, "training.num_train_steps": 1,
        "training.eval_at_start": False, "training.log_every_steps": 1})
    result = train_and_evaluate(config, tmp_path, progress=False)
    assert result["status"] == "completed" and np.isfinite(result["train"]["loss"])
    assert np.isfinite(result["eval_distilled"]["tau_est"])   # the held-out distilled rows
    loaded = load_heads(tmp_path / "heads")
    assert loaded.head_config.recipe == "conditioned" and "residual" in loaded.params
    # the feature cache held what this head reads: the trunk's hidden state after the norm
    cached = sorted({p.name for p in (tmp_path / "feature_cache").rglob("*.bin")})
    assert cached == ["hidden_normed.bin", "trunk_argmax.bin"]
    assert loaded.metadata["prompt_format"]["shots"] == 0     # the rows' format is recorded
