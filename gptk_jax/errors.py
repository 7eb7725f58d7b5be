"""The one base class of the project's errors.

Every error class the project defines (gptk_jax, convert, bench) derives from `GptkError`, and
also from the builtin it always was (`ConfigError(GptkError, ValueError)`, `CacheError(GptkError,
RuntimeError)`), so code that catches the builtin keeps working. tests/test_errors.py checks it.
"""

from __future__ import annotations


class GptkError(Exception):
    """The base of every error the project raises for bad input or refused work: a config, flag,
    checkpoint, data file or run that cannot be used, said in words. Each CLI catches it and
    prints one line on stderr, exit status 2; anything else that escapes is a bug (a
    traceback)."""


# What a CLI reports in one line (exit status 2): the project's errors, and OSError, which is
# not ours but is what reading or writing a user's file raises (no such file, permission denied,
# disk full) and says well in one line; the project wraps it where it can add context.
CLI_ERRORS: tuple[type[BaseException], ...] = (GptkError, OSError)
