"""Trained MTP heads (gptk_jax.heads) as a drafter, and the draft vocabulary they draft over.

    drafter, variables = head_drafter(head_config, head_params, trunk_config, trunk_params,
                                      tokens_per_step=None, draft_vocab=None)

`variables` = {"head": the head params, "trunk": the trunk leaves heads read (embedding, final
norm, output: `heads.common.trunk_params_for_heads`), and with a draft vocabulary
"draft_vocab": {"ids": [U] int32, "rows": [U,D] their unembedding rows}}. The draft
vocabulary is a decoding choice and lives only here: the drafter passes it to the head as the
variable collection `heads.common.DRAFT_VOCAB_COLLECTION`, and the head's draft argmax runs over
those ids (projecting onto the rows, 1/(V/U) of the full projection's cost). The trunk verifies
every draft, so it changes speed and acceptance, never the output.

Letters: B batch, W tokens per verify step (W-1 drafts), D width, V vocab, U draft vocabulary.
(K is kept for kv heads.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from gptk_jax.decoding.loop import Drafter
from gptk_jax.errors import GptkError
from gptk_jax.heads import make_head
from gptk_jax.heads.common import (DRAFT_VOCAB_COLLECTION, trunk_params_for_heads,
                                   unembedding_weights)
from gptk_jax.heads.config import HeadConfig
from gptk_jax.llama.config import LlamaConfig


class DraftVocabError(GptkError, ValueError):
    """A draft vocabulary that is empty, repeats ids, or holds ids outside the trunk's."""


@dataclasses.dataclass(frozen=True)
class HeadDrafter(Drafter):
    """Trained MTP heads as a drafter; variables = `HeadDrafter.variables(...)`."""
    head: Any        # flax.linen Module from gptk_jax.heads.make_head
    max_drafts: int  # head_config.k - 1

    @staticmethod
    def variables(head_params: Any, trunk_params: Any, draft_vocab: Optional[dict] = None
                  ) -> dict:
        """draft_vocab: `draft_vocabulary(...)` or None (the whole vocabulary)."""
        out = {"head": head_params, "trunk": trunk_params_for_heads(trunk_params)}
        if draft_vocab is not None:
            out["draft_vocab"] = draft_vocab
        return out

    def _apply(self, variables, method, *args):
        head_vars = {"params": variables["head"]}
        if "draft_vocab" in variables:
            head_vars[DRAFT_VOCAB_COLLECTION] = variables["draft_vocab"]
        return self.head.apply(head_vars, variables["trunk"], *args, method=method)

    def init_state(self, variables, batch_size, capacity, max_new_tokens=None):
        if self.head.state_needs_capacity:      # a KV cache of its own (eagle)
            return self._apply(variables, "init_state", batch_size, capacity, max_new_tokens)
        return self._apply(variables, "init_state", batch_size)

    def advance(self, variables, state, hidden_normed, advance_mask, tokens):
        if self.head.advance_reads_tokens:      # pairs of a feature and the next token (eagle)
            return self._apply(variables, "advance", state, hidden_normed, advance_mask, tokens)
        return self._apply(variables, "advance", state, hidden_normed, advance_mask)

    def draft(self, variables, state, last_hidden, last_hidden_normed, last_position, next_token):
        return self._apply(variables, "draft", state, last_hidden, last_hidden_normed,
                           last_position, next_token)

    def draft_scored(self, variables, state, last_hidden, last_hidden_normed, last_position,
                     next_token):
        """Drafts and each one's softmax probability under the head (auto W's confidence)."""
        return self._apply(variables, "draft_scored", state, last_hidden, last_hidden_normed,
                           last_position, next_token)


