"""The EAGLE-class drafter (heads/eagle.py): drafting from its incrementally built KV cache equals
the training chain (training-time test masks) recomputed over the whole sequence, at every
offset; decoding with it is token-identical to greedy (batch 1 and 8, both paddings, continuous
batching); its config is checked; one training step over a draft vocabulary moves its params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mtp import (BUCKET, CFG, MAX_NEW, PAD, _assert_same_as_greedy, decoder,  # noqa: F401
                      greedy, params, prompts, stop_ids)

from gptk_jax.heads import HeadConfig, HeadConfigError, HeadFeatures, init_head_params, make_head
from gptk_jax.llama.model import Llama

K = 4
EAGLE = HeadConfig("eagle", k=K)


def _randomized(tree, seed, std):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def eagle(params):
    head = make_head(EAGLE, CFG)
    hp = init_head_params(head, params, jax.random.PRNGKey(3))
    return head, _randomized(hp, 4, 0.3)    # far from init, so every term matters


def _trunk(params, tokens):
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    out = jax.jit(Llama(CFG).apply)({"params": params}, jnp.asarray(tokens), positions)
    return out.hidden_normed


def _train_logits(head, hp, params, tokens, hidden_normed, start):
    """Training's logits [B,X,J,V] over positions start..T-1 (the supervised span)."""
    b, t = tokens.shape
    feats = HeadFeatures(hidden=hidden_normed, hidden_normed=hidden_normed,
                         positions=jnp.broadcast_to(jnp.arange(t), (b, t)),
                         tokens=jnp.asarray(tokens), token_mask=jnp.ones((b, t), bool),
                         next_tokens=jnp.zeros((b, t, K), jnp.int32))
    index = jnp.broadcast_to(jnp.arange(start, t, dtype=jnp.int32), (b, t - start))
    return head.apply({"params": hp}, params, feats, gather_index=index,
                      method=head.train_logits)


@pytest.mark.parametrize("kept", [1, 2, 3])
def test_drafting_from_the_cache_equals_the_training_chain(params, eagle, kept):
    """Prompt of P tokens, then one verify step of 3 positions of which `kept` are accepted;
    the chain drafted from the last kept position t equals training's offsets 2..K at t, once
    the tokens after t+1 are the drafter's own drafts (training teacher-forces the sequence's
    tokens; decoding feeds its drafts)."""
    head, hp = eagle
    rng = np.random.RandomState(kept)
    b, p, length = 2, 7, 18
    tokens = rng.randint(1, CFG.vocab_size, (b, length)).astype(np.int32)
    t = p - 1 + kept                               # last consumed position
    call = lambda method, *a: head.apply({"params": hp}, params, *a, method=method)
    hidden = _trunk(params, tokens)
    state = call("init_state", b, 32)
    state = call("advance", state, hidden[:, :p], jnp.ones((b, p), bool), tokens[:, :p])
    mask = jnp.asarray(np.arange(3)[None, :].repeat(b, 0) < kept)
    state = call("advance", state, hidden[:, p:p + 3], mask, tokens[:, p:p + 3])
    drafts, draft_logits = call("draft_logits", state, hidden[:, t], hidden[:, t],
                                jnp.full((b,), t), jnp.asarray(tokens[:, t + 1]))
    assert drafts.shape == (b, K - 1) and draft_logits.shape == (b, K - 1, CFG.vocab_size)
    tokens[:, t + 2:t + 2 + K - 1] = np.asarray(drafts)    # the chain's own inputs
    hidden = _trunk(params, tokens)
    start = p - K                                   # the first supervised position (k = K)
    logits = _train_logits(head, hp, params, tokens, hidden, start)[:, t - start]   # [B,J,V]
    np.testing.assert_allclose(np.asarray(draft_logits), np.asarray(logits), atol=2e-4,
                               rtol=2e-4)
    assert np.abs(np.asarray(logits[:, 1] - logits[:, 0])).max() > 1e-3   # offsets differ


def test_the_chain_reads_its_context(params, eagle):
    """Offset 2 at t depends on the true pairs before t (attention over the drafter's cache):
    changing an earlier token changes it."""
    head, hp = eagle
    tokens = np.random.RandomState(0).randint(1, CFG.vocab_size, (1, 12)).astype(np.int32)
    other = tokens.copy()
    other[0, 3] = (other[0, 3] % (CFG.vocab_size - 1)) + 1
    a = _train_logits(head, hp, params, tokens, _trunk(params, tokens), 2)[0, 6, 0]
    b = _train_logits(head, hp, params, other, _trunk(params, other), 2)[0, 6, 0]
    assert np.abs(np.asarray(a - b)).max() > 1e-4


def test_offsets_must_be_the_chain():
    head = make_head(HeadConfig("eagle", k=4, offsets=(1, 2, 3, 4)), CFG)
    with pytest.raises(HeadConfigError, match=r"offsets must be \(2, 3, 4\)"):
        head.init(jax.random.PRNGKey(0), {}, method=head.train_logits)


