"""The Llama 3 trunk in Flax Linen.

`Llama.__call__(tokens, positions, cache, token_mask)` -> TrunkOutput(logits, hidden,
hidden_normed, cache). The cache is explicit (see kv_cache.py); without one, the call attends
within the T tokens given (training). Layers run in a Python loop (params `layers_{i}`) or under
`nn.scan` (params stacked under `layers`); `stack_layers` / `unstack_layers` convert between the
two, and checkpoints on disk are always stacked.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gptk_jax.kernels.few_rows import dot_general_for, unembed
from gptk_jax.llama.attention import Attention, attention_mask
from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.kv_cache import KVCache, write_rows
from gptk_jax.llama.layers import MLP, RMSNorm
from gptk_jax.llama.rope import inverse_frequencies


@flax.struct.dataclass
class TrunkOutput:
    logits: Optional[jax.Array]  # [B,T,V] float32 (or [B,1,V] with logits_index; None: skipped)
    hidden: jax.Array            # [B,T,D] last layer output, before the final norm
    hidden_normed: jax.Array     # [B,T,D] after the final norm
    cache: Optional[KVCache]


# The unrolled layers call one jitted function of a layer's params (`_block_fn`), so a trunk
# call is traced through one layer instead of L: tracing the 30 layers of SmolLM2 was most of
# an evaluation's Python time (docs/benchmarks.md). XLA inlines the L calls before optimising,
# so the compiled program is the same. Eager calls (not traced) run op by op as before: there a
# jitted layer would compile a layer program per input shape. False: each layer traced.
SHARED_LAYER_TRACE = True


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, write_start):
        """x [B,T,D]; layer_cache (k, v): this layer's [B,K,S,H] each. Returns (x, (k, v))."""
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        h = RMSNorm(c.norm_eps, dtype, pdtype, name="attention_norm")(x)
        dot = dot_general_for(c.matmul)
        attn, k, v = Attention(c.n_heads, c.n_kv_heads, c.head_dim, dtype, pdtype, dot,
                               c.fuse_projections, name="attention")(
            h, positions, inv_freq, mask, *layer_cache, write_start)
        x = x + attn
        h = RMSNorm(c.norm_eps, dtype, pdtype, name="ffn_norm")(x)
        x = x + MLP(c.ffn_dim, dtype, pdtype, dot, c.fuse_projections,
                    name="feed_forward")(h)
        return x, (k, v)


@functools.lru_cache(maxsize=None)
def _block_fn(config: LlamaConfig):
    """jit (layer params, x, (k, v), positions, mask, write_start) -> Block's (x, (k, v)): one
    trace per input shape, shared by every layer and every program that calls it."""
    block = Block(config, parent=None)     # a top-level module, not a child of the caller

    def run(params, x, layer_cache, positions, mask, write_start):
        return block.apply({"params": params}, x, layer_cache, positions, mask, write_start)
    return jax.jit(run)


