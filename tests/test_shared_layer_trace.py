"""The unrolled trunk traces one layer, not L (llama/model.py SHARED_LAYER_TRACE): while
traced, every layer calls one jitted function of its params. Checked on a tiny random 4-layer
trunk: a jitted trunk call runs the layer's Python code once (L times with the switch off), and
the two give the same logits, hidden states and cache, with and without a cache, fused
projections or not; an eager call runs the layers one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptk_jax.llama.model as model_module
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.kv_cache import KVCache
from gptk_jax.llama.model import Block, Llama, init_params, params_for_model

CFG = LlamaConfig(vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  rope_theta=10000.0)


def _count_layer_calls(monkeypatch) -> list:
    """A list that grows by one each time Block's Python code runs (until monkeypatch undoes)."""
    calls, real = [], Block.__call__

    def counted(self, *args):
        calls.append(1)
        return real(self, *args)
    monkeypatch.setattr(Block, "__call__", counted)
    return calls


def _forward(cfg, params, shared: bool, monkeypatch, with_cache: bool):
    """(TrunkOutput of a jitted call, how often Block's Python code ran while tracing it)."""
    monkeypatch.setattr(model_module, "SHARED_LAYER_TRACE", shared)
    model_module._block_fn.cache_clear()
    jax.clear_caches()
    calls = _count_layer_calls(monkeypatch)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7)) + (3 if with_cache else 0)
    cache = None
    if with_cache:
        cache = KVCache.init(cfg, 2, 16)
        cache = cache.replace(valid=cache.valid.at[:, :3].set(True),
                              lengths=jnp.full((2,), 3, jnp.int32))
    run = jax.jit(lambda p, c: Llama(cfg).apply({"params": p}, tokens, positions, c))
    out = run(params_for_model(params, cfg), cache)
    monkeypatch.undo()
    return out, len(calls)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_cache", [False, True])
def test_one_layer_is_traced_and_the_outputs_are_the_per_layer_ones(monkeypatch, fused,
                                                                     with_cache):
    cfg = CFG.replace(fuse_projections=fused)
    params = init_params(cfg, jax.random.PRNGKey(0))
    shared, traced_shared = _forward(cfg, params, True, monkeypatch, with_cache)
    apart, traced_apart = _forward(cfg, params, False, monkeypatch, with_cache)
    assert traced_shared == 1 and traced_apart == cfg.n_layers
    for a, b in ((shared.logits, apart.logits), (shared.hidden, apart.hidden),
                 (shared.hidden_normed, apart.hidden_normed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    if with_cache:
        for a, b in zip(shared.cache.k + shared.cache.v, apart.cache.k + apart.cache.v):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(shared.cache.lengths),
                                      np.asarray(apart.cache.lengths))


def test_an_eager_call_runs_the_layers_one_by_one(monkeypatch):
    """Outside jit the layers run op by op as before: a jitted layer would compile a whole
    layer program for each new input shape (a real-trunk test ran 10 % slower with it)."""
    monkeypatch.setattr(model_module, "SHARED_LAYER_TRACE", True)
    params = params_for_model(init_params(CFG, jax.random.PRNGKey(0)), CFG)
    calls = _count_layer_calls(monkeypatch)
    tokens = jnp.zeros((1, 3), jnp.int32)
    Llama(CFG).apply({"params": params}, tokens, jnp.arange(3)[None])
    assert len(calls) == CFG.n_layers
