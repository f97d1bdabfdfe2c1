"""Reading e621 CSV exports into DuckDB without losing a row.

Every column is read as VARCHAR (typing happens in SQL, where a bad value becomes a counted
rejection rather than a failed scan), and rows the CSV parser itself cannot read are kept in
DuckDB's rejects tables instead of being skipped by an ignore-errors switch.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

from e6score_dagster.sql import literal


class DumpFormatError(ValueError):
    pass


HEADER_MAX_CHARS = 1 << 16


def read_header(path: Path) -> list[str]:
    """The first CSV record, parsed as CSV (a quoted cell may hold commas or line breaks)."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        head = f.read(HEADER_MAX_CHARS)
    row = next(csv.reader(io.StringIO(head)), [])
    return [c.strip().lstrip("\ufeff") for c in row]


def check_header(path: Path, required: tuple[str, ...]) -> list[str]:
    """The file's columns in file order; columns are matched by name, so order may change."""
    header = read_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise DumpFormatError(
            f"{path.name}: header lacks column(s) {', '.join(missing)}; "
            f"found {', '.join(header) or '<empty>'}"
        )
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DumpFormatError(f"{path.name}: header repeats column(s) {', '.join(dupes)}")
    odd = [c for c in header if not c or any(ord(ch) < 32 for ch in c)]
    if odd:
        raise DumpFormatError(
            f"{path.name}: header cell(s) {', '.join(map(repr, odd))} are empty or hold "
            "control characters; refusing to read the file"
        )
    return header


def read_csv_sql(path: Path, header: list[str], rejects: str) -> str:
    """A `read_csv(...)` table function over an export; rejected lines go to `{rejects}`.

    Column names come from the file's header, so they are quoted as literals (never pasted):
    a header cell holding a quote or SQL is just a column of that odd name.
    """
    cols = ", ".join(f"{literal(c)}: 'VARCHAR'" for c in header)
    return (
        f"read_csv({literal(str(path))}, header=true, auto_detect=false, columns={{{cols}}}, "
        f"delim=',', quote='\"', escape='\"', compression='gzip', store_rejects=true, "
        f"rejects_table={literal(rejects)}, rejects_scan={literal(rejects + '_scan')}, "
        "rejects_limit=0, "
        f"max_line_size=16777216, strict_mode=true)"
    )


def csv_rejects_count_sql(rejects: str) -> str:
    return f"SELECT count(*) FROM (SELECT DISTINCT scan_id, file_id, line FROM {rejects})"