@pytest.mark.parametrize("batch, padding", [(1, "left"), (8, "left"), (8, "right")])
def test_decoding_with_eagle_equals_greedy(decoder, prompts, stop_ids, greedy, eagle, params,
                                           batch, padding):
    from gptk_jax.decoding import head_drafter
    _, hp = eagle
    drafter, variables = head_drafter(EAGLE, hp, CFG, params)
    mtp = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables,
                          tokens_per_step=K)
    result = mtp.generate(prompts[:batch], MAX_NEW, padding=padding, bucket=BUCKET)
    _assert_same_as_greedy(result, greedy[batch, padding])


def test_continuous_decoding_with_eagle_equals_greedy(decoder, prompts, stop_ids, greedy, eagle,
                                                      params):
    from gptk_jax.decoding import head_drafter
    _, hp = eagle
    drafter, variables = head_drafter(EAGLE, hp, CFG, params, draft_vocab=list(range(1, 40)))
    mtp = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables,
                          tokens_per_step=K)
    result = mtp.generate_continuous(prompts, MAX_NEW, batch_size=3, bucket=BUCKET)
    _assert_same_as_greedy(result, greedy[8, "left"])


def _distilled_batch(decoder, prompts, new=16):
    """Rows of prompt + the trunk's greedy continuation (what the drafter must learn)."""
    from gptk_jax.data.prompts import shift_targets
    out = decoder.generate(prompts, new, bucket=BUCKET)
    rows = [list(p) + list(t) for p, t in zip(prompts, out.tokens)]
    t = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), t), np.int32)
    loss_mask = np.zeros((len(rows), t), bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        tokens[i, :len(r)] = r
        loss_mask[i, len(p):len(r)] = True
    targets, target_mask = shift_targets(tokens, loss_mask, K)
    return {"tokens": tokens, "positions": np.broadcast_to(np.arange(t, dtype=np.int32),
                                                           tokens.shape),
            "token_mask": tokens != 0, "loss_mask": loss_mask, "targets": targets,
            "target_mask": target_mask}


@pytest.mark.parametrize("draft_vocab", [(), tuple(range(1, 61))])
def test_training_learns_the_trunks_continuations_at_every_offset(decoder, prompts, params,
                                                                  draft_vocab):
    """200 AdamW steps on 8 rows of the trunk's own greedy output: top-1 against the trunk's
    argmax rises at offsets 2, 3 and 4 (3 and 4 are chain steps on its own features)."""
    import optax
    from gptk_jax.training import step as step_lib
    batch = _distilled_batch(decoder, prompts)
    cfg = step_lib.StepConfig(trunk_config=CFG, head_config=EAGLE, targets="trunk_argmax",
                              offset_weights=(1.0, 0.8, 0.64), first_target_tokens_only=False,
                              positions_per_row=batch["tokens"].shape[1], argmax_chunk=16,
                              draft_vocab=draft_vocab)
    tx = optax.adamw(3e-3)
    state = step_lib.init_train_state(cfg, tx, params, seed=0)
    evaluate = jax.jit(lambda hp: step_lib.eval_step(cfg, hp, params, batch))
    train = jax.jit(lambda s: step_lib.train_step(cfg, tx, s, params, batch))
    before = evaluate(state.head_params)
    for _ in range(200):
        state, metrics = train(state)
    after = evaluate(state.head_params)
    acc = lambda m: np.asarray(m["top1_trunk"]) / np.asarray(m["count"])
    assert np.isfinite(float(metrics["objective"]))
    assert np.all(acc(after) > acc(before) + 0.2), (acc(before), acc(after))


def test_eagle_drafts_past_its_trained_k(decoder, prompts, stop_ids, greedy, eagle, params):
    """Its chain steps share one layer: a k=4 drafter runs at W=6, its first 3 drafts those of
    W=4, and decoding stays greedy's."""
    from gptk_jax.decoding import head_drafter
    _, hp = eagle
    d4, v4 = head_drafter(EAGLE, hp, CFG, params)
    d6, v6 = head_drafter(EAGLE, hp, CFG, params, tokens_per_step=6)
    assert d6.max_drafts == 5
    call = lambda d, v, s, *a: d.draft(v, s, *a)
    hidden = _trunk(params, np.asarray([prompts[0]], np.int32))
    tokens = jnp.asarray([prompts[0]], jnp.int32)
    drafts = []
    for d, v in ((d4, v4), (d6, v6)):
        state = d.init_state(v, 1, 64)
        state = d.advance(v, state, hidden, jnp.ones(tokens.shape, bool), tokens)
        drafts.append(np.asarray(call(d, v, state, hidden[:, -1], hidden[:, -1],
                                      jnp.array([tokens.shape[1] - 1]), jnp.array([5]))))
    assert drafts[0].shape == (1, 3) and drafts[1].shape == (1, 5)
    np.testing.assert_array_equal(drafts[1][:, :3], drafts[0])
    mtp = decoder.replace(stop_ids=stop_ids, drafter=d6, drafter_vars=v6, tokens_per_step=6)
    _assert_same_as_greedy(mtp.generate(prompts, MAX_NEW, bucket=BUCKET), greedy[8, "left"])


@pytest.mark.parametrize("continuous", [False, True])
def test_a_cache_sized_by_max_new_tokens_drops_no_pair(decoder, prompts, stop_ids, greedy,
                                                       eagle, params, continuous):
    """The drafter's cache holds k + max_new_tokens entries, not the trunk cache's slots
    (EagleHead.init_state): decoding with it accepts exactly the drafts of decoding with a
    cache of every slot, row by row and step by step (a dropped pair would change the chain's
    attention, and with these far-from-init params its drafts)."""
    import dataclasses

    from gptk_jax.decoding import head_drafter
    from gptk_jax.decoding.heads import HeadDrafter

    @dataclasses.dataclass(frozen=True)
    class EverySlot(HeadDrafter):
        def init_state(self, variables, batch_size, capacity, max_new_tokens=None):
            return super().init_state(variables, batch_size, capacity)

    _, hp = eagle
    drafter, variables = head_drafter(EAGLE, hp, CFG, params)
    state = drafter.init_state(variables, 2, 200, max_new_tokens=MAX_NEW)
    assert state["k"].shape[1] == K + MAX_NEW
    runs = []
    for d in (drafter, EverySlot(head=drafter.head, max_drafts=drafter.max_drafts)):
        mtp = decoder.replace(stop_ids=stop_ids, drafter=d, drafter_vars=variables,
                              tokens_per_step=K)
        runs.append(mtp.generate_continuous(prompts, MAX_NEW, batch_size=3, bucket=BUCKET)
                    if continuous else mtp.generate(prompts, MAX_NEW, bucket=BUCKET))
    bounded, every = runs
    _assert_same_as_greedy(bounded, greedy[8, "left"])
    assert bounded.stats["accepted_per_row"] == every.stats["accepted_per_row"]
    assert sum(map(sum, every.stats["accepted_per_row"])) > 0


@pytest.mark.parametrize("batch", [1, 8])
def test_bfloat16_drafter_weights_decode_exactly(decoder, prompts, stop_ids, greedy, eagle,
                                                 params, batch):
    """head_drafter(weights="bfloat16"): the head's matrices and the draft vocabulary's rows in
    bfloat16 (vectors kept), and decoding with them still emits greedy's tokens (the trunk
    verifies every draft in float32)."""
    from gptk_jax.decoding import head_drafter
    _, hp = eagle
    drafter, variables = head_drafter(EAGLE, hp, CFG, params, draft_vocab=list(range(1, 40)),
                                      weights="bfloat16")
    for x in jax.tree.leaves(variables["head"]):
        assert x.dtype == (jnp.bfloat16 if x.ndim >= 2 else jnp.float32)
    assert variables["draft_vocab"]["rows"].dtype == jnp.bfloat16
    mtp = decoder.replace(stop_ids=stop_ids, drafter=drafter, drafter_vars=variables,
                          tokens_per_step=K)
    result = mtp.generate(prompts[:batch], MAX_NEW, bucket=BUCKET)
    _assert_same_as_greedy(result, greedy[batch, "left"])


@pytest.mark.parametrize("b", [1, 2])
def test_bfloat16_drafting_is_float32_math_on_the_rounded_weights(params, eagle, b):
    """The chain drafted with bfloat16 weights through the few-row kernels (1 and 2 rows) gives
    the logits XLA's float32 products give on the same weights rounded to bfloat16 and widened
    (a reference that never meets the kernels), to float32 summation's error."""
    from gptk_jax.decoding.heads import in_bfloat16
    from gptk_jax.heads import make_head
    from gptk_jax.kernels import few_rows
    if not few_rows.available():
        pytest.skip("few-row kernels not built here")
    _, hp = eagle
    hp16 = in_bfloat16(hp)
    rounded = jax.tree.map(lambda x: x.astype(jnp.float32), hp16)
    kernels = make_head(EAGLE, CFG.replace(matmul="few_rows"))
    xla = make_head(EAGLE, CFG.replace(matmul="xla"))
    tokens = np.random.RandomState(9).randint(1, CFG.vocab_size, (b, 12)).astype(np.int32)
    hidden = _trunk(params, tokens)

    def draft(head, hp):
        call = lambda method, *a: head.apply({"params": hp}, params, *a, method=method)
        state = call("init_state", b, 32)
        state = call("advance", state, hidden[:, :10], jnp.ones((b, 10), bool), tokens[:, :10])
        fn = jax.jit(lambda s: call("draft_logits", s, hidden[:, 9], hidden[:, 9],
                                    jnp.full((b,), 9), jnp.asarray(tokens[:, 10])))
        return fn(state), "gptk_few_rows_nn_bf16" in fn.lower(state).as_text()

    ((d16, l16), used), ((dref, lref), unused) = draft(kernels, hp16), draft(xla, rounded)
    assert used and not unused
    np.testing.assert_allclose(np.asarray(l16), np.asarray(lref), atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(d16), np.asarray(dref))
    (_, l32), _ = draft(xla, hp)
    assert np.abs(np.asarray(l32 - lref)).max() > 1e-3     # the rounding is visible
