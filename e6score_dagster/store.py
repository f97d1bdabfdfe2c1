"""DuckDB store helpers: atomic table swaps, the lineage table, metadata about tables."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import duckdb

from e6score_dagster.local_state import (  # noqa: F401  (re-exported for the assets)
    MissingUpstreamError,
    read_lineage,
    table_exists,
)
from e6score_dagster.schema import column_description

LINEAGE_DDL = """
CREATE TABLE IF NOT EXISTS e6score_lineage (
    asset VARCHAR PRIMARY KEY,
    dump_date DATE,
    built_at TIMESTAMP,
    info JSON
)
"""


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection):
    """All-or-nothing: readers see the old tables until COMMIT, a killed run leaves them."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def record_lineage(
    conn: duckdb.DuckDBPyConnection, asset: str, dump_date: str, info: dict[str, Any]
) -> None:
    conn.execute(LINEAGE_DDL)
    conn.execute(
        "INSERT OR REPLACE INTO e6score_lineage VALUES (?, ?, ?, ?)",
        [asset, dump_date, datetime.now(UTC).replace(tzinfo=None), json.dumps(info)],
    )


@contextmanager
def query_progress(
    conn: duckdb.DuckDBPyConnection, log: Callable[[str], None], label: str, every_s: float = 10
) -> Iterator[None]:
    """Logs a long DuckDB statement's progress (percent, elapsed, ETA) while it runs."""
    conn.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false")
    done = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:
        while not done.wait(every_s):
            pct = conn.query_progress()
            elapsed = time.monotonic() - t0
            if pct > 0:
                eta = elapsed * (100 - pct) / pct
                log(f"{label}: {pct:.0f}% after {elapsed:.0f} s, ETA {eta:.0f} s")

    thread = threading.Thread(target=watch, daemon=True, name=f"progress-{label}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        log(f"{label}: done in {time.monotonic() - t0:.1f} s")


def version_key(*parts: object) -> str:
    """A short, stable digest of what an output was built from (inputs, code, config)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def last_build(conn: duckdb.DuckDBPyConnection, asset: str) -> tuple[str, dict[str, Any]] | None:
    """(dump_date, info) of the last build of `asset`, or None if it was never built."""
    try:
        return read_lineage(conn, asset)
    except MissingUpstreamError:
        return None


def built_from(conn: duckdb.DuckDBPyConnection, asset: str, key: str) -> dict[str, Any] | None:
    """The lineage info of `asset` if its last build used exactly `key`, else None."""
    last = last_build(conn, asset)
    return last[1] if last and last[1].get("key") == key else None


def code_version(context: dg.AssetExecutionContext) -> str:
    return context.assets_def.code_versions_by_key[context.asset_key] or "0"


def lineage_metadata(dump_date: str, key: str, inputs: dict[str, str], reused: bool) -> dict:
    """What every materialisation says about its provenance."""
    return {
        "dump_date": dump_date,
        "data_version": key,
        "built_from": dg.MetadataValue.json(inputs),
        "reused": reused,
    }


def column_schema(conn: duckdb.DuckDBPyConnection, table: str) -> dg.TableSchema:
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name, dtype, description=column_description(table, name))
            for name, dtype in rows
        ]
    )


def table_metadata(conn: duckdb.DuckDBPyConnection, table: str) -> dict[str, Any]:
    n = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    return {
        "dagster/row_count": dg.MetadataValue.int(int(n)),
        "dagster/column_schema": column_schema(conn, table),
        "table": dg.MetadataValue.text(table),
    }


def reused_result(
    conn: duckdb.DuckDBPyConnection,
    dump_date: str,
    key: str,
    inputs: dict[str, str],
    table: str | None = None,
    **extra: Any,
) -> dg.MaterializeResult:
    """The result of a stage whose output is already built from the same inputs: no work."""
    meta = table_metadata(conn, table) if table else {}
    return dg.MaterializeResult(
        metadata={**meta, **lineage_metadata(dump_date, key, inputs, reused=True), **extra},
        data_version=dg.DataVersion(key),
    )
