"""Compressing large exports on every core: ISA-L's gzip, several members written in order."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from isal import igzip_threaded

BLOCK = 1 << 22


def gzip_file(src: Path, dst: Path, threads: int | None = None) -> None:
    """Write `src` gzip-compressed to `dst` (fsynced). The output is standard gzip that any
    reader accepts; ISA-L at its default level is about 10x faster than zlib's level 6 for
    an output under 10% larger, and it uses every core."""
    threads = threads or os.cpu_count() or 1
    with open(src, "rb") as fin, igzip_threaded.open(dst, "wb", threads=threads) as fout:
        shutil.copyfileobj(fin, fout, BLOCK)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
