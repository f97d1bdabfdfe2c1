"""Give freed memory back to the system between the steps of one process.

`dg launch` runs every step of the job in one process. What a step frees stays in the
allocators' free lists (glibc's arenas, Arrow's mimalloc pool) and counts towards the next
step's peak RSS; at 1M posts that was about 1 GB carried from `fitted_params` into the CSV
export of `scored_posts`. Within a step, a build from many chunks (the exact fits' design)
fragments the heap the same way: 0.6 GB above the design at 1M posts, 3.5 GB at 6M.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import pyarrow as pa


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def release_memory(collect: bool = True) -> None:
    """Collect garbage (unless not `collect`: cheap enough to call in a loop), then return
    the free memory of Arrow's pool and of glibc's heap."""
    if collect:
        gc.collect()
    pa.default_memory_pool().release_unused()
    trim = getattr(_LIBC, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
