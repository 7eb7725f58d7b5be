"""HeadConfig: the one frozen, validated description of a multi-token-prediction head.

Offsets: offset k is the token at position t+k predicted from the trunk at position t (offset 1 is
the trunk's own next token). `k` is the number of tokens per decoding step: the trunk's exact
next token plus k-1 drafts for offsets 2..k. `seed_config(kind)` gives the options that reproduce
the original research code; the defaults are the cheaper / better-behaved choices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

KINDS = ("lstm", "poma", "linear")


class HeadConfigError(ValueError):
    """A head description that cannot describe a valid head."""


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise HeadConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    kind: str                                  # 'lstm' | 'poma' | 'linear'
    k: int = 3                                 # tokens per decoding step: 1 (trunk) + k-1 drafts
    offsets: Optional[tuple[int, ...]] = None  # trained offsets; default (2, ..., k)
    # Draft argmax only over these token ids (e.g. the most frequent target-side tokens); the
    # trunk verifies every draft, so this changes speed/acceptance, never the output.
    draft_vocab: Optional[tuple[int, ...]] = None
    dtype: str = "float32"                     # head compute dtype
    param_dtype: str = "float32"

    # --- lstm -----------------------------------------------------------------------------------
    lstm_layers: int = 2
    lstm_dropout: float = 0.1                  # between LSTM layers (as torch nn.LSTM(dropout=))
    lstm_vocab_projection: str = "trunk"       # 'trunk': frozen final norm + unembed;
                                               # 'own': Dense(V, bias) (seed)
    lstm_step_inputs: str = "teacher"          # training inputs of steps 2..k: 'teacher'
                                               # (next_tokens) or 'argmax' (previous step's
                                               # draft, seed)
    lstm_first_input: str = "next_token"       # step-2 input: 'next_token' (trunk's exact token) or
                                               # 'own_argmax' (the head's own offset-1 argmax, seed)

    # --- poma -----------------------------------------------------------------------------------
    poma_max_positions: int = 2048             # rows of each position matrix (positions 0..n-1)
    poma_position_init: str = "zeros"          # 'zeros' or 'normal' (seed)
    poma_position_init_std: float = 0.02       # std of 'normal'
    poma_norm_init: str = "trunk"              # head norms start as the trunk's final norm;
                                               # 'ones' (seed)

    def __post_init__(self):
        _choice("kind", self.kind, KINDS)
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

        if self.draft_vocab is not None:
            try:
                vocab = tuple(int(i) for i in self.draft_vocab)  # accepts arrays and lists
            except (TypeError, ValueError):
                raise HeadConfigError("draft_vocab must be a sequence of token ids")
            if not vocab:
                raise HeadConfigError("draft_vocab is empty (use None for the full vocabulary)")
            if min(vocab) < 0 or len(set(vocab)) != len(vocab):
                raise HeadConfigError("draft_vocab must hold distinct non-negative token ids")
            object.__setattr__(self, "draft_vocab", vocab)

        for name in ("dtype", "param_dtype"):
            _choice(name, getattr(self, name), ("float32", "bfloat16", "float16"))
        if not isinstance(self.lstm_layers, int) or self.lstm_layers < 1:
            raise HeadConfigError(f"lstm_layers must be an integer >= 1, got {self.lstm_layers!r}")
        if not 0.0 <= self.lstm_dropout < 1.0:
            raise HeadConfigError(f"lstm_dropout must be in [0, 1), got {self.lstm_dropout}")
        _choice("lstm_vocab_projection", self.lstm_vocab_projection, ("trunk", "own"))
        _choice("lstm_step_inputs", self.lstm_step_inputs, ("teacher", "argmax"))
        _choice("lstm_first_input", self.lstm_first_input, ("next_token", "own_argmax"))
        if self.lstm_first_input == "own_argmax" and 1 not in offsets:
            raise HeadConfigError("lstm_first_input='own_argmax' feeds the head's own offset-1 "
                                  "prediction, so offsets must include 1")
        if not isinstance(self.poma_max_positions, int) or self.poma_max_positions < 1:
            raise HeadConfigError(f"poma_max_positions must be a positive integer, "
                                  f"got {self.poma_max_positions!r}")
        _choice("poma_position_init", self.poma_position_init, ("zeros", "normal"))
        if not self.poma_position_init_std > 0:
            raise HeadConfigError(f"poma_position_init_std must be > 0, "
                                  f"got {self.poma_position_init_std}")
        _choice("poma_norm_init", self.poma_norm_init, ("trunk", "ones"))

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
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise HeadConfigError(f"unknown HeadConfig field(s) {unknown}")
        return cls(**d)


def seed_config(kind: str, k: int = 3, **overrides) -> HeadConfig:
    """Options reproducing the original research code (offsets 1..k trained)."""
    seed = {
        "lstm": dict(lstm_vocab_projection="own", lstm_step_inputs="argmax",
                     lstm_first_input="own_argmax"),
        "poma": dict(poma_position_init="normal", poma_norm_init="ones"),
        "linear": {},
    }
    if kind not in seed:
        raise HeadConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    return HeadConfig(kind=kind, k=k, offsets=tuple(range(1, k + 1)), **{**seed[kind], **overrides})
