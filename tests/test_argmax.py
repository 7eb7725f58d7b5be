"""kernels/argmax.py `first_argmax` gives jnp.argmax's index exactly: random rows, ties (the
first), infinities, NaN (the first NaN, wherever the largest number is), under jit, any rank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptk_jax.kernels.argmax import first_argmax


def _cases() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3000)).astype(np.float32)
    x[1, [5, 900, 2999]] = 50.0                     # a three-way tie: the first wins
    x[2, 7], x[2, 3] = np.nan, np.inf               # NaN after +inf: the NaN
    x[3, :] = -np.inf                               # every entry -inf: index 0
    x[4, [10, 20]] = np.inf                         # two +inf: the first
    x[5, [99, 50]] = np.nan                         # two NaN: the first
    x[6, :] = 0.0                                   # all equal: index 0
    x[7, -1] = 1e30                                 # the last entry
    x[8, 0], x[8, 1] = np.nan, 1e30                 # NaN first, a large number after
    x[9, :] = np.nan                                # all NaN
    return x


def _check(x: np.ndarray) -> None:
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    want = np.asarray(jnp.argmax(jnp.asarray(x), axis=-1))
    assert got.dtype == np.int32 and got.shape == x.shape[:-1]
    np.testing.assert_array_equal(got, want)


def test_first_argmax_equals_jnp_argmax_on_every_case():
    _check(_cases())                                           # [10,V]


@pytest.mark.parametrize("rank", [1, 3])
def test_first_argmax_any_rank(rank):
    cases = _cases()
    if rank == 1:
        for row in cases:
            _check(row)                                        # [V] -> []
    else:
        _check(np.stack([cases, cases[::-1]]))                 # [2,10,V]


def test_first_argmax_on_the_vocabulary_size_of_smollm2():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 49152)).astype(np.float32)
    x[3, [100, 40000]] = 9.0
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(x)),
                                  np.asarray(jnp.argmax(x, axis=-1)))
