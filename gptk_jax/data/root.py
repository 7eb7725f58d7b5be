"""The data root, decided once at the edge. Only CLIs and configs import this module: library
code takes paths as arguments and never guesses where the data are.

The rule: the `--data-root` flag, else `$GPTK_DATA`, else `../shared/data` relative to the
working directory (`DEFAULT_DATA_ROOT`, defined here and nowhere else). The folder holds
`wmt14-de-en/` (gptk_jax.data.testsets reads its layout) and may hold a `sacrebleu/` cache.

    p = argparse.ArgumentParser(); add_data_root_argument(p); args = p.parse_args()
    data_root = resolve_data_root(args.data_root)          # an absolute Path
    cache = sacrebleu_cache(data_root)                     # for sacreBLEU test set names
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Union

DEFAULT_DATA_ROOT = "../shared/data"
DATA_ROOT_ENV = "GPTK_DATA"
SACREBLEU_ENV = "SACREBLEU"


def resolve_data_root(flag: Optional[Union[str, os.PathLike]] = None) -> Path:
    """`flag`, else $GPTK_DATA, else DEFAULT_DATA_ROOT; relative paths are taken from the
    working directory now, and the result is absolute (subprocesses may run elsewhere)."""
    value = flag or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))


def add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None,
                        help=f"folder holding wmt14-de-en/ (and a sacrebleu/ cache); default: "
                             f"${DATA_ROOT_ENV}, else {DEFAULT_DATA_ROOT} from the working "
                             f"directory")


def sacrebleu_cache(data_root: Union[str, os.PathLike]) -> Optional[Path]:
    """Where sacreBLEU test sets are read from: $SACREBLEU when set, else DATA_ROOT/sacrebleu
    when that folder exists, else None (sacreBLEU's own ~/.sacrebleu, downloading there)."""
    if os.environ.get(SACREBLEU_ENV):
        return Path(os.environ[SACREBLEU_ENV])
    cache = Path(data_root) / "sacrebleu"
    return cache if cache.is_dir() else None
