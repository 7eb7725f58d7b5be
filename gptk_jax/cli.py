"""What every command line of the project shares: usage errors are one line on stderr and exit
code 2, like the project's own errors (`gptk_jax.errors.CLI_ERRORS`; a traceback means a bug);
`--help` prints the whole usage. And the training configs as the package `configs`, for the CLIs
that read them: $GPTK_CONFIGS, else configs/ in the working directory (the repository's root);
the package does not know where the checkout is."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

from gptk_jax.errors import GptkError

CONFIGS_ENV = "GPTK_CONFIGS"


class ConfigsNotFound(GptkError, ImportError):
    """No `configs` package: the configs folder has no __init__.py and none is importable."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: `PROG: error: MESSAGE (--help for usage)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def use_compilation_cache() -> str | None:
    """Turns on XLA's persistent compilation cache for this process and returns its folder:
    `GPTK_XLA_CACHE`, default GPTK_CACHE/xla (`GPTK_XLA_CACHE=` empty: off; a
    JAX_COMPILATION_CACHE_DIR already set wins). A decoder's executables take 20-100 s to
    compile on a 2-core CPU and are the same from one run to the next; XLA keys each entry by
    the program, the compile options and jax's version, so a reused one is the one it would
    compile. Programs that compile in under a second are not written (jax's default)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    folder = os.environ.get("GPTK_XLA_CACHE")
    if folder is None:
        from gptk_jax.artifacts import CACHE_DIR
        folder = str(CACHE_DIR / "xla")
    if not folder:
        return None
    import jax
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def configs_dir() -> Path:
    """The configs folder: $GPTK_CONFIGS, else configs/ in the working directory (absolute)."""
    return Path(os.environ.get(CONFIGS_ENV) or "configs").absolute()


def configs_module(name: str = "",
                   folder: Optional[Union[str, os.PathLike]] = None) -> ModuleType:
    """`configs.NAME` (the package itself for ""): `folder` (default `configs_dir()`) registered
    as the package `configs` from its own path, so config files loaded by path (`--config
    configs/tiny.py`) can `from configs import base`. A `configs` already imported is kept;
    without an __init__.py in the folder, `configs` is whatever the normal import finds, else
    ConfigsNotFound names the folder."""
    if "configs" not in sys.modules:
        folder = Path(folder).absolute() if folder is not None else configs_dir()
        if (folder / "__init__.py").is_file():
            _register_configs(folder)
        elif importlib.util.find_spec("configs") is None:
            raise ConfigsNotFound(
                f"no configs package: {folder / '__init__.py'} does not exist (run from the "
                f"repository's root, or set ${CONFIGS_ENV} to the configs folder)")
    return importlib.import_module(f"configs.{name}" if name else "configs")


def _register_configs(folder: Path) -> None:
    """folder/__init__.py imported as the package `configs` (removed again if it fails)."""
    spec = importlib.util.spec_from_file_location(
        "configs", folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["configs"] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules["configs"]
        raise
