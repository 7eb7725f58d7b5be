"""One decoder factory: a `DecoderSpec` says what decodes, `make_decoder(model, spec)` builds it.

    spec = DecoderSpec("mtp", heads="runs/results/linear/heads", tokens_per_step=3)
    decoder = make_decoder(model, spec)          # model: a ConvertedModel, or a `Trunk`
    result = decoder.generate(prompt_ids, max_new_tokens, batch_size=8)

Every caller builds its decoders here: `python -m gptk_jax.generate`, the evaluation
(gptk_jax/evaluation/decode.py), the demo, self-distillation (gptk_jax/distillation/) and
the benchmarks (bench/).

Methods (`DecoderSpec.method`):
  'greedy'      no drafter, W = 1;
  'mtp'         trained heads (`heads`, a folder of gptk_jax.heads.io) draft W-1 tokens
                (decoding/heads.py); W defaults to, and may not exceed, the heads' own k;
                `draft_vocab`: they draft over those ids only (default: the heads' own);
  'lookup'      prompt lookup (decoding/lookup.py): n-grams of `lookup_min_ngram` ..
                `lookup_max_ngram` tokens; W defaults to DEFAULT_LOOKUP_TOKENS_PER_STEP;
  'mtp+lookup'  prompt lookup, the heads drafting where it finds nothing (the heads at their
                own W; the lookup's W as for 'lookup');
  'mtp+lookup-tree'  prompt lookup's and the heads' drafts both verified in one call, each row
                keeping the branch with more accepted (decoding/tree.py); W fixed, default the
                heads' k, the lookup branch's `lookup_tokens_per_step` (default the same; a
                longer lookup branch makes the tree's W its) (choose_width: W stays fixed per
                branch, and static batches draft only while measured faster than greedy's
                loop, decoding/rate_gate.py);
  'oracle'      greedy's own continuation (decoding/oracle.py; the upper bound): W must be given
                and the continuations are passed as `references=oracle_variables(...)`.

What is not the decoding's choice comes at the call (`make_decoder`'s keywords): stop_ids and
pad_id (default: the model's tokenizer's), `heads` (a LoadedHeads already loaded: the folder is
then not read again), `references` (the oracle's), `base` (a Decoder to derive from with
`Decoder.replace`: the trunk goes to the device once, and for the same drafter and W the
executables are shared). Every draft is verified by the trunk: the spec changes speed and
acceptance, never the tokens (greedy's, in float32).

Letters: W tokens per verify step (the trunk's token + W-1 drafts), U draft vocabulary.
(K is kept for kv heads.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional

from gptk_jax.decoding.engine import Decoder, DecodingError

METHODS = ("greedy", "mtp", "lookup", "mtp+lookup", "mtp+lookup-tree", "oracle")
HEADS_METHODS = ("mtp", "mtp+lookup", "mtp+lookup-tree")
LOOKUP_METHODS = ("lookup", "mtp+lookup", "mtp+lookup-tree")
DEFAULT_LOOKUP_TOKENS_PER_STEP = 4
DRAFTER_WEIGHTS = ("float32", "bfloat16")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """What decodes (see the module doc). Frozen and hashable: equal specs decode alike.

    method: one of METHODS. tokens_per_step: W, the trunk's token + W-1 drafts per verify step
    (None: the method's default; 'greedy': None or 1). heads: the heads folder ('mtp',
    'mtp+lookup'). lookup_max_ngram / lookup_min_ngram: the n-gram sizes prompt lookup
    matches ('lookup', 'mtp+lookup'). draft_vocab: token ids the heads draft over (None: the
    heads' own draft vocabulary when they were trained with one, else the whole vocabulary).
    choose_width: W is chosen every step by expected tokens per second
    (decoding/width.py), up to tokens_per_step (or the method's default), from the step costs
    in `verify_cost` (a file of decoding/cost.py's VerifyCost; None: measured once at start),
    reading the drafts' scores in `score_bins` bins (1: scores ignored, pooled acceptance)."""
    method: str = "greedy"
    tokens_per_step: Optional[int] = None
    heads: Optional[str] = None
    lookup_max_ngram: int = 3
    lookup_min_ngram: int = 1
    draft_vocab: Optional[tuple] = None
    choose_width: bool = False      # W per step by measured cost, 1 .. tokens_per_step
    verify_cost: Optional[str] = None  # choose_width: a cost table file (None: measured)
    score_bins: int = 8             # choose_width: bins of the drafts' scores (1: ignored)
    lookup_tokens_per_step: Optional[int] = None  # 'mtp+lookup-tree': the lookup branch's W
                                                  # (None: the heads'); the tree's W: the larger
    drafter_weights: str = "float32"  # the heads' weights in decoding: float32 or bfloat16
                                      # (half the bytes a draft step reads; drafts may change,
                                      # the output cannot: the trunk verifies in its own dtype)

    def __post_init__(self):
        if self.method not in METHODS:
            raise DecodingError(f"DecoderSpec.method must be one of {', '.join(METHODS)}, "
                                f"got {self.method!r}")
        w = self.tokens_per_step
        if self.method == "greedy":
            if w not in (None, 1):
                raise DecodingError(f"DecoderSpec.tokens_per_step must be 1 (or None) for "
                                    f"'greedy' (no drafts), got {w!r}")
        elif w is not None and (not _is_int(w) or w < 2):
            raise DecodingError(f"DecoderSpec.tokens_per_step must be an integer >= 2 (the "
                                f"trunk's token + at least one draft per verify step), got {w!r}")
        if self.method == "oracle" and w is None:
            raise DecodingError("DecoderSpec.tokens_per_step must be given for 'oracle'")
        if self.method in HEADS_METHODS:
            if self.heads is None or str(self.heads) == "":
                raise DecodingError(f"DecoderSpec.heads (a heads folder) is needed for "
                                    f"{self.method!r}")
            object.__setattr__(self, "heads", str(self.heads))
        elif self.heads is not None:
            raise DecodingError(f"DecoderSpec.heads is for 'mtp' and 'mtp+lookup' only, not "
                                f"{self.method!r}")
        if self.drafter_weights not in DRAFTER_WEIGHTS:
            raise DecodingError(f"DecoderSpec.drafter_weights must be one of "
                                f"{', '.join(DRAFTER_WEIGHTS)}, got {self.drafter_weights!r}")
        for name in ("lookup_max_ngram", "lookup_min_ngram"):
            if not _is_int(getattr(self, name)):
                raise DecodingError(f"DecoderSpec.{name} must be an integer, got "
                                    f"{getattr(self, name)!r}")
        if not 1 <= self.lookup_min_ngram <= self.lookup_max_ngram:
            raise DecodingError(f"DecoderSpec.lookup_min_ngram / lookup_max_ngram: need 1 <= "
                                f"min <= max, got {self.lookup_min_ngram}, "
                                f"{self.lookup_max_ngram}")
        if self.draft_vocab is not None:
            if self.method not in HEADS_METHODS:
                raise DecodingError(f"DecoderSpec.draft_vocab is for the heads ('mtp', "
                                    f"'mtp+lookup'), not {self.method!r}")
            try:
                ids = tuple(int(i) for i in self.draft_vocab)
            except (TypeError, ValueError):
                raise DecodingError("DecoderSpec.draft_vocab must be a sequence of token "
                                    "ids") from None
            if not ids:
                raise DecodingError("DecoderSpec.draft_vocab is empty (use None for the whole "
                                    "vocabulary)")
            object.__setattr__(self, "draft_vocab", ids)
        self._check_widths()

    def _check_widths(self):
        """choose_width, verify_cost, lookup_tokens_per_step, score_bins."""
        if self.choose_width and self.method == "greedy":
            raise DecodingError("DecoderSpec.choose_width needs a drafter (greedy is W = 1)")
        if self.verify_cost is not None and not self.choose_width:
            raise DecodingError("DecoderSpec.verify_cost is read only with choose_width")
        if self.verify_cost is not None and self.method == "mtp+lookup-tree":
            raise DecodingError("DecoderSpec.verify_cost: 'mtp+lookup-tree' verifies a fixed W "
                                "per branch (choose_width gates its batches by measured time)")
        lw = self.lookup_tokens_per_step
        if lw is not None and self.method != "mtp+lookup-tree":
            raise DecodingError(f"DecoderSpec.lookup_tokens_per_step is the lookup branch's W "
                                f"of 'mtp+lookup-tree', not of {self.method!r} (for "
                                f"'lookup' and 'mtp+lookup' tokens_per_step is the lookup's W)")
        if lw is not None and (not _is_int(lw) or lw < 2):
            raise DecodingError(f"DecoderSpec.lookup_tokens_per_step must be an integer >= 2, "
                                f"got {lw!r}")
        if not isinstance(self.score_bins, int) or self.score_bins < 1:
            raise DecodingError(f"DecoderSpec.score_bins must be an integer >= 1, got "
                                f"{self.score_bins!r}")

    @property
    def drafts(self) -> bool:
        return self.method != "greedy"


GREEDY = DecoderSpec("greedy")


@dataclasses.dataclass(frozen=True, eq=False)
class Trunk:
    """A trunk for make_decoder when there is no ConvertedModel (benchmarks, tests): its config
    and params; a tokenizer gives the default stop ids and pad id; `name` is checked against
    the trunk the heads were trained on."""
    config: Any
    params: Any
    tokenizer: Any = None
    name: Optional[str] = None


def _trunk_name(model) -> Optional[str]:
    name = getattr(model, "name", None)
    if name is not None:
        return str(name)
    path = getattr(model, "path", None)
    return Path(path).name if path is not None else None


def _load_heads(model, spec: DecoderSpec, heads):
    if heads is not None:
        return heads
    from gptk_jax.heads.io import load_heads
    return load_heads(spec.heads, model.config, _trunk_name(model))   # refuses another trunk's


def _draft_vocab(spec: DecoderSpec, loaded) -> Optional[tuple]:
    """The ids the heads draft over: the spec's, else the heads' own (heads trained with a
    softmax over a draft vocabulary export it, heads.io draft_vocab.json), else None (the
    whole vocabulary). Drafts only: the output is greedy's whatever this is."""
    return spec.draft_vocab if spec.draft_vocab is not None else loaded.draft_vocab


def make_drafter(model, spec: DecoderSpec, *, heads=None, references=None
                 ) -> tuple[Any, Any, int]:
    """(drafter or None, its variables, W) for `spec` on `model`'s trunk."""
    if not isinstance(spec, DecoderSpec):
        raise TypeError(f"make_decoder needs a DecoderSpec, got {type(spec).__name__}")
    config, params = model.config, model.params
    if spec.method == "greedy":
        return None, (), 1
    if spec.method == "oracle":
        from gptk_jax.decoding.oracle import OracleDrafter
        if references is None:
            raise DecodingError("the 'oracle' drafts greedy's continuation: pass "
                                "references=oracle_variables(...) (decoding/oracle.py)")
        w = spec.tokens_per_step
        return OracleDrafter(max_drafts=w - 1, vocab_size=config.vocab_size), references, w
    from gptk_jax.decoding.heads import head_drafter
    if spec.method == "mtp":
        loaded = _load_heads(model, spec, heads)
        w = loaded.head_config.k if spec.tokens_per_step is None else spec.tokens_per_step
        drafter, variables = head_drafter(loaded.head_config, loaded.params, config, params,
                                          tokens_per_step=w,
                                          draft_vocab=_draft_vocab(spec, loaded),
                                          weights=spec.drafter_weights)
        return drafter, variables, w
    from gptk_jax.decoding.lookup import LookupDrafter
    if spec.method == "mtp+lookup-tree":
        from gptk_jax.decoding.tree import TreeDrafter
        loaded = _load_heads(model, spec, heads)
        w = loaded.head_config.k if spec.tokens_per_step is None else spec.tokens_per_step
        second, second_vars = head_drafter(loaded.head_config, loaded.params, config, params,
                                           tokens_per_step=w,
                                           draft_vocab=_draft_vocab(spec, loaded),
                                           weights=spec.drafter_weights)
        lw = spec.lookup_tokens_per_step or w          # the lookup branch: lw - 1 drafts
        first = LookupDrafter(max_drafts=lw - 1, max_ngram=spec.lookup_max_ngram,
                              min_ngram=spec.lookup_min_ngram)
        tree = TreeDrafter(first=first, second=second, max_drafts=max(w, lw) - 1,
                           first_drafts=lw - 1, second_drafts=w - 1)
        return (tree, TreeDrafter.variables(LookupDrafter.variables(), second_vars),
                max(w, lw))
    w = DEFAULT_LOOKUP_TOKENS_PER_STEP if spec.tokens_per_step is None else spec.tokens_per_step
    fallback, fallback_vars = None, None
    if spec.method == "mtp+lookup":     # the heads at their own W: the lookup cuts or pads
        loaded = _load_heads(model, spec, heads)
        longer = loaded.head_config.kind == "eagle"     # its chain drafts any W (heads.py)
        fallback, fallback_vars = head_drafter(loaded.head_config, loaded.params, config, params,
                                               tokens_per_step=w if longer else None,
                                               draft_vocab=_draft_vocab(spec, loaded),
                                               weights=spec.drafter_weights)
    drafter = LookupDrafter(max_drafts=w - 1, max_ngram=spec.lookup_max_ngram,
                            min_ngram=spec.lookup_min_ngram, fallback=fallback)
    return drafter, LookupDrafter.variables(fallback_vars), w


def make_decoder(model, spec: DecoderSpec, *, stop_ids: Optional[Iterable[int]] = None,
                 pad_id: Optional[int] = None, base: Optional[Decoder] = None, heads=None,
                 references=None) -> Decoder:
    """The `Decoder` (decoding/engine.py) for `spec`, ready to use.

    model: a ConvertedModel or a `Trunk` (anything with `config` and `params`; `tokenizer` for
    the default stop_ids / pad_id; `path` or `name` for the heads' trunk check). stop_ids,
    pad_id: default the tokenizer's (with `base`: base's). base: derive from this Decoder
    (shares its device params, and its executables for the same drafter and W). heads: the
    LoadedHeads of spec.heads when already loaded. references: the oracle's variables."""
    drafter, variables, w = make_drafter(model, spec, heads=heads, references=references)
    width, tree = w, spec.method == "mtp+lookup-tree"
    if spec.choose_width and drafter is not None and not tree:
        from gptk_jax.decoding.width import AutoWidth
        width = AutoWidth(max_width=w, score_bins=spec.score_bins)
    cost = {"verify_cost": spec.verify_cost} if spec.choose_width and not tree else {}
    if drafter is not None:             # a tree's W fixed per branch, its batches gated
        cost["gate_batches"] = True if spec.choose_width and tree else None
    if base is not None:
        changes = {}
        if stop_ids is not None:
            changes["stop_ids"] = stop_ids
        if pad_id is not None:
            changes["pad_id"] = pad_id
        if drafter is None:
            return base.replace(drafter=None, **changes) if base.drafter is not None or \
                changes else base
        return base.replace(drafter=drafter, drafter_vars=variables, tokens_per_step=width,
                            **cost, **changes)
    tok = getattr(model, "tokenizer", None)
    if stop_ids is None or pad_id is None:
        if tok is None:
            raise DecodingError("make_decoder: give stop_ids and pad_id (the model has no "
                                "tokenizer to take them from)")
        stop_ids = tok.stop_ids if stop_ids is None else stop_ids
        pad_id = tok.pad_id if pad_id is None else pad_id
    if drafter is None:
        return Decoder(model.config, model.params, stop_ids=stop_ids, pad_id=pad_id)
    return Decoder(model.config, model.params, stop_ids=stop_ids, pad_id=pad_id,
                   drafter=drafter, drafter_vars=variables, tokens_per_step=width, **cost)


__all__ = ["DEFAULT_LOOKUP_TOKENS_PER_STEP", "DRAFTER_WEIGHTS", "DecoderSpec", "GREEDY",
           "METHODS", "Trunk", "make_decoder", "make_drafter"]
