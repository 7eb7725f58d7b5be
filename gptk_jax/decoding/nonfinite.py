"""Why the trunk gave non-finite logits while decoding: the one-line error of the decoding engine.

The decode loop flags a row whose logits hold a NaN or infinity (one `isfinite` reduction per
step, decoding/loop.py) and stops it; `check_nonfinite` raises a DecodingError naming the prompts
of the flagged rows. Before raising, `explain_nonfinite` looks for the cause, on the error path
only (nothing of it runs while decoding goes well):

- the padding id: outside the embedding table (0 <= pad id < vocab_size fails; the padded rows of
  a batch read a row that does not exist: a model converted with `--allow-small-vocab` by a
  version that kept a tokenizer pad id with no row), or its row holds non-finite values;
- the prompt: each failing prompt is run again alone (batch 1, no padding, the first
  MAX_PROMPTS_RUN of them) and whether its logits are finite says whether the prompt itself,
  rather than the batch it was padded into, gives them;
- the weights: every tensor is scanned for NaN/inf and named with its count (for the embedding,
  the token ids whose rows hold them, and which of them the failing prompts hold).

The message names the cause found (or says none was) and the check the user can run: the pad id
against config.json's vocab_size, loading the model with its tensor digests verified (a damaged
tensor is then named), converting it again, or decoding in float32.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptk_jax.llama.config import LlamaConfig
from gptk_jax.llama.model import Llama
from gptk_jax.llama.weight_checks import tensor_name

MAX_PROMPTS_RUN = 4     # failing prompts run again alone at batch 1
_IDS_SHOWN = 8
_EMBEDDING = "tok_embeddings.embedding"
CHECK_WEIGHTS = ("load the model with its tensor digests verified (the default; unset "
                 "GPTK_SKIP_WEIGHT_DIGESTS: a damaged tensor is named) or convert it again "
                 "with `python -m convert`")


def check_nonfinite(nonfinite: np.ndarray, prompt_of_row: Sequence[int],
                    explain: Optional[Callable[[list[int]], str]] = None) -> None:
    """Raises DecodingError when any row's flag is set; prompt_of_row[b]: the prompt index (-1:
    no prompt). explain(bad prompt indices) -> the cause and what to check (one line)."""
    from gptk_jax.decoding.checks import DecodingError
    bad = sorted(int(prompt_of_row[b]) for b in np.flatnonzero(nonfinite)
                 if prompt_of_row[b] >= 0)
    if bad:
        why = explain(bad) if explain is not None else (
            f"suspect the weights or the padding; check: {CHECK_WEIGHTS}")
        raise DecodingError(f"the trunk gave non-finite logits (NaN/Inf) while decoding prompt"
                            f"{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: no "
                            f"output for {'them' if len(bad) > 1 else 'it'}; {why}")


@functools.partial(jax.jit, static_argnums=0)
def _alone_finite(config: LlamaConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [1,P], one prompt, no padding -> whether its last position's logits (which every
    earlier position's keys and values reach) are all finite."""
    p = tokens.shape[1]
    out = Llama(config).apply({"params": params}, tokens, jnp.arange(p, dtype=jnp.int32)[None],
                              logits_index=jnp.array([p - 1], jnp.int32))
    return jnp.all(jnp.isfinite(out.logits))


def nonfinite_weights(params: dict) -> tuple[list[str], np.ndarray]:
    """(one description per tensor holding NaN/inf, the token ids whose embedding rows do)."""
    found, rows = [], np.zeros(0, np.int64)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        bad = ~jnp.isfinite(leaf)
        count = int(jnp.sum(bad))
        if not count:
            continue
        name = tensor_name(path)
        if name == _EMBEDDING and leaf.ndim == 2:
            rows = np.flatnonzero(np.asarray(jnp.any(bad, axis=1)))
            found.append(f"{name} ({_values(count)}, in the rows of token ids {_ids(rows)})")
        else:
            found.append(f"{name} ({_values(count)})")
    return found, rows


def _values(count: int) -> str:
    return f"{count} non-finite value{'s' * (count > 1)}"


def _ids(ids) -> str:
    ids = [int(i) for i in ids]
    more = f" and {len(ids) - _IDS_SHOWN} more" if len(ids) > _IDS_SHOWN else ""
    return ", ".join(map(str, ids[:_IDS_SHOWN])) + more


def _check_overflow(config: LlamaConfig) -> str:
    if config.dtype != "float32":
        return "decode in float32 (--dtype float32)"
    return "the model already computes in float32: whether its weights are the model's own"


