"""Loss, train_step and eval_step of MTP head training: pure functions, jitted once (sharding.py).

Letters (docs/design.md): B batch, T positions, X supervised positions per row (or per row group,
packed), J trained offsets, W largest offset, Y row groups, Z chunks, C positions per chunk,
D width, V vocab.

    batch: tokens, positions, token_mask, loss_mask [B,T]; targets, target_mask [B,T,W]
           (gold: targets[b,t,o-1] = tokens[b,t+o], prompts.shift_targets); with the feature
           cache also hidden / hidden_normed [B,T,D] and trunk_argmax [B,T]
      -> frozen trunk under stop_gradient (skipped when the cache supplied its outputs)
      -> targets of offset o at t: gold tokens[t+o], or the trunk's own argmax at t+o-1
         (teacher-forced self-distillation: what verification will compare drafts against)
      -> supervised positions: t where any trained offset has a target (or only the last prompt
         token, the seed's "first W target tokens only") -> gather_index [B,X]
      -> head.train_logits(..., gather_index) [B,X,J,V] -> cross-entropy per offset, against
         the target token (hard) or, targets 'trunk_soft', against the trunk's whole next-token
         distribution at t+o-1, recomputed from hidden_normed by the frozen unembedding
         (soft_targets.py; packed heads: a chunk at a time)
Only X <= T positions get logits: B*T*J*V floats would not fit for a 128k vocabulary.

Packed positions (`position_chunk` C > 0, heads that read each position on its own: linear,
PoMa): X is the longest row's count, so most of [B,X] is padding (WMT rows: mean 27 of X=80).
Instead the B*X gathered positions are packed valid-first within each of Y row groups
([Y, B/Y*X], Y = the data shards, so packing never crosses devices), cut into chunks of C, and
the frozen unembedding projects one chunk [Y,C,J,V] at a time, fused with its gradient
(chunked_loss.py): chunks with no valid position cost nothing. Same positions, same targets, same
loss up to summation order.

Metrics are sums and counts per offset ([J] arrays); the host divides at log time. With
`axis_name` (pmap) the loss is normalised by the global counts and grads / metrics are summed
over devices, which is the update one device would make on the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.heads import HeadFeatures, make_head
from gptk_jax.heads.common import trunk_final_norm, trunk_unembed, unembedding_weights
from gptk_jax.heads.config import HeadConfig
from gptk_jax.llama.model import Llama
from gptk_jax.training.chunked_loss import _logits as project, chunked_cross_entropy
from gptk_jax.training.draft_metrics import DRAFT_KEYS, draft_positions, draft_sums
from gptk_jax.training.soft_targets import (chunked_soft_cross_entropy, soft_cross_entropy,
                                            teacher_hidden)
from gptk_jax.training.settings import TrainingError
from gptk_jax.training.state import TrainState
from gptk_jax.features.trunk_argmax import chunked_argmax
from gptk_jax.training.vocab import DraftVocab

TOP_K = 5  # eval reports top-1 and top-5 accuracy


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static a step needs (hashable: part of the jit cache key)."""
    trunk_config: LlamaConfig
    head_config: HeadConfig
    targets: str                    # 'gold' | 'trunk_argmax' | 'trunk_soft' (the trunk's whole
                                    # distribution at t+o-1: soft_targets.py)
    offset_weights: tuple           # [J] loss weight per trained offset
    first_target_tokens_only: bool  # supervise the last prompt token only (seed)
    positions_per_row: int          # X
    argmax_chunk: int               # positions per unembedding chunk for the trunk's argmax
    position_chunk: int = 0         # C: >0 packs the supervised positions of per-position heads
                                    # and projects them C at a time, skipping empty chunks
    pack_groups: int = 1            # Y: rows are packed within Y groups (the data shards)
    draft_vocab: tuple = ()         # U ids: the heads' softmax over these only (loss.
                                    # draft_vocab_size, training/vocab.py); (): all V

    @property
    def vocab(self) -> Optional[DraftVocab]:
        """The draft vocabulary's remap / restricted unembedding, None without one."""
        if not self.draft_vocab:
            return None
        return DraftVocab(self.draft_vocab, self.trunk_config.vocab_size)

    @property
    def offsets(self) -> tuple:
        return self.head_config.offsets

    @property
    def max_offset(self) -> int:
        return max(self.head_config.offsets)