class Llama(nn.Module):
    config: LlamaConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.tok_embeddings = nn.Embed(c.vocab_size, c.dim, dtype=dtype, param_dtype=pdtype,
                                       embedding_init=nn.initializers.normal(0.02))
        if c.scan_layers:
            self.layers = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.n_layers,
            )(c)
        else:
            self.layers = [Block(c) for _ in range(c.n_layers)]
        self.norm = RMSNorm(c.norm_eps, dtype, pdtype)
        if not c.tie_embeddings:
            self.output = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
                                   dot_general=dot_general_for(c.matmul))

    def embed(self, tokens):  # [B,T] -> [B,T,D]
        return self.tok_embeddings(tokens)

    def final_norm(self, hidden):  # [B,T,D] -> [B,T,D]
        return self.norm(hidden)

    def unembed(self, hidden_normed):  # [B,T,D] -> [B,T,V] float32
        if self.config.tie_embeddings and self.config.matmul == "few_rows":
            embedding = self.tok_embeddings.embedding.astype(hidden_normed.dtype)
            logits = unembed(hidden_normed, embedding)
        elif self.config.tie_embeddings:
            logits = self.tok_embeddings.attend(hidden_normed)
        else:
            logits = self.output(hidden_normed)
        return logits.astype(jnp.float32)

    def __call__(self, tokens, positions, cache: Optional[KVCache] = None,
                 token_mask=None, logits_index=None, compute_logits: bool = True,
                 tree_mask=None) -> TrunkOutput:
        """tokens, positions [B,T] int32; token_mask [B,T] bool (False: padding);
        logits_index [B] int32: only those positions' logits ([B,1,V]); tree_mask [T,T] bool
        (several drafts verified at once, decoding/tree.py): new token i sees new token j only
        where tree_mask[i, j] (and j <= i); the cache before them as usual."""
        c = self.config
        b, t = tokens.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)
        if cache is None:  # attend within the new tokens only
            shape = (b, c.n_kv_heads, t, c.head_dim)
            ks = vs = (jnp.zeros(shape, jnp.dtype(c.dtype)),) * c.n_layers
            valid, lengths = jnp.zeros((b, t), bool), jnp.zeros((b,), jnp.int32)
        else:
            ks, vs, valid, lengths = cache.k, cache.v, cache.valid, cache.lengths
        valid = write_rows(valid, token_mask, lengths)        # [B,S]
        mask = attention_mask(valid, lengths, t)              # [B,T,S]
        if tree_mask is not None:   # new slots lengths+j: only the tree's ancestors
            rel = jnp.arange(valid.shape[1])[None, :] - lengths[:, None]          # [B,S]
            inside = (rel >= 0) & (rel < t)
            allowed = jnp.asarray(tree_mask)[:, jnp.clip(rel, 0, t - 1)]          # [T,B,S]
            mask = mask & (~inside[:, None, :] | jnp.moveaxis(allowed, 0, 1))

        x = self.embed(tokens)
        if c.scan_layers:   # scan carries the layers' buffers stacked: [L,B,K,S,H]
            x, (ks, vs) = self.layers(x, (jnp.stack(ks), jnp.stack(vs)), positions, mask,
                                      lengths)
            ks, vs = tuple(ks), tuple(vs)
        else:
            new_k, new_v = [], []
            shared = _block_fn(c) if SHARED_LAYER_TRACE and not self.is_initializing() \
                and isinstance(x, jax.core.Tracer) else None      # eager: op by op, as before
            for i, (layer, k, v) in enumerate(zip(self.layers, ks, vs)):  # each writes its own
                if shared is None:                                        # buffer in place
                    x, (k, v) = layer(x, (k, v), positions, mask, lengths)
                else:
                    x, (k, v) = shared(self.variables["params"][f"layers_{i}"], x, (k, v),
                                       positions, mask, lengths)
                new_k.append(k)
                new_v.append(v)
            ks, vs = tuple(new_k), tuple(new_v)
        hidden = x
        hidden_normed = self.final_norm(hidden)
        logits = None
        if compute_logits:
            h = hidden_normed
            if logits_index is not None:
                h = jnp.take_along_axis(h, logits_index[:, None, None], axis=1)  # [B,1,D]
            logits = self.unembed(h)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=ks, v=vs, valid=valid, lengths=lengths + t)
        return TrunkOutput(logits=logits, hidden=hidden, hidden_normed=hidden_normed,
                           cache=new_cache)


def stack_layers(params: dict, n_layers: int) -> dict:
    """Loop layout (`layers_{i}`) -> stacked layout (`layers`, leading axis L)."""
    if "layers" in params:
        return params
    per_layer = [params[f"layers_{i}"] for i in range(n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Stacked layout -> loop layout."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


def params_for_model(params: dict, config: LlamaConfig) -> dict:
    """Puts stacked (on-disk) params into the layout `Llama(config)` expects (fused
    projections where config.fuse_projections)."""
    if config.scan_layers:
        params = stack_layers(params, config.n_layers)
    else:
        params = unstack_layers(params, config.n_layers)
    return fuse_projections(params) if config.fuse_projections else params


def fuse_projections(params: dict) -> dict:
    """Each layer's wq | wk | wv -> attention "wqkv" [..., D, N+2K, H] and w1 | w3 ->
    feed_forward "w13" [..., D, 2F] (concatenated once; either layer layout; fused params are
    returned as they are). The same products, fewer of them: each output is the same sum."""
    def fuse(layer: dict) -> dict:
        attn, ffn = layer["attention"], layer["feed_forward"]
        if "wqkv" in attn:
            return layer
        qkv = jnp.concatenate([attn[n]["kernel"] for n in ("wq", "wk", "wv")], axis=-2)
        w13 = jnp.concatenate([ffn["w1"]["kernel"], ffn["w3"]["kernel"]], axis=-1)
        return {**layer,
                "attention": {"wqkv": {"kernel": qkv}, "wo": attn["wo"]},
                "feed_forward": {"w13": {"kernel": w13}, "w2": ffn["w2"]}}
    return {name: fuse(value) if name == "layers" or name.startswith("layers_") else value
            for name, value in params.items()}


def init_params(config: LlamaConfig, rng: Any, *, stacked: bool = True) -> dict:
    """Random params (tests, shapes); stacked layout unless stacked=False."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = Llama(config).init(rng, tokens, tokens)["params"]
    params = jax.tree.map(lambda x: x, params)  # plain dicts
    return stack_layers(params, config.n_layers) if stacked else \
        unstack_layers(params, config.n_layers)


def abstract_params(config: LlamaConfig) -> dict:
    """ShapeDtypeStructs of the stacked params, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
