"""Every decoding call of the evaluation goes through this module: switching the evaluation to
another decoding engine changes this file only.

A `Method` is what decodes: greedy (no drafter, k = 1) or draft-and-verify with a drafter and k
tokens per verify step. A `Decoding` holds one engine `Decoder` per method (made once from one
greedy decoder, so the trunk goes to the device once and executables are compiled once per
shape) and what every call shares (max new tokens, prompt bucket); it decodes one static batch
(`batch`) or a queue of prompts through continuously refilled slots (`continuous`). The `*_method` builders make the drafters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from gptk_jax.decoding import head_drafter
from gptk_jax.decoding.engine import Decoder
from gptk_jax.decoding.lookup import LookupDrafter
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


@dataclasses.dataclass(eq=False)
class Decoding:
    """One greedy `Decoder` (the trunk on the device once, its executables kept), and per
    method a decoder made from it by `Decoder.replace`: no batch recompiles or re-uploads."""
    config: Any                           # LlamaConfig of the trunk
    params: Any
    max_new_tokens: int
    stop_ids: tuple
    pad_id: int
    bucket: int

    def __post_init__(self):
        self.greedy = Decoder(self.config, self.params, stop_ids=self.stop_ids,
                              pad_id=self.pad_id)
        self._by_loop: dict = {}      # (drafter, k) -> decoder holding that loop's executables
        self._by_method: dict = {}    # id(method) -> (method, its decoder)

    def decoder(self, method: Method) -> Decoder:
        if not method.drafts:
            return self.greedy
        known = self._by_method.get(id(method))
        if known is not None and known[0] is method:
            return known[1]
        loop = self._by_loop.get((method.drafter, method.k))
        if loop is None:
            decoder = self.greedy.replace(drafter=method.drafter, drafter_vars=method.variables,
                                          tokens_per_step=method.k)
            self._by_loop[(method.drafter, method.k)] = decoder
        else:   # same drafter and k (e.g. the oracle, per batch): its executables are shared
            decoder = loop.replace(drafter_vars=method.variables)
        self._by_method[id(method)] = (method, decoder)
        return decoder

    def batch(self, method: Method, prompts: Sequence[Sequence[int]], batch_size: int):
        """One static batch (padded to `batch_size` rows) -> GenerationResult / MTPResult."""
        return self.decoder(method).generate(prompts, self.max_new_tokens, bucket=self.bucket,
                                             batch_size=batch_size)

    def continuous(self, method: Method, prompts: Sequence[Sequence[int]], batch_size: int,
                   on_finished: Optional[Callable[[int], None]] = None):
        """All prompts through `batch_size` refilled slots -> ContinuousResult."""
        return self.decoder(method).generate_continuous(
            prompts, self.max_new_tokens, batch_size=batch_size, bucket=self.bucket,
            on_finished=on_finished)


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