# --------------------------------------------------------------------------------------------
# Trunk outputs and targets
# --------------------------------------------------------------------------------------------

def trunk_outputs(cfg: StepConfig, trunk_params: dict, batch: dict, need_argmax: bool):
    """-> (hidden, hidden_normed [B,T,D], trunk_argmax [B,T] or None), all without gradient.

    Cached batches carry them; a cache may hold just the one the head reads
    (`HeadConfig.trunk_field`): a missing hidden_normed is the trunk's final norm of hidden
    (soft targets read it); a missing hidden cannot be recovered, so a head that reads it
    needs it cached (otherwise the field aliases hidden_normed, which no other head reads)."""
    if "hidden" in batch or "hidden_normed" in batch:
        if "hidden" not in batch and cfg.head_config.trunk_field == "hidden":
            raise TrainingError(
                f"head {cfg.head_config.kind!r} recipe {cfg.head_config.recipe!r} reads the "
                "trunk's hidden state before the final norm ('hidden'), but the feature cache "
                "holds only 'hidden_normed': cache 'hidden' for it "
                "(features/cache.py cached_fields should follow HeadConfig.trunk_field) or "
                "set features.cache=False")
        hidden = batch.get("hidden", batch.get("hidden_normed"))
        hidden_normed = batch.get("hidden_normed")
        if hidden_normed is None:
            hidden_normed = trunk_final_norm(cfg.trunk_config, trunk_params, hidden)
        argmax = batch.get("trunk_argmax")
        if need_argmax and argmax is None:
            argmax = chunked_argmax(cfg.trunk_config, trunk_params, hidden_normed,
                                    cfg.argmax_chunk)
        return hidden, jax.lax.stop_gradient(hidden_normed), argmax
    out = Llama(cfg.trunk_config).apply({"params": jax.lax.stop_gradient(trunk_params)},
                                        batch["tokens"], batch["positions"],
                                        token_mask=batch["token_mask"], compute_logits=False)
    hidden = jax.lax.stop_gradient(out.hidden)
    hidden_normed = jax.lax.stop_gradient(out.hidden_normed)
    argmax = None
    if need_argmax:
        argmax = chunked_argmax(cfg.trunk_config, trunk_params, hidden_normed, cfg.argmax_chunk)
    return hidden, hidden_normed, argmax


def argmax_targets(trunk_argmax: jax.Array, k: int, fill_id: int = 0) -> jax.Array:
    """[B,T] -> [B,T,W]: out[b,t,j] = trunk_argmax[b,t+j] (the trunk's own token for position
    t+j+1), fill_id past the end. Column o-1 is the self-distillation target of offset o."""
    b, t = trunk_argmax.shape
    padded = jnp.concatenate([trunk_argmax, jnp.full((b, k), fill_id, trunk_argmax.dtype)], 1)
    index = jnp.arange(t)[:, None] + jnp.arange(k)[None, :]               # [T,W]
    return padded[:, index]


def supervised_positions(target_mask: jax.Array, loss_mask: jax.Array,
                         first_target_tokens_only: bool) -> jax.Array:
    """target_mask [B,T,J] (trained offsets), loss_mask [B,T] -> [B,T] bool positions that get
    a loss: every t with a target for some offset, or only the last prompt token."""
    any_target = target_mask.any(axis=-1)
    if not first_target_tokens_only:
        return any_target
    t = loss_mask.shape[1]
    first_target = jnp.argmax(loss_mask, axis=1)                           # [B]
    last_prompt = (jnp.arange(t)[None, :] == (first_target - 1)[:, None])
    return last_prompt & loss_mask.any(axis=1, keepdims=True) & any_target


