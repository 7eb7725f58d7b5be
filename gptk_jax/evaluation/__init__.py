"""Greedy vs self-speculative (MTP) decoding of one trunk on one test set (`python -m
gptk_jax.evaluate` is the CLI).

    config.py    EvalConfig (paths explicit; the CLI resolves the data root)
    pipeline.py  run_evaluation(cfg) -> report: test set, trunk, heads, methods, runs
    decode.py    the only module that calls the decoders: Method, Decoding, drafter builders
    runs.py      the runs of one batch size (static, oracle, continuous) and their statistics
    store.py     the report folder: writability checked first, one file per finished run,
                 reused by a rerun with the same settings
    report.py    scores, translations, report.json / report.md / acceptance.png / translations.jsonl
"""

from gptk_jax.evaluation.config import EvalConfig
from gptk_jax.evaluation.pipeline import resolve_space_with_target, run_evaluation
from gptk_jax.evaluation.report import markdown, write_reports

__all__ = ["EvalConfig", "markdown", "resolve_space_with_target", "run_evaluation",
           "write_reports"]
