"""The few-row product kernels (gptk_jax/kernels/few_rows.py, small_matmul.cc): against numpy in
float64, row by row the same bits whatever the number of rows, the dispatch (what goes to the
kernel, what stays XLA's), gradients, the trunk with them against the trunk without, decoding
with them token-identical to decoding without, and a failed build's message."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from gptk_jax.kernels import few_rows
from gptk_jax.llama.config import ConfigError, LlamaConfig
from gptk_jax.llama.model import Llama

pytestmark = pytest.mark.skipif(not few_rows.available(),
                                reason="few-row kernels not built here (no C++ compiler?)")

SHAPES = [(1, 7, 5), (2, 16, 16), (3, 37, 33), (4, 576, 100), (5, 40, 1030), (8, 576, 1536),
          (7, 1536, 576), (6, 9, 17)]


def _data(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(np.float32),
            rng.standard_normal((k, n)).astype(np.float32))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_nn_and_nt_match_numpy_float64(m, k, n):
    x, w = _data(m, k, n)
    want = x.astype(np.float64) @ w.astype(np.float64)
    got_nn = np.asarray(jax.jit(few_rows.matmul_nn)(x, w))
    got_nt = np.asarray(jax.jit(few_rows.matmul_nt)(x, np.ascontiguousarray(w.T)))
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)   # error bound's scale
    for got in (got_nn, got_nt):
        assert got.shape == (m, n) and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-6)


@pytest.mark.parametrize("kind", ["nn", "nt"])
def test_a_row_gets_the_same_bits_alone_or_among_others(kind):
    x, w = _data(8, 576, 1030, seed=1)
    if kind == "nt":
        w = np.ascontiguousarray(w.T)
    f = jax.jit(few_rows.matmul_nn if kind == "nn" else few_rows.matmul_nt)
    together = np.asarray(f(x, w))
    for m in (1, 3, 5):
        part = np.asarray(f(x[:m], w))
        np.testing.assert_array_equal(part, together[:m])
    np.testing.assert_array_equal(np.asarray(f(x[5:6], w)), together[5:6])


def _uses_kernel(fn, *args) -> bool:
    return "gptk_few_rows" in jax.jit(fn).lower(*args).as_text()


def test_dot_general_dispatch():
    x = jnp.ones((2, 3, 4, 5), jnp.float32)         # [B,T,N,H], DenseGeneral axis=(-2,-1)
    w = jnp.ones((4, 5, 6), jnp.float32)            # [N,H,D]
    dims = (((2, 3), (0, 1)), ((), ()))
    out = few_rows.dot_general(x, w, dims)
    np.testing.assert_allclose(out, jax.lax.dot_general(x, w, dims), rtol=1e-6)
    assert out.shape == (2, 3, 6)
    assert _uses_kernel(lambda a, b: few_rows.dot_general(a, b, dims), x, w)      # 6 rows
    big = jnp.ones((3, 3, 4, 5), jnp.float32)                                      # 9 rows
    assert not _uses_kernel(lambda a, b: few_rows.dot_general(a, b, dims), big, w)
    half = x.astype(jnp.bfloat16)
    assert not _uses_kernel(lambda a, b: few_rows.dot_general(a, b, dims), half,
                            w.astype(jnp.bfloat16))
    other = (((3,), (1,)), ((), ()))     # contracts a dim other than the rhs's leading one
    assert not _uses_kernel(lambda a, b: few_rows.dot_general(a, b, other), x,
                            jnp.ones((6, 5), jnp.float32))
    e = jnp.ones((11, 5), jnp.float32)
    assert _uses_kernel(few_rows.unembed, x[:1, :2, 0], e)
    np.testing.assert_allclose(few_rows.unembed(x[:1, :2, 0], e), x[:1, :2, 0] @ e.T)


def test_gradients_through_the_kernels():
    x, w = _data(3, 20, 12, seed=2)
    loss = lambda f: (lambda a, b: jnp.sum(jnp.tanh(f(a, b))))
    want = jax.grad(loss(lambda a, b: a @ b), argnums=(0, 1))(x, w)
    got = jax.grad(loss(few_rows.matmul_nn), argnums=(0, 1))(x, w)
    got_t = jax.grad(loss(lambda a, b: few_rows.matmul_nt(a, b.T)), argnums=(0, 1))(x, w)
    for g in (got, got_t):
        for a, b in zip(g, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_trunk_with_the_kernels_matches_xla(tied):
    cfg = LlamaConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=136,
                      tie_embeddings=tied)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 300, (3, 4)), jnp.int32)
    params = Llama(cfg).init(jax.random.PRNGKey(0), tokens, tokens)["params"]
    fast = cfg.replace(matmul="few_rows")
    reference = jax.jit(Llama(cfg).apply)           # XLA's products, one program per shape
    for b, t in ((1, 1), (1, 4), (2, 3), (2, 4), (3, 3)):
        tok, pos = tokens[:b, :t], jnp.broadcast_to(jnp.arange(t), (b, t))
        want = reference({"params": params}, tok, pos)
        apply = jax.jit(lambda p, a, q: Llama(fast).apply({"params": p}, a, q))
        used = "gptk_few_rows" in apply.lower(params, tok, pos).as_text()
        assert used == (few_rows.MIN_ROWS <= b * t <= few_rows.MAX_ROWS)
        got = apply(params, tok, pos)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)


def test_matmul_is_checked_and_never_serialized():
    cfg = LlamaConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
    assert "matmul" not in cfg.replace(matmul="few_rows").to_dict()
    assert cfg.replace(matmul="few_rows").to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="matmul must be 'xla' or 'few_rows'"):
        cfg.replace(matmul="mkl")


def _tiny_case(params_seed: int, prompts_seed: int, lengths):
    """A tiny tied trunk, its params, and prompts that end by repeating their first 4 tokens
    (the lookup finds drafts)."""
    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      tie_embeddings=True)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = Llama(cfg).init(jax.random.PRNGKey(params_seed), tokens, tokens)["params"]
    rng = np.random.default_rng(prompts_seed)
    prompts = [rng.integers(1, 64, n).tolist() for n in lengths]
    return cfg, params, [p + p[:4] for p in prompts]


def test_decoding_with_the_kernels_is_greedy_decoding():
    from gptk_jax.decoding.engine import Decoder
    from gptk_jax.decoding.lookup import LookupDrafter
    cfg, params, prompts = _tiny_case(4, 5, (5, 9, 12))
    xla = Decoder(cfg, params, stop_ids=[], pad_id=0, matmul="xla")
    fast = Decoder(cfg, params, stop_ids=[], pad_id=0, matmul="few_rows")
    assert fast.config.matmul == "few_rows" and xla.config.matmul == "xla"
    alone = lambda d: [d.generate([p], 12).tokens[0] for p in prompts]     # batch 1
    want = alone(xla)
    lookup = fast.replace(drafter=LookupDrafter(max_drafts=3), tokens_per_step=4,
                          drafter_vars=LookupDrafter.variables())
    for decoder in (fast, lookup):
        assert alone(decoder) == want
        assert decoder.generate(prompts, 12).tokens == want              # batch 3


def test_a_failed_build_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(few_rows.KernelBuildError, match="false .*exited 1"):
        few_rows.build(tmp_path)
    assert not list(tmp_path.rglob("*.so"))          # nothing half-written left behind


def test_decoding_with_fused_projections_is_greedy_decoding():
    """A decoder's fused q|k|v and w1|w3 products (the default) emit the unfused decoder's
    tokens, greedy and with lookup drafts, batch 1 and 3, with either product path."""
    from gptk_jax.decoding.engine import Decoder
    from gptk_jax.decoding.lookup import LookupDrafter
    cfg, params, prompts = _tiny_case(6, 7, (4, 8, 11))
    plain = Decoder(cfg, params, stop_ids=[], pad_id=0, matmul="xla", fuse_projections=False)
    assert not plain.config.fuse_projections
    want = [plain.generate([p], 12).tokens[0] for p in prompts]
    for matmul in ("xla", "few_rows"):
        fused = Decoder(cfg, params, stop_ids=[], pad_id=0, matmul=matmul)
        assert fused.config.fuse_projections and "wqkv" in fused.params["layers_0"]["attention"]
        lookup = fused.replace(drafter=LookupDrafter(max_drafts=3), tokens_per_step=4,
                               drafter_vars=LookupDrafter.variables())
        for decoder in (fused, lookup):
            assert [decoder.generate([p], 12).tokens[0] for p in prompts] == want
            assert decoder.generate(prompts, 12).tokens == want


BF16_SHAPES = [(1, 7, 5), (1, 576, 1536), (2, 37, 33), (3, 1536, 576), (8, 576, 1030),
               (5, 40, 17), (4, 48, 40)]     # 48: nt's 16-wide step after its 32-wide ones


@pytest.mark.parametrize("m,k,n", BF16_SHAPES)
def test_bfloat16_weights_match_numpy_on_the_rounded_weights(m, k, n):
    """A bfloat16 weight (nn and nt, 1..8 rows, tails of every width) gives what numpy's
    float64 product gives on the same rounded weights (ml_dtypes' rounding, not ours), to
    float32 summation's error: the kernels widen each weight exactly and sum in float32."""
    import ml_dtypes
    x, w = _data(m, k, n, seed=5)
    w16 = w.astype(ml_dtypes.bfloat16)
    rounded = w16.astype(np.float64)
    assert np.any(rounded != w)                                  # the rounding is real
    want = x.astype(np.float64) @ rounded
    got_nn = np.asarray(jax.jit(few_rows.matmul_nn)(x, jnp.asarray(w16)))
    got_nt = np.asarray(jax.jit(few_rows.matmul_nt)(x, jnp.asarray(np.ascontiguousarray(w16.T))))
    scale = np.abs(x).astype(np.float64) @ np.abs(rounded)
    for got in (got_nn, got_nt):
        assert got.shape == (m, n) and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-6)


