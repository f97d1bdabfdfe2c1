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
from collections.abc import Iterator
from contextlib import contextmanager

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


# glibc's mallopt parameter, and the ceiling its dynamic threshold climbs to on 64-bit builds.
_M_MMAP_THRESHOLD = -3
_DEFAULT_MMAP_THRESHOLD_MAX = 32 << 20


@contextmanager
def big_allocations_mapped(threshold: int = 4 << 20) -> Iterator[None]:
    """Within the block, glibc serves every allocation of at least `threshold` bytes with a
    mapping of its own, handed back to the system when freed. A loop that allocates buffers
    of a few MB on several threads (the deep stage's, on streamed rows) otherwise has them
    carved from glibc's arenas, which keep them once freed: about 0.5 GB at 6M posts.
    Afterwards the threshold is left at the ceiling glibc's dynamic one climbs to."""
    mallopt = getattr(_LIBC, "mallopt", None)  # glibc only
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD_MAX)
