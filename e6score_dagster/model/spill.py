"""Big arrays kept out of the process's memory: written to an unlinked temporary file and read
back through a read-only mapping whose pages are let go of after each use.

At 6M posts the exact fits' design is 2.8 GB. Held in the heap it set the fit's peak; mapped
from a file, only the rows a product is working on are resident at a time (`release` hands
the rest back after each piece), and the kernel's page cache, which it may drop and re-read
from disk under pressure, keeps them warm between passes. The file is unlinked as soon as it
is made, so a killed run leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGN = mmap.PAGESIZE  # every array starts on a page: aligned for any dtype, and its own pages


@dataclass(frozen=True)
class Extent:
    """Where one array lies in a spill file."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SpillFile:
    """An append-only unlinked file of arrays: `write` them, `copy` extents from another
    spill file, then `mapped` to read them all back as read-only views of one mapping."""

    def __init__(self, folder: Path | None = None) -> None:
        # Lives as long as this object (closed by `mapped` or `close`), not one block.
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115
        self._end = 0

    def _pad(self) -> int:
        start = -(-self._end // ALIGN) * ALIGN
        if start > self._end:
            os.pwrite(self._file.fileno(), bytes(start - self._end), self._end)
        self._end = start
        return start

    def write(self, array: np.ndarray) -> Extent:
        """Append `array` (made C-contiguous) and say where it went."""
        array = np.ascontiguousarray(array)
        start = self._pad()
        view = memoryview(array.reshape(-1)).cast("B")
        while view:
            done = os.pwrite(self._file.fileno(), view, self._end)
            view, self._end = view[done:], self._end + done
        return Extent(start, array.dtype, array.shape)

    def append(self, source: SpillFile, extents: list[Extent]) -> Extent:
        """The arrays at `extents` of `source` (of one dtype and row shape), joined along
        their first axis as one new array here: copied a piece at a time, never all in
        memory."""
        start = self._pad()
        for e in extents:
            data = os.pread(source._file.fileno(), e.nbytes, e.offset)
            os.pwrite(self._file.fileno(), data, self._end)
            self._end += len(data)
        first = extents[0]
        return Extent(start, first.dtype, (sum(e.shape[0] for e in extents), *first.shape[1:]))

    def mapped(self) -> Mapping:
        """Every array written so far, readable through one mapping (the file itself is
        closed: the mapping keeps it until the last view of it is gone)."""
        self._file.flush()
        mapping = Mapping(mmap.mmap(self._file.fileno(), self._end, access=mmap.ACCESS_READ))
        self.close()
        return mapping

    def close(self) -> None:
        self._file.close()


class Mapping:
    """A spill file's arrays, as read-only views of one mapping."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm

    def array(self, e: Extent) -> np.ndarray:
        count = int(np.prod(e.shape, dtype=np.int64))
        return np.frombuffer(self._mm, e.dtype, count, e.offset).reshape(e.shape)


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
        lo = (a.ctypes.data - base) // ALIGN * ALIGN
        hi = min(-(-(a.ctypes.data - base + a.nbytes) // ALIGN) * ALIGN, len(mm))
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