def _numbered(prompts: Sequence[int]) -> str:
    return f"prompt{'s' if len(prompts) > 1 else ''} {', '.join(map(str, prompts))}"


def explain_nonfinite(config: LlamaConfig, params: dict, pad_id: int,
                      prompt_ids: Sequence[Sequence[int]], bad: list[int]) -> str:
    """The cause of the failing prompts `bad` (module doc) and what to check, one line."""
    weights, bad_rows = nonfinite_weights(params)
    run = bad[:MAX_PROMPTS_RUN]
    alone_bad = [i for i in run if not bool(_alone_finite(
        config, params, jnp.asarray(np.asarray(prompt_ids[i], np.int32)[None])))]
    alone_ok = [i for i in run if i not in alone_bad]
    checked = f" (the first {len(run)} of them run alone)" if len(run) < len(bad) else ""
    held = sorted({int(t) for i in bad for t in prompt_ids[i]} & set(bad_rows.tolist()))
    weights_text = (f"the weights hold non-finite values: {'; '.join(weights)}"
                    + (f", and the failing prompts hold token id{'s' * (len(held) > 1)} "
                       f"{_ids(held)}" if held else ""))
    parts = []
    if alone_ok:
        parts += _padding_cause(config, pad_id, pad_id in set(bad_rows.tolist()),
                                f"{_numbered(alone_ok)} alone (batch 1, no padding) give"
                                f"{'s' * (len(alone_ok) == 1)} finite logits{checked}",
                                weights_text)
    if alone_bad:
        parts += _prompt_cause(config, pad_id, alone_bad, checked, held, weights, weights_text)
    if parts:
        return "; ".join(parts)
    if weights:
        return (f"cause: the weights, reached while decoding (by a generated or drafted token): "
                f"{weights_text}; {_numbered(alone_ok)} alone give finite logits at the prompt"
                f"{checked}; check: {CHECK_WEIGHTS}")
    return (f"no cause found: the padding id {pad_id} has a finite row, every weight is finite "
            f"and {_numbered(alone_ok)} alone (batch 1, no padding) give finite logits at the "
            f"prompt{checked}, so the values overflowed while decoding in {config.dtype}; check: "
            f"{_check_overflow(config)}, and decode without padding (--bucket 1, one prompt at a "
            "time)")


def _padding_cause(config: LlamaConfig, pad_id: int, pad_row_bad: bool, alone_ok: str,
                   weights_text: str) -> list[str]:
    """The padding as the cause (prompts that fail in the batch but not alone), if it is."""
    vocab = config.vocab_size
    if not 0 <= pad_id < vocab:
        return [f"cause: the padding id {pad_id} is outside the embedding table (rows "
                f"0..{vocab - 1}): the padded rows of the batch read a row that does not exist, "
                f"while {alone_ok}; check: the pad id must be < vocab_size {vocab} (the "
                "tokenizer's pad_id against config.json; a model converted with "
                "--allow-small-vocab by an older version has one outside): convert it again with "
                "`python -m convert` (it now picks a pad id with a row), or decode without "
                "padding (--bucket 1, one prompt at a time)"]
    if pad_row_bad:
        return [f"cause: the padding id {pad_id}'s embedding row holds non-finite values (the "
                f"padded rows of the batch read it), while {alone_ok}; {weights_text}; check: "
                f"{CHECK_WEIGHTS}"]
    return []


def _prompt_cause(config: LlamaConfig, pad_id: int, alone_bad: list[int], checked: str,
                  held: list[int], weights: list[str], weights_text: str) -> list[str]:
    """The cause of prompts that fail alone too: their tokens' rows, the weights or the prompt."""
    alone = (f"{_numbered(alone_bad)} alone (batch 1, no padding) give"
             f"{'s' * (len(alone_bad) == 1)} non-finite logits too{checked}")
    if held:
        parts = [f"cause: {alone}: the prompt holds token ids whose embedding rows are broken: "
                 f"{weights_text}; check: {CHECK_WEIGHTS}"]
    elif weights:
        parts = [f"cause: the weights: {alone}, and {weights_text}; check: {CHECK_WEIGHTS}"]
    else:
        parts = [f"cause: the prompt: {alone} while every weight is finite, so the prompt drives "
                 f"the {config.dtype} activations out of range; check: "
                 f"{_check_overflow(config)} and look at its token ids"]
    if not 0 <= pad_id < config.vocab_size:
        parts.append(f"also: the padding id {pad_id} is outside the embedding table (rows "
                     f"0..{config.vocab_size - 1}); the pad id must be < vocab_size "
                     f"{config.vocab_size}")
    return parts
