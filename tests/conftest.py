"""Shared fixtures: repository paths and the real data folder beside the checkout."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("GPTK_DATA", ROOT.parent / "shared" / "data"))
WMT = DATA / "wmt14-de-en"

# XLA's persistent compilation cache for the test run: the suite compiles the same small
# programs again and again (each module drops jax's in-memory executables, below; CLI tests
# start fresh processes; two xdist workers), and on this CPU compiling is most of a decoding
# test's time. An executable read back from the cache is the one XLA compiled for the same
# program, options and jax version (they are the cache key), so no result changes.
# GPTK_TEST_XLA_CACHE= (empty) turns it off; set here, before jax is imported, so that the
# workers and every subprocess a test starts inherit it (a test may pass its own folder).
XLA_CACHE = os.environ.get("GPTK_TEST_XLA_CACHE", str(ROOT / ".cache" / "xla-tests"))
if XLA_CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# LLVM's optimisation level for the test run's XLA:CPU programs: 0 compiles the suite's hundreds
# of small programs faster, and compiling is most of the suite's time on a clean clone. A cold
# `make test` here: 23 min 34 s at XLA's default, 20 min 6 s at 0 (docs/benchmarks.md, "Test
# suite time"): decoding files 15-30 % faster, the real-trunk files, which mostly run, 51 s
# slower. Float results may differ from the default's at float32 rounding, as between any two
# programs (no fast-math either way); every exactness test compares programs of one run. The
# library and its command lines keep XLA's default; GPTK_TEST_XLA_OPT= (empty) gives it to the
# tests too.
XLA_OPT = os.environ.get("GPTK_TEST_XLA_OPT", "0")
if XLA_OPT and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags = [os.environ.get("XLA_FLAGS", ""), f"--xla_backend_optimization_level={XLA_OPT}"]
    os.environ["XLA_FLAGS"] = " ".join(filter(None, flags))

# The longest files first (cold `make test`, session 25, seconds of worker time at level 0), so
# that xdist's loadfile scheduler, which hands out files in collection order, does not leave one
# worker running a long file alone at the end (measured: about 2 minutes of one idle worker).
LONGEST_FILES = ("test_real_heads.py", "test_evaluate.py", "test_real_smollm2.py",  # 266-160
                 "test_eagle.py", "test_factory.py", "test_prefix_decoding.py",    # 120-114
                 "test_train.py", "test_continuous.py", "test_bos_rule.py",        # 103-88
                 "test_choose_w.py", "test_lstm_conditioned.py", "test_tree.py",   # 65-58
                 "test_train_parallel.py", "test_shared_prefix.py")                # 53-49


# tests that load transformers' tokenizers (seconds each) are `slow`: `make test` runs them,
# `make test-fast` (-m "not slow") leaves them out with the real-model and subprocess tests
SLOW_FIXTURES = frozenset({"transformers_gguf", "transformers_llama3"})


@pytest.hookimpl(tryfirst=True)     # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: order kept


SMOLLM2_DIR = ROOT / ".cache" / "models" / "smollm2-135m"   # where `make demo` converts it


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M converted from its GGUF into the folder `make demo` uses, converted
    once per checkout: the first worker to need it converts while the others wait on a lock
    (a clean clone converted it in each test module that needed it). The conversion itself is
    tested against transformers in tests/test_real_smollm2.py, into a folder of its own."""
    import fcntl

    from gptk_jax.demo import ensure_converted

    SMOLLM2_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(SMOLLM2_DIR.parent / ".smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # released when the file closes
        return ensure_converted(SMOLLM2_DIR)


def read_lines(path: Path) -> list[str]:
    """WMT files: split on '\\n' only (never splitlines), strip a trailing '\\r'."""
    text = path.read_bytes().decode("utf-8")  # no newline translation
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


@pytest.fixture(scope="session")
def wmt_dir() -> Path:
    if not WMT.is_dir():
        pytest.fail(f"real WMT14 data not found at {WMT} (set GPTK_DATA)")
    return WMT


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_executables():
    """Drops jax's cached executables after each test module (a decoder's own die with it, at
    the end of its module-scoped fixture). Each XLA:CPU executable maps its code into the
    process (hundreds of mappings each: one test module of the decoders reached ~19,000); the
    whole suite in one process exceeded the kernel's vm.max_map_count (65,530 here) and crashed
    inside a later compilation (a segfault or an abort in backend_compile, at the same test
    each time)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
