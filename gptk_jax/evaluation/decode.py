"""Every decoding call of the evaluation goes through this module: switching the evaluation to
another decoding engine changes this file only.

A `Method` is what decodes: a name (the runs' label), W = tokens_per_step and a `DecoderSpec`
(decoding/factory.py): greedy (W = 1) or draft-and-verify, W tokens per verify step (the oracle
adds its per-batch references). A `Decoding` holds one engine `Decoder` per method, each made by
`decoding.factory.make_decoder` from one greedy decoder (so the trunk goes to the device once and
executables are compiled once per shape), and what every call shares (max new tokens, prompt
bucket, the loaded heads); it decodes one static batch (`batch`) or a queue of prompts through
continuously refilled slots (`continuous`). The `*_method` functions name the methods.

Letters: W tokens per verify step (the trunk's token + W-1 drafts). (K is kept for kv heads.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax

from gptk_jax.decoding import factory
from gptk_jax.decoding.engine import Decoder
from gptk_jax.decoding.factory import GREEDY as GREEDY_SPEC
from gptk_jax.decoding.factory import DecoderSpec, Trunk
from gptk_jax.decoding.oracle import oracle_variables


@dataclasses.dataclass(frozen=True)
class Method:
    """`name` labels the runs (`<name>/b<B>`); `tokens_per_step` W (1: greedy); `spec` what
    decodes; `references` the oracle's (per batch), else None."""
    name: str
    tokens_per_step: int = 1
    spec: DecoderSpec = GREEDY_SPEC
    references: Any = dataclasses.field(default=None, compare=False)

    @property
    def drafts(self) -> bool:
        return self.spec.drafts


GREEDY = Method("greedy")


@dataclasses.dataclass(eq=False)
class Decoding:
    """One greedy `Decoder` (the trunk on the device once, its executables kept), and per
    method a decoder made from it by `make_decoder(..., base=...)`: no batch recompiles or
    re-uploads. `heads`: the LoadedHeads the specs' heads folder holds (read once)."""
    config: Any                           # LlamaConfig of the trunk
    params: Any
    max_new_tokens: int
    stop_ids: tuple
    pad_id: int
    bucket: int
    heads: Any = None

    def __post_init__(self):
        self.trunk = Trunk(self.config, self.params)
        self.greedy = factory.make_decoder(self.trunk, GREEDY_SPEC, stop_ids=self.stop_ids,
                                           pad_id=self.pad_id)
        self._by_loop: dict = {}      # spec -> decoder holding that loop's executables
        self._by_method: dict = {}    # id(method) -> (method, its decoder)

    def decoder(self, method: Method) -> Decoder:
        if not method.drafts:
            return self.greedy
        self._release_other_loops(method.spec)
        known = self._by_method.get(id(method))
        if known is not None and known[0] is method:
            return known[1]
        # same spec (e.g. the oracle, per batch): the loop's executables are shared
        loop = self._by_loop.get(method.spec)
        decoder = factory.make_decoder(self.trunk, method.spec, base=loop or self.greedy,
                                       heads=self.heads, references=method.references)
        if loop is None:
            self._by_loop[method.spec] = decoder
        self._by_method[id(method)] = (method, decoder)
        return decoder

    def _release_other_loops(self, spec) -> None:
        """Keeps one drafting loop's executables alive at a time (and greedy's): every XLA:CPU
        executable maps its code into the process, and one evaluation of many methods, W and
        batch sizes ran out of room for more (`LLVM ERROR: Unable to allocate section memory`).
        Methods run one after another, so a released loop recompiles only when it runs again,
        at a batch size whose shapes it has not compiled anyway. jax's own jit caches (the
        calibration's prefill) go too."""
        released = 0
        for other, decoder in self._by_loop.items():
            if other != spec and len(decoder.executables):
                released += len(decoder.executables)
                decoder.executables.clear()
        if released:
            jax.clear_caches()

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


def heads_method(name: str, decoding: Decoding, heads: str, tokens_per_step: int,
                 draft_vocab: Optional[Sequence[int]] = None, choose_width: bool = False,
                 verify_cost: Optional[str] = None, score_bins: int = 8,
                 drafter_weights: str = "float32") -> Method:
    """Trained heads (the folder `heads`, loaded as decoding.heads) drafting W-1 tokens per
    step; built now, so a W the heads cannot draft fails before anything decodes.
    drafter_weights: their weights while decoding (DecoderSpec.drafter_weights)."""
    method = Method(name, tokens_per_step, DecoderSpec(
        "mtp", tokens_per_step=tokens_per_step, heads=heads, draft_vocab=draft_vocab,
        choose_width=choose_width, verify_cost=verify_cost, score_bins=score_bins,
        drafter_weights=drafter_weights))
    decoding.decoder(method)
    return method


def lookup_method(name: str, tokens_per_step: int, max_ngram: int,
                  fallback: Optional[Method] = None, choose_width: bool = False,
                  verify_cost: Optional[str] = None, score_bins: int = 8) -> Method:
    """Prompt lookup, optionally in front of heads (`fallback`, a heads_method: they draft
    where it finds nothing). choose_width: W per step by cost, up to tokens_per_step."""
    width = {"choose_width": choose_width, "verify_cost": verify_cost, "score_bins": score_bins}
    if fallback is None:
        return Method(name, tokens_per_step, DecoderSpec(
            "lookup", tokens_per_step=tokens_per_step, lookup_max_ngram=max_ngram, **width))
    return Method(name, tokens_per_step, DecoderSpec(
        "mtp+lookup", tokens_per_step=tokens_per_step, heads=fallback.spec.heads,
        lookup_max_ngram=max_ngram, draft_vocab=fallback.spec.draft_vocab,
        drafter_weights=fallback.spec.drafter_weights, **width))


def tree_method(name: str, decoding: Decoding, heads: Method, max_ngram: int,
                lookup_tokens_per_step: Optional[int] = None) -> Method:
    """Prompt lookup and the heads (a heads_method) as the two branches of one verify call per
    step (decoding/tree.py), the heads at their W, the lookup at lookup_tokens_per_step (None:
    the same; the method's W is the larger) (fixed; with the heads' choose_width, static
    batches draft only while measured faster than greedy, decoding/rate_gate.py)."""
    lookup_w = lookup_tokens_per_step or heads.tokens_per_step
    method = Method(name, max(heads.tokens_per_step, lookup_w), DecoderSpec(
        "mtp+lookup-tree", tokens_per_step=heads.tokens_per_step, heads=heads.spec.heads,
        lookup_max_ngram=max_ngram, draft_vocab=heads.spec.draft_vocab,
        choose_width=heads.spec.choose_width, drafter_weights=heads.spec.drafter_weights,
        lookup_tokens_per_step=None if lookup_w == heads.tokens_per_step else lookup_w))
    decoding.decoder(method)
    return method


def oracle_method(decoding: Decoding, tokens_per_step: int, prompts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]], batch_size: int) -> Method:
    """The oracle for one batch: drafts `continuations` (per row, what greedy will emit), padded
    or cut to max_new_tokens."""
    length = decoding.max_new_tokens
    padded = [(list(c) + [0] * length)[:length] for c in continuations]
    references = oracle_variables(padded, [len(p) for p in prompts], batch_size,
                                  tokens_per_step - 1)
    return Method("oracle", tokens_per_step,
                  DecoderSpec("oracle", tokens_per_step=tokens_per_step), references)
