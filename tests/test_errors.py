"""One error base class: every exception class that gptk_jax and convert define derives from
`gptk_jax.errors.GptkError` (what each CLI catches and says in one line, exit status 2); and the
package never edits sys.path (the CLIs run as `python -m` from the repository root)."""

import importlib
import pkgutil
from pathlib import Path

import pytest

import convert
import gptk_jax
from gptk_jax.errors import CLI_ERRORS, GptkError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (gptk_jax, convert)


def _module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if info.name.rsplit(".", 1)[-1] != "__main__":    # runs its CLI when imported
                names.append(info.name)
    return names


MODULES = _module_names()


def test_the_walk_finds_the_modules():
    assert {"gptk_jax.errors", "gptk_jax.llama.config", "gptk_jax.decoding.engine",
            "gptk_jax.training.settings", "gptk_jax.demo", "convert.common"} <= set(MODULES)


def _defined_exceptions(module_name: str) -> list[type]:
    module = importlib.import_module(module_name)
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, BaseException)
            and obj.__module__ == module_name]


@pytest.mark.parametrize("module_name", MODULES)
def test_every_project_error_derives_from_gptk_error(module_name):
    bad = [cls.__qualname__ for cls in _defined_exceptions(module_name)
           if not issubclass(cls, GptkError)]
    assert not bad, f"{module_name}: {bad} do not derive from gptk_jax.errors.GptkError"


def test_project_errors_keep_their_builtin_bases():
    """Callers that catch the builtin (ValueError, RuntimeError) keep working."""
    from convert.common import ConversionError
    from gptk_jax.llama.config import ConfigError
    from gptk_jax.training import TrainingError
    from gptk_jax.features.shares import CacheError

    for cls in (ConversionError, ConfigError, TrainingError):
        assert issubclass(cls, (GptkError, ValueError)) and issubclass(cls, ValueError)
    assert issubclass(CacheError, RuntimeError) and issubclass(CacheError, GptkError)
    assert GptkError in CLI_ERRORS and OSError in CLI_ERRORS


def test_the_package_never_edits_sys_path():
    hits = [f"{path.relative_to(ROOT)}:{number}"
            for path in sorted((ROOT / "gptk_jax").rglob("*.py"))
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if "sys.path" in line]
    assert not hits, f"sys.path in {hits}"
