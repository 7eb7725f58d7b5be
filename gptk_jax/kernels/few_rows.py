"""Few-row float32 products on XLA:CPU, by the C++ kernels of small_matmul.cc.

A decode step multiplies B rows (a verify step B x W) by every weight matrix. XLA:CPU runs one
row at about the memory bandwidth but 2..8 rows about 1.4x slower on this machine
(docs/benchmarks.md, "Few-row products"), which made a 4-token verify cost 1.46 greedy steps at
batch 1. The kernels read each weight once and use it for every row.

    Llama(config.replace(matmul="few_rows"))     # every Dense and the tied unembedding
    dot_general(lhs, rhs, dims)                  # a drop-in for nn.Dense(dot_general=...)
    unembed(x, embedding)                        # x [..,D] @ embedding[V,D].T

Used only where it applies: the CPU backend, float32 operands, no batch dimensions, the
lhs contracting its trailing dims and the rhs its leading ones (a Dense / DenseGeneral call),
and MIN_ROWS..MAX_ROWS rows (2..8: one row goes to XLA's matrix-vector product, which is
already at the bandwidth; more rows to XLA's general product, which is then the faster).

Weights in bfloat16 (a drafter's, `DecoderSpec.drafter_weights`): a float32 lhs times a
bfloat16 rhs goes to the kernels' bfloat16 variants from 1 row up to MAX_ROWS (XLA:CPU has no
product that reads bfloat16 weights at the bandwidth: it converts them first), each weight
widened to float32 as it is loaded, sums in float32: half the bytes of the float32 weight.
Past MAX_ROWS, or without the kernels, the weight is converted to float32 and XLA multiplies.
Anything else, or a kernel that cannot be built, is `jax.lax.dot_general` as before. The
products are differentiable (a custom JVP in XLA products), so training code that happens to
meet a few-row product still works.

The library is compiled on first use with the machine's C++ compiler (`$CXX`, default g++;
`-O3 -march=native`, the XLA FFI headers jaxlib ships) into GPTK_CACHE/kernels/<key>/, keyed by
the source, the compiler's version, the CPU's flags and jaxlib's version, and written atomically.
A build that fails warns once and leaves XLA's products in place; GPTK_FEW_ROWS=0 turns the
kernels off everywhere. GPTK_FEW_ROWS_SOURCE=FILE builds another source instead of
small_matmul.cc (kernel work: bench/bench_kernel_ab.py times two sources against each other).

Letters: this file and small_matmul.cc use the usual matrix-product names, local to them and not
docs/design.md's legend: M rows of x (a step's B x W tokens, at most MAX_ROWS), K the contracted
depth (a Dense's input width, D for the unembedding), N output columns (its output width, V for
the unembedding). K here is not the kv heads.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from gptk_jax.errors import GptkError

MAX_ROWS = 8          # rows at most (more: XLA's product)
MIN_ROWS = 2          # rows at least (1 row: XLA's matrix-vector product, 5 % faster here:
                      # bench/bench_few_rows.py --steps)
SOURCE = Path(__file__).with_name("small_matmul.cc")
TARGETS = {"nn": "GptkSmallMatmulNN", "nt": "GptkSmallMatmulNT",
           "nn_bf16": "GptkSmallMatmulNNBf16", "nt_bf16": "GptkSmallMatmulNTBf16"}


class KernelBuildError(GptkError, RuntimeError):
    """The few-row kernels' library could not be built (the command and its output)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.machine() + platform.processor()


def _compiler() -> list[str]:
    return os.environ.get("CXX", "g++").split()


def source() -> Path:
    """The kernels' C++ source: small_matmul.cc, or $GPTK_FEW_ROWS_SOURCE."""
    return Path(os.environ.get("GPTK_FEW_ROWS_SOURCE") or SOURCE)


