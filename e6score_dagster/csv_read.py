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


class DumpFormatError(ValueError):
    pass


def read_header(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline()
    row = next(csv.reader(io.StringIO(first)), [])
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
    return header


def read_csv_sql(path: Path, header: list[str], rejects: str) -> str:
    """A `read_csv(...)` table function over an export; rejected lines go to `{rejects}`."""
    cols = ", ".join(f"'{c}': 'VARCHAR'" for c in header)
    p = str(path).replace("'", "''")
    return (
        f"read_csv('{p}', header=true, auto_detect=false, columns={{{cols}}}, delim=',', "
        f"quote='\"', escape='\"', compression='gzip', store_rejects=true, "
        f"rejects_table='{rejects}', rejects_scan='{rejects}_scan', rejects_limit=0, "
        f"max_line_size=16777216, strict_mode=true)"
    )


def csv_rejects_count_sql(rejects: str) -> str:
    return f"SELECT count(*) FROM (SELECT DISTINCT scan_id, file_id, line FROM {rejects})"