def test_bfloat16_weights_dispatch_and_dense():
    """float32 x bfloat16: the kernels from one row up to MAX_ROWS, XLA past it (the weight
    widened first, same values); llama.layers.Dense hands its bfloat16 kernel to the few-row
    dot_general as stored, and widens it for XLA's."""
    from gptk_jax.llama.layers import Dense
    dims = (((1,), (0,)), ((), ()))
    w = jnp.asarray(np.random.default_rng(6).standard_normal((24, 40)), jnp.bfloat16)
    for rows, kernel in ((1, True), (8, True), (9, False)):
        x = jnp.ones((rows, 24), jnp.float32)
        call = lambda a, b: few_rows.dot_general(a, b, dims)
        assert _uses_kernel(call, x, w) == kernel
        np.testing.assert_allclose(call(x, w), x @ w.astype(jnp.float32), rtol=1e-5)
    e = jnp.asarray(np.random.default_rng(7).standard_normal((50, 24)), jnp.bfloat16)
    x = jnp.ones((1, 24), jnp.float32)
    assert _uses_kernel(few_rows.unembed, x, e)
    np.testing.assert_allclose(few_rows.unembed(x, e), x @ e.astype(jnp.float32).T, rtol=1e-5)
    for dot, kernel in ((few_rows.dot_general, True), (jax.lax.dot_general, False)):
        dense = Dense(40, dot_general=dot)
        params = {"params": {"kernel": w}}
        fn = lambda p, a: dense.apply(p, a)
        assert ("gptk_few_rows_nn_bf16" in jax.jit(fn).lower(params, x).as_text()) == kernel
        np.testing.assert_allclose(fn(params, x), x @ w.astype(jnp.float32), rtol=1e-5)
