"""Every decoding call of the evaluation goes through this module: switching the evaluation to
another decoding engine changes this file only.

A `Method` is what decodes: greedy (no drafter, K = 1) or draft-and-verify with a drafter and K
tokens per verify step. A `Decoding` holds the trunk and what every call shares (max new tokens,
stop ids, pad id, prompt bucket) and decodes one static batch (`batch`) or a queue of prompts
through continuously refilled slots (`continuous`). The `*_method` builders make the drafters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from gptk_jax.decoding import head_drafter
from gptk_jax.decoding.continuous import continuous_generate
from gptk_jax.decoding.greedy import greedy_generate
from gptk_jax.decoding.lookup import LookupDrafter
from gptk_jax.decoding.mtp import mtp_generate
from gptk_jax.decoding.oracle import OracleDrafter, oracle_variables


@dataclasses.dataclass(frozen=True)
class Method:
    """`name` labels the runs (`<name>/b<B>`); `k` tokens per verify step (1: greedy)."""
    name: str
    k: int = 1
    drafter: Any = None
    variables: Any = ()

    @property
    def drafts(self) -> bool:
        return self.drafter is not None


GREEDY = Method("greedy")


@dataclasses.dataclass(frozen=True)
class Decoding:
    config: Any                           # LlamaConfig of the trunk
    params: Any
    max_new_tokens: int
    stop_ids: tuple
    pad_id: int
    bucket: int

    def _common(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                    pad_id=self.pad_id, bucket=self.bucket)

    def batch(self, method: Method, prompts: Sequence[Sequence[int]], batch_size: int):
        """One static batch (padded to `batch_size` rows) -> GenerationResult / MTPResult."""
        if not method.drafts:
            return greedy_generate(self.config, self.params, prompts, batch_size=batch_size,
                                   **self._common())
        return mtp_generate(self.config, self.params, method.drafter, method.variables, prompts,
                            num_tokens_per_step=method.k, batch_size=batch_size,
                            **self._common())

    def continuous(self, method: Method, prompts: Sequence[Sequence[int]], batch_size: int,
                   on_finished: Optional[Callable[[int], None]] = None):
        """All prompts through `batch_size` refilled slots -> ContinuousResult."""
        return continuous_generate(self.config, self.params, prompts, batch_size=batch_size,
                                   drafter=method.drafter, drafter_vars=method.variables,
                                   num_tokens_per_step=method.k, on_finished=on_finished,
                                   **self._common())


def heads_method(name: str, decoding: Decoding, heads, k: int,
                 draft_vocab: Optional[Sequence[int]] = None) -> Method:
    """Trained heads (a gptk_jax.heads.io LoadedHeads) drafting K-1 tokens per step."""
    drafter, variables = head_drafter(heads.head_config, heads.params, decoding.config,
                                      decoding.params, k, draft_vocab=draft_vocab)
    return Method(name, k, drafter, variables)


def lookup_method(name: str, k: int, max_ngram: int,
                  fallback: Optional[Method] = None) -> Method:
    """Prompt lookup, optionally in front of another drafter (which drafts where it finds
    nothing)."""
    if fallback is None:
        return Method(name, k, LookupDrafter(k - 1, max_ngram=max_ngram),
                      LookupDrafter.variables())
    return Method(name, k, LookupDrafter(k - 1, max_ngram=max_ngram, fallback=fallback.drafter),
                  LookupDrafter.variables(fallback.variables))


def oracle_method(decoding: Decoding, k: int, prompts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]], batch_size: int) -> Method:
    """The oracle for one batch: drafts `continuations` (per row, what greedy will emit), padded
    or cut to max_new_tokens."""
    length = decoding.max_new_tokens
    padded = [(list(c) + [0] * length)[:length] for c in continuations]
    variables = oracle_variables(padded, [len(p) for p in prompts], batch_size, k - 1)
    return Method("oracle", k, OracleDrafter(k - 1, decoding.config.vocab_size), variables)