def library_key() -> str:
    """What the built library depends on: source, compiler version, CPU flags, jaxlib."""
    import jaxlib
    try:
        version = subprocess.run(_compiler() + ["--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = "no compiler"
    h = hashlib.sha256()
    for part in (source().read_bytes(), version.encode(), _cpu_flags().encode(),
                 jaxlib.__version__.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def build(directory: Optional[Path] = None) -> Path:
    """The compiled library (built now unless it already is) -> its path."""
    from gptk_jax.artifacts import CACHE_DIR
    directory = Path(directory or CACHE_DIR / "kernels") / library_key()
    lib = directory / "small_matmul.so"
    if lib.is_file():
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    cmd = _compiler() + ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w",
                         "-I", jax.ffi.include_dir(), str(source()), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise KernelBuildError(f"{' '.join(cmd)}: {e}") from None
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise KernelBuildError(f"{' '.join(cmd)} exited {done.returncode}:\n"
                               f"{done.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


_STATE: dict = {}


def available() -> bool:
    """The kernels are built and registered, on a CPU backend (False: XLA's products)."""
    if "ok" not in _STATE:
        _STATE["ok"] = False
        if os.environ.get("GPTK_FEW_ROWS", "1") == "0" or jax.default_backend() != "cpu":
            return False
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            for kind, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(f"gptk_few_rows_{kind}",
                                            jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
        except (KernelBuildError, OSError, AttributeError) as e:
            warnings.warn(f"gptk_jax.kernels.few_rows: the few-row kernels are off, XLA's "
                          f"products are used ({e})", RuntimeWarning, stacklevel=2)
            return False
        _STATE["ok"] = True
    return _STATE["ok"]


def _call(kind: str, x: jax.Array, w: jax.Array) -> jax.Array:
    n = w.shape[1] if kind == "nn" else w.shape[0]
    if w.dtype == jnp.bfloat16:
        kind += "_bf16"
    return jax.ffi.ffi_call(f"gptk_few_rows_{kind}",
                            jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")(x, w)


@jax.custom_jvp
def matmul_nn(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M,K] @ w [K,N] (float32 or bfloat16) -> [M,N] float32 (M <= MAX_ROWS, kernels
    available)."""
    return _call("nn", x, w)


@matmul_nn.defjvp
def _matmul_nn_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return matmul_nn(x, w), dx @ w.astype(x.dtype) + x @ dw.astype(x.dtype)


@jax.custom_jvp
def matmul_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M,K] @ w [N,K].T (float32 or bfloat16) -> [M,N] float32 (M <= MAX_ROWS, kernels
    available)."""
    return _call("nt", x, w)


@matmul_nt.defjvp
def _matmul_nt_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return matmul_nt(x, w), dx @ w.T.astype(x.dtype) + x @ dw.T.astype(x.dtype)


def _applies(lhs, rhs, rows: int) -> bool:
    if lhs.dtype != jnp.float32 or rhs.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    least = 1 if rhs.dtype == jnp.bfloat16 else max(MIN_ROWS, 1)
    return least <= rows <= MAX_ROWS and available()


def _widened(lhs, rhs):
    """A bfloat16 weight against a float32 lhs, converted for XLA's product (which would
    refuse the mix); anything else as given."""
    if rhs.dtype == jnp.bfloat16 and lhs.dtype == jnp.float32:
        return rhs.astype(jnp.float32)
    return rhs


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
    """`jax.lax.dot_general`, by the nn kernel where it applies (module doc): a Dense or
    DenseGeneral product, lhs [.., K..] (trailing dims contracted) x rhs [K.., N..]."""
    (lc, rc), (lb, rb) = dimension_numbers
    nk = len(lc)
    lead = lhs.ndim - nk
    rows = math.prod(lhs.shape[:lead])
    if (not lb and not rb and tuple(lc) == tuple(range(lead, lhs.ndim))
            and tuple(rc) == tuple(range(nk)) and _applies(lhs, rhs, rows)
            and preferred_element_type in (None, jnp.float32)):
        k = math.prod(lhs.shape[lead:])
        out = matmul_nn(lhs.reshape(rows, k), rhs.reshape(k, -1))
        return out.reshape(lhs.shape[:lead] + rhs.shape[nk:])
    return jax.lax.dot_general(lhs, _widened(lhs, rhs), dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def unembed(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x [.., D] @ embedding [V, D].T -> [.., V] (a tied unembedding), by the nt kernel where it
    applies, else XLA's product."""
    rows = math.prod(x.shape[:-1])
    if _applies(x, embedding, rows):
        return matmul_nt(x.reshape(rows, x.shape[-1]), embedding).reshape(
            x.shape[:-1] + embedding.shape[:1])
    return jnp.dot(x, _widened(x, embedding).T)


def dot_general_for(matmul: str):
    """The dot_general a Dense of a trunk with this `LlamaConfig.matmul` uses."""
    return dot_general if matmul == "few_rows" else jax.lax.dot_general


__all__ = ["MAX_ROWS", "MIN_ROWS", "KernelBuildError", "available", "build",
           "dot_general", "dot_general_for", "matmul_nn", "matmul_nt", "unembed"]
