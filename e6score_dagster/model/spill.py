"""Big arrays kept out of the process's memory: grown in an unlinked temporary file and read
back through a read-only mapping whose pages are let go of after each use.

At 6M posts the exact fits' design is 2.8 GB. Held in the heap it set the fit's peak; mapped
from a file, only the rows a product is working on are resident at a time (`release` hands
the rest back after each piece), and the kernel's page cache, which may drop them and read
them again from disk under pressure, keeps them warm between passes. Each file is unlinked as
soon as it is made, so a killed run leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np


class SpillArray:
    """One array grown by appending rows to an unlinked file (written once, in order), then
    read back as a read-only view of the whole file (`mapped`)."""

    def __init__(self, folder: Path | None = None) -> None:
        # Lives as long as this object (closed by `mapped`), not one block.
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115
        self._size = 0
        self._like: np.ndarray | None = None  # an empty array of the rows' dtype and shape

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows)
        if self._like is None:
            self._like = rows[:0].copy()
        elif rows.dtype != self._like.dtype or rows.shape[1:] != self._like.shape[1:]:
            raise ValueError(f"rows {rows.dtype}{rows.shape} do not extend {self._like.dtype}"
                             f"{self._like.shape}")
        view = memoryview(rows.reshape(-1)).cast("B")
        while view:
            done = os.pwrite(self._file.fileno(), view, self._size)
            view, self._size = view[done:], self._size + done

    def mapped(self) -> np.ndarray:
        """Every row appended, as a read-only view of the file's mapping (the file itself is
        closed: the mapping keeps it until the last view of it is gone)."""
        like = self._like if self._like is not None else np.zeros(0, np.float32)
        if not self._size:
            self._file.close()
            return like
        mm = mmap.mmap(self._file.fileno(), self._size, access=mmap.ACCESS_READ)
        self._file.close()
        return np.frombuffer(mm, like.dtype).reshape(-1, *like.shape[1:])


def release(*arrays: np.ndarray) -> None:
    """Let go of the resident pages of the arrays that are views of a spill mapping (no-op for
    any other array): the next read faults them back in from the page cache."""
    for a in arrays:
        mm = a.base
        while isinstance(mm, np.ndarray | memoryview):
            mm = mm.base if isinstance(mm, np.ndarray) else mm.obj
        if not isinstance(mm, mmap.mmap) or not a.nbytes:
            continue
        base = np.frombuffer(mm, np.uint8).ctypes.data
        lo = (a.ctypes.data - base) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(-(-(a.ctypes.data - base + a.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
