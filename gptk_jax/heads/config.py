"""HeadConfig: the one frozen, validated description of a multi-token-prediction head.

Offsets: offset k is the token at position t+k predicted from the trunk at position t (offset 1 is
the trunk's own next token). `k` is the number of tokens per decoding step: the trunk's exact
next token plus k-1 drafts for offsets 2..k.

`recipe` picks how a family is built and trained: 'seed' reproduces the original research code,
'default' is this project's cheaper / better-behaved choice (`seed_config(kind)` = recipe 'seed'
with offsets 1..k):
  lstm  seed:    own Dense(V, bias) vocabulary projection; steps 2..k read the previous step's
                 draft argmax in training too; the step-2 input is the head's own offset-1 argmax
                 (so offsets must include 1)
        default: the trunk's frozen final norm + unembedding; teacher-forced step inputs in
                 training; the step-2 input is the trunk's exact next token
        conditioned: a drafter conditioned on the trunk (ReDrafter-like, heads/lstm_conditioned.py):
                 per position t, no recurrence over the context; the LSTM starts from the trunk's
                 hidden state h_t (h0 = tanh(A norm(h_t)), c0 = 0), steps on the embeddings of
                 the previous tokens (step 1: the trunk's exact next token), and its output is
                 a residual on h_t (h_t + P y, P zero at init) through the trunk's frozen final
                 norm + unembedding. `lstm_train_on_drafts` unrolls training on its own argmax
                 drafts; `lstm_condition_inputs` also feeds norm(h_t) to every step.
  poma  seed:    position matrices ~ normal(0.02), fresh RMSNorm scales (ones)
        default: position matrices zero, norm scales copied from the trunk's final norm (at init
                 the head reproduces the trunk's own logits)
  linear         one recipe ('default' and 'seed' build the same head)
'conditioned' is the LSTM family's recipe only, under its own name: heads.json files saved with
recipe 'default' (the context LSTM) keep loading as what they are.

heads.json written before `recipe` existed carries six options instead (`LEGACY_OPTIONS`);
`HeadConfig.from_dict` maps them to the recipe whose values they all have, and refuses a mix.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Sequence

from gptk_jax.errors import GptkError

KINDS = ("lstm", "poma", "linear", "eagle")
RECIPES = ("default", "seed", "conditioned")
LSTM_ONLY_RECIPES = ("conditioned",)
SEED_POSITION_STD = 0.02   # PoMa 'seed': std of the normal position-matrix init


class HeadConfigError(GptkError, ValueError):
    """A head description that cannot describe a valid head."""


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise HeadConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    kind: str                                  # 'lstm' | 'poma' | 'linear' | 'eagle'
    k: int = 3                                 # tokens per decoding step: 1 (trunk) + k-1 drafts
    offsets: Optional[tuple[int, ...]] = None  # trained offsets; default (2, ..., k)
    dtype: str = "float32"                     # head compute dtype
    param_dtype: str = "float32"

    # 'seed': the original research code's LSTM / PoMa; 'default': ours; 'conditioned': the LSTM
    # drafter conditioned on the trunk's hidden state (module docstring)
    recipe: str = "default"

    # --- lstm -----------------------------------------------------------------------------------
    lstm_layers: int = 2
    lstm_dropout: float = 0.1                  # between LSTM layers (as torch nn.LSTM(dropout=))
    # recipe 'conditioned' only: training steps read the head's own argmax drafts (no gradient
    # through the argmax) instead of the true previous tokens (step 1 always reads t+1's token)
    lstm_train_on_drafts: bool = False
    # recipe 'conditioned' only: every step's input is [embedding, norm(h_t)], not the embedding
    lstm_condition_inputs: bool = False

    # --- poma -----------------------------------------------------------------------------------
    poma_max_positions: int = 2048             # rows of each position matrix (positions 0..n-1)

    def __post_init__(self):
        _choice("kind", self.kind, KINDS)
        _choice("recipe", self.recipe, RECIPES)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 2:
            raise HeadConfigError(f"k (tokens per step) must be an integer >= 2, got {self.k!r}")
        offsets = tuple(range(2, self.k + 1)) if self.offsets is None else self.offsets
        try:
            offsets = tuple(int(o) for o in offsets)
        except (TypeError, ValueError):
            raise HeadConfigError(f"offsets must be a sequence of integers, got {self.offsets!r}")
        if any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise HeadConfigError(f"offsets must be strictly increasing, got {offsets}")
        if not offsets or offsets[0] < 1 or offsets[-1] > self.k:
            raise HeadConfigError(f"offsets must lie in 1..k={self.k}, got {offsets}")
        missing = sorted(set(range(2, self.k + 1)) - set(offsets))
        if missing:
            raise HeadConfigError(f"offsets {offsets} miss {missing}: decoding drafts every offset "
                                  f"2..k={self.k}, so each must be trained")
        object.__setattr__(self, "offsets", offsets)

        for name in ("dtype", "param_dtype"):
            _choice(name, getattr(self, name), ("float32", "bfloat16", "float16"))
        if not isinstance(self.lstm_layers, int) or self.lstm_layers < 1:
            raise HeadConfigError(f"lstm_layers must be an integer >= 1, got {self.lstm_layers!r}")
        if not 0.0 <= self.lstm_dropout < 1.0:
            raise HeadConfigError(f"lstm_dropout must be in [0, 1), got {self.lstm_dropout}")
        if self.recipe in LSTM_ONLY_RECIPES and self.kind != "lstm":
            raise HeadConfigError(f"recipe {self.recipe!r} is an LSTM recipe; kind {self.kind!r} "
                                  "has 'default' and 'seed'")
        for name in ("lstm_train_on_drafts", "lstm_condition_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise HeadConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
            if getattr(self, name) and not (self.kind == "lstm" and self.recipe == "conditioned"):
                raise HeadConfigError(f"{name} is an option of the 'conditioned' LSTM recipe "
                                      f"only (kind {self.kind!r}, recipe {self.recipe!r})")
        if self.kind == "lstm" and self.recipe == "seed" and 1 not in offsets:
            raise HeadConfigError("recipe='seed' LSTM feeds the head's own offset-1 prediction "
                                  "as its first step input, so offsets must include 1")
        if not isinstance(self.poma_max_positions, int) or self.poma_max_positions < 1:
            raise HeadConfigError(f"poma_max_positions must be a positive integer, "
                                  f"got {self.poma_max_positions!r}")

    @property
    def trunk_field(self) -> str:
        """The trunk output the head reads: 'hidden' (before the final norm: PoMa) or
        'hidden_normed' (what a feature cache must hold for it)."""
        if self.kind == "poma":
            return "hidden"
        return "hidden_normed"

    @property
    def reads_sequence(self) -> bool:
        """True: the head reads every position in order (the context LSTMs 'default' and
        'seed'); False: a position's output reads that position's features only."""
        return self.kind == "lstm" and self.recipe != "conditioned"

    @property
    def draft_offset_indices(self) -> tuple[int, ...]:
        """Indices into `offsets` of offsets 2..k (what `draft` returns, in order)."""
        return tuple(self.offsets.index(o) for o in range(2, self.k + 1))

    def replace(self, **changes) -> "HeadConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        """The fields as `to_dict` writes them; the pre-recipe options map to `recipe`
        (`recipe_from_legacy`)."""
        d = dict(d)
        _drop_draft_vocab(d)
        legacy = sorted(set(d) & LEGACY_NAMES)
        if legacy and "recipe" in d:
            raise HeadConfigError(f"{legacy} were replaced by 'recipe' ({' | '.join(RECIPES)}); "
                                  "drop them")
        if legacy:
            options = {name: d.pop(name) for name in legacy}
            d["recipe"] = recipe_from_legacy(d.get("kind"), options)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise HeadConfigError(f"unknown HeadConfig field(s) {unknown}")
        return cls(**d)


def _drop_draft_vocab(d: dict) -> None:
    """Older heads.json / configs carry `draft_vocab`: the draft vocabulary is decoding's now
    (gptk_jax.decoding.head_drafter(..., draft_vocab=ids)), so it is dropped here."""
    vocab = d.pop("draft_vocab", None)
    if vocab is not None:
        warnings.warn(f"head_config.draft_vocab ({len(vocab)} ids) is ignored: the draft "
                      "vocabulary is a decoding option now, pass it as gptk_jax.decoding."
                      "head_drafter(..., draft_vocab=ids); without it heads draft over the "
                      "whole vocabulary (same output, other speed)")


# The six options HeadConfig had before `recipe`: their values under each recipe. ANY: not read
# by that recipe (the default PoMa position matrices start at zero, whatever the std).
ANY = object()
LEGACY_OPTIONS = {
    "lstm": {"seed": {"lstm_vocab_projection": "own", "lstm_step_inputs": "argmax",
                      "lstm_first_input": "own_argmax"},
             "default": {"lstm_vocab_projection": "trunk", "lstm_step_inputs": "teacher",
                         "lstm_first_input": "next_token"}},
    "poma": {"seed": {"poma_position_init": "normal", "poma_position_init_std": SEED_POSITION_STD,
                      "poma_norm_init": "ones"},
             "default": {"poma_position_init": "zeros", "poma_position_init_std": ANY,
                         "poma_norm_init": "trunk"}},
}
LEGACY_NAMES = frozenset(name for family in LEGACY_OPTIONS.values()
                         for values in family.values() for name in values)


def recipe_from_legacy(kind: str, options: dict) -> str:
    """The recipe of pre-recipe options {name: value}: the one whose values they all have.
    Options of another family were never read, so they do not count (an old seed LSTM was
    saved with PoMa's default values); a mix raises, naming the fields to change."""
    family = LEGACY_OPTIONS.get(kind, {})
    own = {name: value for name, value in options.items() if name in family.get("seed", {})}
    changes = {}
    for recipe in ("default", "seed"):   # the recipes that had pre-recipe options
        wanted = family.get(recipe, {})
        changes[recipe] = {name: wanted[name] for name, value in own.items()
                           if wanted[name] is not ANY and value != wanted[name]}
        if not changes[recipe]:
            return recipe
    advice = "; or ".join(
        f"for recipe '{recipe}' set " + ", ".join(f"{name}={value!r}" for name, value in
                                                  fields.items())
        for recipe, fields in changes.items())
    raise HeadConfigError(f"{kind} options {own} match neither recipe that remains (a mix of "
                          f"'seed' and 'default' values): {advice}; or replace the options by "
                          "'recipe'")


def seed_config(kind: str, k: int = 3, **overrides) -> HeadConfig:
    """The original research code's head: recipe 'seed', offsets 1..k trained."""
    if kind not in KINDS:
        raise HeadConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    return HeadConfig(**{"kind": kind, "k": k, "offsets": tuple(range(1, k + 1)),
                         "recipe": "seed", **overrides})
