"""Text formats of the e621 export and a deterministic gzip CSV writer."""

from __future__ import annotations

import csv
import gzip
import io
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np


def format_ts(us: np.ndarray) -> np.ndarray:
    """e621 writes `2019-03-04 17:22:10.123456`, always with microseconds."""
    text = np.datetime_as_string(us.astype("datetime64[us]"), unit="us")
    return np.strings.replace(text, "T", " ")


def bools(mask: np.ndarray) -> list[str]:
    return np.where(mask, "t", "f").tolist()


def ints(values: np.ndarray, present: np.ndarray | None = None) -> list[str]:
    """Integers as text; where not ``present`` the field is empty (null)."""
    text = values.astype(np.int64).astype(str)
    if present is not None:
        text = np.where(present, text, "")
    return text.tolist()


def md5(rng: np.random.Generator, n: int) -> list[str]:
    hexes = rng.bytes(16 * n).hex().encode("ascii")
    return np.frombuffer(hexes, dtype="S32").astype(str).tolist()


_CSV_BATCH = 5000


class CsvGz:
    """Deterministic gzip (mtime 0, no file name) CSV writer with Python csv conventions.

    Compression runs on one background thread (zlib releases the GIL), overlapping the next
    chunk's generation; at most one chunk waits, so memory stays bounded and order is kept.
    """

    def __init__(self, path: Path, header: tuple[str, ...]) -> None:
        self._raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=4
        )
        self._header = header
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None
        self.write({c: [c] for c in header})

    def write(self, columns: dict[str, list[str]]) -> None:
        rows = list(zip(*(columns[c] for c in self._header), strict=True))
        parts = []
        for lo in range(0, len(rows), _CSV_BATCH):  # small StringIOs: they hold 4 bytes/char
            buf = io.StringIO()
            writer = csv.writer(
                buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL, doublequote=True
            )
            writer.writerows(rows[lo : lo + _CSV_BATCH])
            parts.append(buf.getvalue().encode("utf-8"))
        data = b"".join(parts)
        self._wait()
        self._pending = self._pool.submit(self._gz.write, data)

    def __enter__(self) -> CsvGz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self._wait()
        self._pool.shutdown()
        self._gz.close()
        self._raw.close()
