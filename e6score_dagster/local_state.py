"""Where local state lives and how to read what was built last, without Dagster.

The curation CLI (`e6score_dagster.top`) reads only this, so it starts in well under a second;
`resources.py` and `store.py` re-export these names for the assets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import duckdb

DB_FILE = "e6score.duckdb"


def default_home() -> Path:
    """`$E6SCORE_HOME`, else `data/` of the source checkout (or of the working directory)."""
    env = os.environ.get("E6SCORE_HOME")
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").exists():
        return checkout / "data"
    return Path.cwd() / "data"


class MissingUpstreamError(RuntimeError):
    pass


def table_exists(conn: duckdb.DuckDBPyConnection, table: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_name = ? AND table_schema = 'main' AND table_catalog = current_database()",
        [table],
    ).fetchone()
    return bool(row and row[0])


def read_lineage(conn: duckdb.DuckDBPyConnection, asset: str) -> tuple[str, dict[str, Any]]:
    """(dump_date, info) of the last successful build of `asset`; a clear error if none.

    Works on read-only connections too (the curation CLI reads while nothing writes).
    """
    if not table_exists(conn, "e6score_lineage"):
        raise MissingUpstreamError(f"`{asset}` has not been materialised yet; materialise it first")
    row = conn.execute(
        "SELECT strftime(dump_date, '%Y-%m-%d'), info FROM e6score_lineage WHERE asset = ?",
        [asset],
    ).fetchone()
    if row is None:
        raise MissingUpstreamError(f"`{asset}` has not been materialised yet; materialise it first")
    return row[0], json.loads(row[1])