def check_draft_vocab(draft_vocab: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    """The ids as a tuple of ints, or DraftVocabError."""
    try:
        ids = tuple(int(i) for i in draft_vocab)   # accepts arrays and lists
    except (TypeError, ValueError):
        raise DraftVocabError("draft_vocab must be a sequence of token ids") from None
    if not ids:
        raise DraftVocabError("draft_vocab is empty (use None for the full vocabulary)")
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise DraftVocabError("draft_vocab must hold distinct non-negative token ids")
    if max(ids) >= vocab_size:
        raise DraftVocabError(f"draft_vocab holds id {max(ids)} >= trunk vocab_size {vocab_size}")
    return ids


def draft_vocabulary(trunk_config: LlamaConfig, trunk_params: dict,
                     draft_vocab: Sequence[int]) -> dict:
    """{"ids": [U] int32, "rows": [U,D]}: the ids and their unembedding rows (tied: embedding
    rows; untied: the output kernel's columns), computed once here, not in every step."""
    ids = jnp.asarray(check_draft_vocab(draft_vocab, trunk_config.vocab_size), jnp.int32)
    weights, tied = unembedding_weights(trunk_config, trunk_params)
    rows = jnp.take(weights, ids, axis=0) if tied else jnp.take(weights, ids, axis=1).T
    return {"ids": ids, "rows": rows}                                          # [U], [U,D]


def head_drafter(head_config: HeadConfig, head_params: Any, trunk_config: LlamaConfig,
                 trunk_params: Any, tokens_per_step: Optional[int] = None,
                 draft_vocab: Optional[Sequence[int]] = None, matmul: str = "auto",
                 weights: str = "float32") -> tuple[HeadDrafter, dict]:
    """-> (HeadDrafter, drafter_vars) for the decoding loop; W (tokens_per_step) defaults to
    head_config.k and may not exceed it (eagle may: its chain steps share one layer).
    draft_vocab: drafts are the argmax over these ids only (None: the whole vocabulary).
    matmul: the head's products, as a Decoder's (engine.resolve_matmul). weights: "bfloat16"
    stores the head's matrices and the draft vocabulary's rows in bfloat16 (`in_bfloat16`)."""
    from gptk_jax.heads.io import HeadsError

    w = head_config.k if tokens_per_step is None else tokens_per_step
    if w > head_config.k and head_config.kind == "eagle":
        # one layer for every chain step, no per-offset params: it drafts further than trained
        head_config = head_config.replace(k=w, offsets=tuple(range(2, w + 1)))
    if w > head_config.k:
        raise HeadsError(f"W={w} tokens per step needs drafts for offsets 2..{w}, but these "
                         f"heads were trained for offsets {head_config.offsets} (W <= "
                         f"{head_config.k})")
    from gptk_jax.decoding.engine import resolve_matmul
    # the head's products as the trunk's in a decoder: few-row kernels for 2..8 rows (eagle's
    # layer and the draft-vocabulary projection at batch 2-8; a decoder's matmul, engine.py)
    trunk_config = trunk_config.replace(matmul=resolve_matmul(matmul))
    drafter = HeadDrafter(head=make_head(head_config, trunk_config), max_drafts=head_config.k - 1)
    vocab = None if draft_vocab is None else draft_vocabulary(trunk_config, trunk_params,
                                                              draft_vocab)
    if weights == "bfloat16":
        if head_config.kind != "eagle":
            raise HeadsError(f"drafter weights bfloat16: only eagle's products read bfloat16 "
                             f"weights as stored (the few-row kernels); {head_config.kind} "
                             f"heads would widen them to float32 at every step")
        head_params = in_bfloat16(head_params)
        vocab = None if vocab is None else dict(vocab, rows=vocab["rows"].astype(jnp.bfloat16))
    elif weights != "float32":
        raise HeadsError(f"drafter weights must be float32 or bfloat16, got {weights!r}")
    return drafter, HeadDrafter.variables(head_params, trunk_params, vocab)


def in_bfloat16(head_params: Any) -> Any:
    """The head's float32 matrices (2-D and up: kernels, projections) in bfloat16; vectors and
    norm scales (any leaf named "scale") as they are. Products read a bfloat16 matrix at half
    the bytes where the few-row kernels take them (kernels/few_rows.py: 1..8 rows; eagle's
    layer, the draft vocabulary's rows), elsewhere it is widened back to float32 first."""
    def cast(path, x):
        name = getattr(path[-1], "key", None) if path else None
        if x.dtype == jnp.float32 and x.ndim >= 2 and name != "scale":
            return x.astype(jnp.bfloat16)
        return x
    return jax.tree_util.tree_map_with_path(cast, head_params)
