"""The exact fits' design products as jitted JAX programs, for an accelerator.

A design is dense metadata features `z` [n, dz], a mask of live rows (the arrays are padded)
and tag entries (`rows`, `cols`, `vals`: the row, column and value of each, rows in order),
with parameters theta = (a [dz], bias, w). On a GPU the entries stay resident and each solve
is one program (`pcg`): nothing crosses to the host between its iterations. On a CPU
SciPy's kernels are faster (`ridge._Products`). The dense products ask for full float32
precision: a GPU's default (TF32) would leave CG a relative error of about 1e-3 in every
product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

FULL = jax.lax.Precision.HIGHEST


def bucket(size: int) -> int:
    """`size` rounded up to a multiple of about 1/32 of itself: the arrays' padded length, so
    the fits of one dump (each fold's rows and entries differ by a fraction of a percent)
    run one compiled program instead of compiling their own."""
    step = 1 << max(size.bit_length() - 6, 0)
    return -(-size // step) * step


def resident(z: np.ndarray, indptr: list[np.ndarray], indices: list[np.ndarray],
             data: list[np.ndarray]) -> tuple[jax.Array, ...]:
    """A design's arrays on the device, padded to `bucket` lengths with rows and entries of 0
    (the entries' row ids in order, as `forward` assumes): (z, live, rows, cols, vals), `live`
    1 on the design's own rows (the bias is theirs alone)."""
    n, at = len(z), 0
    rows = []
    for ptr in indptr:
        rows.append(np.repeat(np.arange(at, at + len(ptr) - 1, dtype=np.int32), np.diff(ptr)))
        at += len(ptr) - 1
    nnz = sum(len(r) for r in rows)
    n_pad, nnz_pad = bucket(n), bucket(nnz)
    pad = nnz_pad - nnz
    return jax.device_put((
        np.concatenate([z, np.zeros((n_pad - n, z.shape[1]), np.float32)]),
        (np.arange(n_pad) < n).astype(np.float32),
        np.concatenate([*rows, np.full(pad, n_pad - 1, np.int32)]),
        np.concatenate([*indices, np.zeros(pad, np.int32)]).astype(np.int32, copy=False),
        np.concatenate([*data, np.zeros(pad, np.float32)]),
    ))


def _forward(z, live, rows, cols, vals, theta):
    dz = z.shape[1]
    tags = jax.ops.segment_sum(vals * theta[dz + 1 :][cols], rows, num_segments=z.shape[0],
                               indices_are_sorted=True)
    return jnp.dot(z, theta[:dz], precision=FULL) + theta[dz] * live + tags


def _transposed(z, live, rows, cols, vals, u, n_params: int):
    dz = z.shape[1]
    tags = jnp.zeros(n_params - dz - 1, jnp.float32).at[cols].add(vals * u[rows])
    return jnp.concatenate([jnp.dot(u, z, precision=FULL), u.sum()[None], tags])


forward = jax.jit(_forward)
"""z @ a + b + s @ w for every row."""

transposed = jax.jit(_transposed, static_argnames="n_params")
"""(z.T @ u, sum(u), s.T @ u)."""


@jax.jit
def normal(z, live, rows, cols, vals, theta):
    """X.T @ (X @ theta): a CG iteration's product, the rows' values never leaving the device."""
    return _transposed(z, live, rows, cols, vals, _forward(z, live, rows, cols, vals, theta),
                       n_params=theta.shape[0])


def padded_blocks(cols: np.ndarray, inverse: np.ndarray, n_params: int) -> tuple:
    """A preconditioner's blocks padded to a `bucket` count (each fold's fit has a few more or
    fewer identity tags than another: one compiled solve for all): columns past the end."""
    m = len(cols)
    pad = bucket(m) - m
    return (np.concatenate([cols, np.full((pad, cols.shape[1]), n_params, cols.dtype)]),
            np.concatenate([inverse, np.zeros((pad, *inverse.shape[1:]), inverse.dtype)]))


@functools.partial(jax.jit, static_argnames="maxiter")
def pcg(arrays, lam, rhs, x0, inv_diag, z_inv, block_cols, block_inv, atol, maxiter: int):
    """(X.T X + diag(lam)) x = rhs by conjugate gradients from x0, preconditioned by blocks
    (`ridge._BlockInverse`'s arrays), until the residual's norm is at most `atol` or after
    `maxiter` iterations: (x, iterations). SciPy's `cg` on the host does the same there.
    Blocks may be padded (`padded_blocks`)."""
    k = z_inv.shape[0]

    def a(v):
        return normal(*arrays, v) + lam * v

    def m(v):
        out = (v * inv_diag).at[:k].set(jnp.dot(z_inv, v[:k], precision=FULL))
        # Padded blocks name no column (an index past the end): read as 0, written nowhere.
        picked = v.at[block_cols].get(mode="fill", fill_value=0.0)
        blocks = jnp.einsum("mij,mj->mi", block_inv, picked, precision=FULL)
        return out.at[block_cols].set(blocks, mode="drop")

    def going(state):
        _, r, _, _, i = state
        return (jnp.linalg.norm(r) > atol) & (i < maxiter)

    def step(state):
        x, r, p, rz, i = state
        ap = a(p)
        alpha = rz / jnp.dot(p, ap, precision=FULL)
        x, r = x + alpha * p, r - alpha * ap
        zr = m(r)
        rz_next = jnp.dot(r, zr, precision=FULL)
        return x, r, zr + (rz_next / rz) * p, rz_next, i + 1

    r = rhs - a(x0)
    zr = m(r)
    x, _, _, _, i = jax.lax.while_loop(going, step, (x0, r, zr, jnp.dot(r, zr), 0))
    return x, i


def resident_bytes(rows: int, metadata: int, entries: int) -> int:
    """What `resident` puts on the device for a design of that size, padding included."""
    return 4 * (bucket(rows) * (metadata + 1) + 3 * bucket(entries))


def fits_on_device(n_bytes: int) -> bool:
    """Whether `n_bytes` more take at most half of the accelerator's free memory (the deep
    stage and the solve's vectors need the rest); True where JAX does not say."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return True
    return n_bytes <= (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2


@functools.cache
def on_accelerator() -> bool:
    """Whether JAX computes on something other than the CPU."""
    return jax.default_backend() != "cpu"
