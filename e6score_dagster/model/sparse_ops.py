"""The exact fits' design products as jitted JAX programs, for an accelerator.

A design is dense metadata features `z` [n, dz] and tag entries (`rows`, `cols`, `vals`: the
row, column and value of each, rows in order), with parameters theta = (a [dz], bias, w). On
a GPU the entries stay resident and a conjugate-gradient iteration moves only parameter-sized
vectors between host and device. On a CPU SciPy's kernels are faster (`ridge._Products`).
The dense products ask for full float32 precision: a GPU's default (TF32) would leave CG a
relative error of about 1e-3 in every product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FULL = jax.lax.Precision.HIGHEST


def entry_rows(indptr: np.ndarray) -> np.ndarray:
    """The row of each entry of a CSR matrix (int32)."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int32), np.diff(indptr))


def _forward(z, rows, cols, vals, theta):
    dz = z.shape[1]
    tags = jax.ops.segment_sum(vals * theta[dz + 1 :][cols], rows, num_segments=z.shape[0],
                               indices_are_sorted=True)
    return jnp.dot(z, theta[:dz], precision=FULL) + theta[dz] + tags


def _transposed(z, rows, cols, vals, u, n_params: int):
    dz = z.shape[1]
    tags = jnp.zeros(n_params - dz - 1, jnp.float32).at[cols].add(vals * u[rows])
    return jnp.concatenate([jnp.dot(u, z, precision=FULL), u.sum()[None], tags])


forward = jax.jit(_forward)
"""z @ a + b + s @ w for every row."""

transposed = jax.jit(_transposed, static_argnames="n_params")
"""(z.T @ u, sum(u), s.T @ u)."""


@jax.jit
def normal(z, rows, cols, vals, theta):
    """X.T @ (X @ theta): a CG iteration's product, the rows' values never leaving the device."""
    return _transposed(z, rows, cols, vals, _forward(z, rows, cols, vals, theta),
                       n_params=theta.shape[0])


@functools.cache
def on_accelerator() -> bool:
    """Whether JAX computes on something other than the CPU."""
    return jax.default_backend() != "cpu"
