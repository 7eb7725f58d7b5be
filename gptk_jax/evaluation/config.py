"""`EvalConfig`: one evaluation of greedy vs draft-and-verify decoding (what the CLI parses).

Paths are explicit: `data_root` is the folder the CLI resolved (gptk_jax.data.root); file
splits, the default few-shot pool and the default draft-vocabulary text are read under it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from gptk_jax.errors import GptkError


# the drafting methods an evaluation can run (evaluation/pipeline.drafting_methods)
METHODS = ("mtp", "lookup", "heads+lookup", "heads+lookup-tree")
# the smallest value of each numeric field (None, where allowed, means its default)
AT_LEAST = {"max_sentences": 1, "tokens_per_step": 2, "max_new_tokens": 1, "shots": 0,
            "bucket": 1, "lookup_tokens_per_step": 2, "lookup_max_ngram": 1,
            "draft_vocab_size": 1, "continuous_repeats": 1}


class EvalConfigError(GptkError, ValueError):
    """Settings of an evaluation that do not go together or are out of range."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    checkpoint: str                       # converted trunk folder
    heads: Optional[str]                  # trained heads folder (gptk_jax.heads.io) or None
    output: str                           # report folder
    data_root: str                        # holds wmt14-de-en/ (and maybe a sacrebleu/ cache)
    split: Optional[str] = "newstest2014"  # a data-root split or a sacreBLEU test set name
    source: Optional[str] = None          # a user's source file (with `reference`, no split)
    reference: Optional[str] = None
    sacrebleu_cache: Optional[str] = None  # where sacreBLEU names are read (None: sacreBLEU's)
    src_lang: str = "de"
    tgt_lang: str = "en"
    max_sentences: Optional[int] = None
    batch_sizes: tuple = (1, 8)
    tokens_per_step: Optional[int] = None  # W, tokens per verify step; default: the heads' k
    max_new_tokens: int = 128
    shots: int = 0                        # few-shot lines from the News Commentary head
    space_with_target: Optional[bool] = None  # prompt ends 'en:' (byte-level BPE models,
                                              # SmolLM2); None: as the heads were trained
    bucket: int = 32                      # prompt length bucket (fewer compilations)
    dtype: Optional[str] = None           # compute dtype (exactness is promised for float32)
    oracle: bool = False                  # also run the oracle drafter (upper bound for W)
    lookup: bool = False                  # also run prompt-lookup drafting: alone ("lookup")
                                          # and in front of the heads ("heads+lookup")
    lookup_tokens_per_step: Optional[int] = None  # W of the lookup runs (default: W)
    tree: bool = False                    # with lookup and heads: also both verified as a tree
                                          # of two branches per step ("heads+lookup-tree", W)
    lookup_max_ngram: int = 3
    only: Optional[tuple] = None          # run only these drafting methods (METHODS), of those
                                          # the other fields ask for; greedy always runs
    draft_vocab_size: Optional[int] = None  # heads draft over the N most frequent target tokens
    draft_vocab_from: Optional[str] = None  # of this text file (default: News Commentary's
                                            # target side under data_root)
    continuous: bool = False              # batch sizes > 1 also run with continuous batching
    interleave: bool = False              # static runs batch by batch: greedy, then each
                                          # drafter, on the same prompts (drift hits all alike);
                                          # continuous runs bracketed by greedy's
    continuous_repeats: int = 1           # interleave: each drafter's bracketed continuous run
                                          # this many times (speedup: their mean, with sd)
    choose_width: bool = False            # drafters choose W per step by measured cost
    verify_cost: Optional[str] = None     # choose_width: step-cost table file (None: measured)
    score_bins: int = 8                   # choose_width: bins of the drafts' scores (1: ignored)
    drafter_weights: str = "float32"      # the heads' weights while decoding (or bfloat16)
    bos: Optional[bool] = None            # prepend BOS; None: the tokenizer's rule (add_bos)
    progress: bool = True
    verify_weights: bool = True           # check the converted tensors' digests on load
    command: Optional[str] = None         # the command line, recorded in report.json

    def __post_init__(self):
        if (self.source is None) != (self.reference is None):
            raise EvalConfigError("a user's test set needs both a source and a reference file")
        if self.source is not None and self.split is not None:
            raise EvalConfigError(f"give a split ({self.split!r}) or a source and reference "
                                  f"file, not both")
        if self.source is None and self.split is None:
            raise EvalConfigError("give a split or a source and reference file")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise EvalConfigError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        for name, least in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise EvalConfigError(f"{name} must be >= {least}, got {value}")
        if self.heads is None and self.tokens_per_step is None:
            raise EvalConfigError("give --heads (W defaults to the heads' k) or "
                                  "--tokens-per-step with --oracle or --lookup")
        if self.heads is None and not (self.lookup or self.oracle):
            raise EvalConfigError("nothing to compare: give --heads, --lookup and/or --oracle")
        if self.continuous_repeats > 1 and not (self.continuous and self.interleave):
            raise EvalConfigError("--continuous-repeats repeats the bracketed continuous runs: "
                                  "give --continuous and --interleave with it")
        if self.verify_cost is not None and not self.choose_width:
            raise EvalConfigError("--verify-cost is a table for --choose-width: give both")
        if self.verify_cost is not None and not Path(self.verify_cost).is_file():
            raise EvalConfigError(f"--verify-cost {self.verify_cost}: no such file")
        if self.only is not None:
            unknown = sorted(set(self.only) - set(METHODS))
            if unknown or not self.only:
                raise EvalConfigError(f"--only {','.join(self.only)}: choose from "
                                      f"{', '.join(METHODS)}")
            asked = {"mtp": self.heads is not None, "lookup": self.lookup,
                     "heads+lookup": self.lookup and self.heads is not None,
                     "heads+lookup-tree": self.tree}
            missing = [m for m in self.only if not asked[m]]
            if missing:
                raise EvalConfigError(f"--only {','.join(missing)}: not asked for (mtp needs "
                                      f"--heads, lookup --lookup, heads+lookup both, "
                                      f"heads+lookup-tree --tree)")
        if self.score_bins < 1:
            raise EvalConfigError(f"--score-bins must be >= 1, got {self.score_bins}")