def gather_index(position_mask: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """position_mask [B,T] -> (index [B,X] int32 of the first X True positions in order,
    valid [B,X]); rows with fewer fill with position 0, valid False."""
    order = jnp.argsort(~position_mask, axis=1, stable=True)[:, :m].astype(jnp.int32)
    valid = jnp.take_along_axis(position_mask, order, axis=1)
    return jnp.where(valid, order, 0), valid


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B,T,...] at index [B,X] -> [B,X,...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def pack_order(valid: jax.Array, groups: int) -> jax.Array:
    """valid [B,X] -> order [Y, B/Y*X] int32: within each group of B/Y consecutive rows, the
    valid entries first (row-major order kept), then the rest."""
    b, m = valid.shape
    return jnp.argsort(~valid.reshape(groups, (b // groups) * m), axis=1,
                       stable=True).astype(jnp.int32)


def packed(x: jax.Array, order: jax.Array, chunk: int) -> jax.Array:
    """x [B,X,...] laid out like pack_order's input -> [Z,Y,C,...]: each group's entries in
    `order`, padded (zeros / False) to Z*C and cut into Z chunks of C."""
    g, r = order.shape
    x = x.reshape((g, r) + x.shape[2:])
    x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    n = -(-r // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - r)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((g, n, chunk) + x.shape[2:]), 1, 0)


def grouped(x: jax.Array, groups: int) -> jax.Array:
    """[B,T,...] -> [Y, B/Y*T, ...] (each group's rows one after another)."""
    b, t = x.shape[:2]
    return x.reshape((groups, (b // groups) * t) + x.shape[2:])


def packed_index(index: jax.Array, valid: jax.Array, t: int, groups: int, chunk: int):
    """index / valid [B,X] (gather_index over T positions) -> (order [Y,B/Y*X] for `packed`,
    flat [Z,Y,C] int32: the packed positions in the grouped features, `grouped`)."""
    b = index.shape[0]
    order = pack_order(valid, groups)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None] % (b // groups)
    return order, packed(rows * t + index, order, chunk)


def packed_sums(apply_hidden, unembedding, index, valid, targets, mask, t: int, groups: int,
                chunk: int, teacher=None):
    """Sums [J] of the masked cross-entropy and top-1 hits over the supervised positions, packed
    and computed a chunk at a time (chunked_loss). index / valid [B,X] (gather_index), targets /
    mask [B,X,J]; apply_hidden(gather_index [Y,X]) -> [Y,X,J,D], the head's hidden states at
    those positions of the grouped features (`grouped`); unembedding = (w, tied).
    teacher = (grouped hidden_normed [Y,N,D], offsets): soft cross-entropy against the trunk's
    distribution at t+o-1 instead (soft_targets.py), its logits recomputed chunk by chunk."""
    order, flat = packed_index(index, valid, t, groups, chunk)              # [Z,Y,C]
    n, g, c = flat.shape
    h = apply_hidden(jnp.moveaxis(flat, 0, 1).reshape(g, n * c))            # [Y,Z*C,J,D]
    h = jnp.moveaxis(h.reshape((g, n, c) + h.shape[2:]), 1, 0)              # [Z,Y,C,J,D]
    w, tied = unembedding
    if teacher is None:
        return chunked_cross_entropy(tied, w, h, packed(targets, order, chunk),
                                     packed(mask, order, chunk))
    hidden_normed, offsets = teacher
    teacher_h = teacher_hidden(hidden_normed, jnp.moveaxis(flat, 0, 1).reshape(g, n * c),
                               offsets)                                     # [Y,Z*C,J,D]
    teacher_h = jnp.moveaxis(teacher_h.reshape((g, n, c) + teacher_h.shape[2:]), 1, 0)
    return chunked_soft_cross_entropy(tied, w, h, teacher_h, packed(targets, order, chunk),
                                      packed(mask, order, chunk))


def offset_targets(cfg: StepConfig, batch: dict, trunk_argmax: Optional[jax.Array], source: str):
    """-> (targets [B,T,J], next_tokens [B,T,W]) from `source` ('gold' | 'trunk_argmax' |
    'trunk_soft': the hard targets are the trunk's argmax, the soft distribution's mode);
    next_tokens are the LSTM's teacher-forcing inputs (tokens at t+1..t+W) from the same
    source. The mask is always the gold target_mask: position t+o holds a target token."""
    columns = np.asarray(cfg.offsets) - 1
    if source == "gold":
        every = batch["targets"]
    else:
        every = argmax_targets(trunk_argmax, cfg.max_offset)
    return every[..., columns], every


def _features(batch, hidden, hidden_normed, next_tokens) -> HeadFeatures:
    return HeadFeatures(hidden=hidden, hidden_normed=hidden_normed, positions=batch["positions"],
                        tokens=batch["tokens"], token_mask=batch["token_mask"],
                        next_tokens=next_tokens)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [...,V] float32, targets [...] -> negative log-likelihood [...]."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def _psum(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

def head_unembedding(cfg: StepConfig, trunk_params: dict) -> tuple[jax.Array, bool]:
    """(w, tied): the frozen unembedding, restricted to the draft vocabulary's rows (tied:
    [U,D]; untied: [D,U]) when cfg has one."""
    w, tied = unembedding_weights(cfg.trunk_config, trunk_params)
    vocab = cfg.vocab
    return (w, tied) if vocab is None else (vocab.rows(w, tied), tied)


def head_logits(cfg: StepConfig, head, head_params, trunk_params, feats: HeadFeatures, index,
                deterministic: bool, rngs=None) -> jax.Array:
    """-> [B,X,J,V] logits at index [B,X]; with a draft vocabulary [B,X,J,U] over its ids (in
    their order): per-position heads project their hidden states onto the U rows only, the
    others' full logits are cut to those columns."""
    kwargs = {} if rngs is None else {"rngs": rngs}
    vocab = cfg.vocab
    if vocab is not None and head.projects_hidden:
        h = head.apply({"params": head_params}, trunk_params, feats, deterministic=deterministic,
                       gather_index=index, method=head.train_hidden, **kwargs)
        w, tied = head_unembedding(cfg, trunk_params)
        return project(h, w, tied)
    logits = head.apply({"params": head_params}, trunk_params, feats,
                        deterministic=deterministic, gather_index=index,
                        method=head.train_logits, **kwargs)
    if vocab is not None:
        logits = jnp.take(logits, jnp.asarray(vocab.ids), axis=-1)
    return logits


def _loss_sums(cfg: StepConfig, head, head_params, trunk_params, feats: HeadFeatures, index,
               valid, targets, mask, rng):
    """-> (loss sums [J], top-1 hits [J]) over the masked [B,X,J] entries at index [B,X]: hard
    cross-entropy against targets, or (targets 'trunk_soft') soft cross-entropy against the
    trunk's distribution at t+o-1 (soft_targets.py); top-1 always against the hard targets.
    With a draft vocabulary, targets are its local indices and mask holds only targets in it."""
    soft = cfg.targets == "trunk_soft"
    if cfg.position_chunk > 0 and head.per_position:
        groups = cfg.pack_groups
        feats_g = jax.tree.map(lambda x: grouped(x, groups), feats)

        def apply_hidden(packed_index):                                     # [Y,X]
            return head.apply({"params": head_params}, trunk_params, feats_g,
                              deterministic=False, gather_index=packed_index,
                              method=head.train_hidden, rngs={"dropout": rng})
        return packed_sums(apply_hidden, head_unembedding(cfg, trunk_params),
                           index, valid, targets, mask, feats.tokens.shape[1], groups,
                           cfg.position_chunk,
                           teacher=(feats_g.hidden_normed, cfg.offsets) if soft else None)
    logits = head_logits(cfg, head, head_params, trunk_params, feats, index, False,
                         rngs={"dropout": rng})                             # [B,X,J,V or U]
    if soft:
        teacher = trunk_unembed(cfg.trunk_config, trunk_params,
                                teacher_hidden(feats.hidden_normed, index, cfg.offsets))
        nll = soft_cross_entropy(logits, teacher)                           # [B,X,J]
    else:
        nll = cross_entropy(logits, targets)                                # [B,X,J]
    loss_sum = jnp.where(mask, nll, 0.0).sum(axis=(0, 1))                   # [J]
    top1 = ((jnp.argmax(logits, axis=-1) == targets) & mask).sum(axis=(0, 1))
    return loss_sum, top1.astype(jnp.float32)


def train_step(cfg: StepConfig, tx: optax.GradientTransformation, state: TrainState,
               trunk_params: dict, batch: dict, axis_name: Optional[str] = None):
    """One optimizer step on the head params -> (state, metrics). The trunk params are an
    argument only: no gradient, no optimizer state."""
    rng = jax.random.fold_in(state.rng, state.step)
    hidden, hidden_normed, trunk_argmax = trunk_outputs(cfg, trunk_params, batch,
                                                        cfg.targets != "gold")
    targets, next_tokens = offset_targets(cfg, batch, trunk_argmax, cfg.targets)
    target_mask = batch["target_mask"][..., np.asarray(cfg.offsets) - 1]    # [B,T,J]
    position_mask = supervised_positions(target_mask, batch["loss_mask"],
                                         cfg.first_target_tokens_only)
    index, valid = gather_index(position_mask, cfg.positions_per_row)      # [B,X]
    targets = _at(targets, index)                                           # [B,X,J]
    mask = _at(target_mask, index) & valid[..., None]                       # [B,X,J]
    counts = mask.sum(axis=(0, 1)).astype(jnp.float32)                      # [J]
    vocab = cfg.vocab
    if vocab is not None:    # softmax over U: targets as indices into U, those outside masked
        targets, in_vocab = vocab.remap(targets)
        oov = (mask & ~in_vocab).sum(axis=(0, 1)).astype(jnp.float32)      # [J]
        mask = mask & in_vocab
    else:
        oov = jnp.zeros_like(counts)
    global_counts = _psum(counts - oov, axis_name)                         # the loss's entries
    weights = np.asarray(cfg.offset_weights, np.float32)
    weights = jnp.asarray(weights / weights.sum())                          # a weighted mean
    feats = _features(batch, hidden, hidden_normed, next_tokens)
    head = make_head(cfg.head_config, cfg.trunk_config)

    def loss_fn(head_params):
        loss_sum, top1 = _loss_sums(cfg, head, head_params, trunk_params, feats, index, valid,
                                    targets, mask, rng)
        objective = jnp.sum(weights * loss_sum / jnp.maximum(global_counts, 1.0))
        return objective, (loss_sum, top1)

    (objective, (loss_sum, top1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.head_params)
    grads = _psum(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.head_params)
    head_params = optax.apply_updates(state.head_params, updates)
    metrics = {"objective": objective, "loss_sum": loss_sum, "count": counts, "top1": top1,
               "tokens": batch["token_mask"].sum().astype(jnp.float32),
               "dropped_positions": (position_mask.sum() - valid.sum()).astype(jnp.float32)}
    if vocab is not None:
        metrics["oov"] = oov       # supervised entries whose target is outside U (no loss)
    metrics = _psum(metrics, axis_name)
    metrics["grad_norm"] = optax.global_norm(grads)      # grads are already summed
    new_state = state.replace(step=state.step + 1, head_params=head_params, opt_state=opt_state)
    return new_state, metrics


def eval_step(cfg: StepConfig, head_params: Any, trunk_params: dict, batch: dict,
              axis_name: Optional[str] = None) -> dict:
    """Sums per offset [J]: count, loss / top-1 / top-5 against the gold tokens and against the
    trunk's own argmax, over every position with a target (cfg.first_target_tokens_only is
    ignored: evaluation measures what decoding needs); draft_count / draft_top1 / draft_chain
    over the positions where decoding drafts (training/draft_metrics.py)."""
    hidden, hidden_normed, trunk_argmax = trunk_outputs(cfg, trunk_params, batch, True)
    gold, next_tokens = offset_targets(cfg, batch, trunk_argmax, cfg.targets)
    if cfg.targets != "gold":
        gold, _ = offset_targets(cfg, batch, trunk_argmax, "gold")
    trunk, _ = offset_targets(cfg, batch, trunk_argmax, "trunk_argmax")
    target_mask = batch["target_mask"][..., np.asarray(cfg.offsets) - 1]
    index, valid = gather_index(target_mask.any(axis=-1), cfg.positions_per_row)
    mask = _at(target_mask, index) & valid[..., None]                       # [B,X,J]
    # where decoding drafts (draft_metrics.py): every draft offset has a target, t+1 too
    at_draft = _at(draft_positions(batch["target_mask"], cfg.offsets), index) & valid  # [B,X]
    head = make_head(cfg.head_config, cfg.trunk_config)
    feats = _features(batch, hidden, hidden_normed, next_tokens)
    targets = {"gold": _at(gold, index), "trunk": _at(trunk, index)}       # [B,X,J] each

    vocab = cfg.vocab

    def sums(head_logits, targets, mask, at_draft, skip=None):
        """logits [...,J,V] (a draft vocabulary: [...,J,U]), targets / mask [...,J], at_draft
        [...] -> ({metric: [J] sums over the masked}, the walk's carry); draft_* and walk_*
        (draft_metrics.draft_sums, walking the last position axis) against the trunk's argmax. With a draft vocabulary a target outside it is a miss for top-k and
        the drafts, and is left out of the loss (oov_*: their count)."""
        # top-1 by argmax, top-5 by the target's rank (logits above it): one pass over V each;
        # jax.lax.top_k here made evaluation ~8x slower than a training step on CPU
        top1 = jnp.argmax(head_logits, axis=-1)                             # [...,J]
        if vocab is not None:
            top1 = vocab.to_global(top1)                                    # ids in U
        total = lambda x: jnp.where(mask, x, 0).reshape(-1, mask.shape[-1]).sum(0).astype(
            jnp.float32)
        out = {}
        for name, tgt in targets.items():
            local, in_vocab = (tgt, True) if vocab is None else vocab.remap(tgt)
            picked = jnp.take_along_axis(head_logits, local[..., None], axis=-1)   # [...,J,1]
            rank = (head_logits > picked).sum(axis=-1)                       # [...,J]
            nll = cross_entropy(head_logits, local)
            out[f"loss_{name}"] = total(jnp.where(in_vocab, nll, 0.0))
            out[f"top1_{name}"] = total(top1 == tgt)
            out[f"top{TOP_K}_{name}"] = total((rank < TOP_K) & in_vocab)
            if vocab is not None:
                out[f"oov_{name}"] = total(~in_vocab)
        drafts, skip = draft_sums(top1, targets["trunk"], at_draft, cfg.offsets, skip,
                                  return_skip=True)
        out.update(drafts)
        return out, skip

    if cfg.position_chunk > 0 and head.per_position:
        # packed as in train_step; no gradient here, so a plain map over chunks skips the empty
        groups, chunk = cfg.pack_groups, cfg.position_chunk
        order, flat = packed_index(index, valid, target_mask.shape[1], groups, chunk)
        feats_g = jax.tree.map(lambda x: grouped(x, groups), feats)
        chunk_targets = {n: packed(t, order, chunk) for n, t in targets.items()}
        chunk_mask = packed(mask, order, chunk)                             # [Z,Y,C,J]
        chunk_draft = packed(at_draft, order, chunk)                        # [Z,Y,C]
        zero = {f"{metric}_{name}": jnp.zeros(mask.shape[-1:], jnp.float32)
                for name in targets for metric in ("loss", "top1", f"top{TOP_K}") +
                (("oov",) if vocab is not None else ())}
        zero.update({key: jnp.zeros(mask.shape[-1:], jnp.float32) for key in DRAFT_KEYS})

        def one(skip, xs):     # skip [Y]: the walk's carry from the chunk before (a row's
            idx, tgt, msk, drf = xs   # entries continue there, draft_metrics.walk)

            def run(skip):
                logits = head_logits(cfg, head, head_params, trunk_params, feats_g, idx,
                                     True)                                  # [Y,C,J,V or U]
                return sums(logits, tgt, msk, drf, skip)
            out, skip = jax.lax.cond(msk.any(), run, lambda skip: (zero, skip), skip)
            return skip, out
        _, per_chunk = jax.lax.scan(one, jnp.zeros((groups,), jnp.int32),
                                    (flat, chunk_targets, chunk_mask, chunk_draft))
        out = jax.tree.map(lambda x: x.sum(axis=0), per_chunk)
    else:
        logits = head_logits(cfg, head, head_params, trunk_params, feats, index,
                             True)                                          # [B,X,J,V or U]
        out, _ = sums(logits, targets, mask, at_draft)
    out["count"] = mask.sum(axis=(0, 1)).astype(jnp.float32)
    return _psum(out, axis_name)


def init_train_state(cfg: StepConfig, tx: optax.GradientTransformation, trunk_params: dict,
                     seed: int) -> TrainState:
    """Fresh head params (PoMa copies the trunk's final norm scale) and optimizer state; the
    optimizer sees the head params only."""
    from gptk_jax.heads import init_head_params
    head = make_head(cfg.head_config, cfg.trunk_config)

    def init(trunk_params, key):
        init_rng, step_rng = jax.random.split(key)
        head_params = init_head_params(head, trunk_params, init_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), head_params=head_params,
                          opt_state=tx.init(head_params), rng=step_rng)
    return jax.jit(init)(trunk_params, jax.random.PRNGKey(seed))
