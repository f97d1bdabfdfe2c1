"""DuckDB store helpers: atomic table swaps, the lineage history, metadata about tables."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from e6score_dagster.local_state import table_exists
from e6score_dagster.schema import column_description


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


@contextmanager
def memory_limit(conn: duckdb.DuckDBPyConnection, limit: str, restore: str) -> Iterator[None]:
    """DuckDB's memory limit set to `limit` for the statements inside, then to `restore` (the
    configured one: what `current_setting` shows is rounded, and setting it back would drift)."""
    conn.execute(f"SET memory_limit = '{limit}'")
    try:
        yield
    finally:
        conn.execute(f"SET memory_limit = '{restore}'")


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


# --------------------------------------------------------------------------- lineage history

BUILDS_DDL = (
    "CREATE SEQUENCE IF NOT EXISTS e6score_build_id",
    """
    CREATE TABLE IF NOT EXISTS e6score_builds (
        id BIGINT PRIMARY KEY DEFAULT nextval('e6score_build_id'),
        asset VARCHAR NOT NULL,
        version VARCHAR NOT NULL,
        dump_date DATE,
        code_version VARCHAR,
        inputs JSON,
        config JSON,
        outcome VARCHAR NOT NULL,  -- building, published, rejected, failed, abandoned
        reason VARCHAR,
        started_at TIMESTAMP,
        finished_at TIMESTAMP,
        info JSON,
        files JSON
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS e6score_current (
        asset VARCHAR PRIMARY KEY,
        build_id BIGINT NOT NULL,
        published_at TIMESTAMP
    )
    """,
)
LINEAGE_VIEW = """
CREATE OR REPLACE VIEW e6score_lineage AS
SELECT c.asset, b.version, b.dump_date, c.published_at AS built_at, b.inputs, b.info
FROM e6score_current c JOIN e6score_builds b ON b.id = c.build_id
"""


class MissingUpstreamError(RuntimeError):
    pass


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Build:
    """One build of an asset, as the lineage history records it."""

    id: int
    asset: str
    version: str
    dump_date: str | None
    inputs: dict[str, str]
    outcome: str
    reason: str | None
    info: dict[str, Any]
    files: dict[str, Any]

    def files_intact(self) -> bool:
        """Every file of the build is there, unchanged since it was published."""
        return all(fingerprint(Path(p)) == fp for p, fp in self.files.items())


BUILD_COLUMNS = (
    "id, asset, version, strftime(dump_date, '%Y-%m-%d'), inputs, outcome, reason, info, files"
)


def _build(row: tuple) -> Build:
    return Build(
        id=int(row[0]),
        asset=row[1],
        version=row[2],
        dump_date=row[3],
        inputs=json.loads(row[4] or "{}"),
        outcome=row[5],
        reason=row[6],
        info=json.loads(row[7] or "{}"),
        files=json.loads(row[8] or "{}"),
    )


def fingerprint(path: Path) -> Any:
    """Size and mtime of a file, or of every file under a folder; None if it is missing."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return sorted(
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in path.rglob("*")
            if p.is_file()
        )
    return None


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def ensure_lineage(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the history tables; a home of the single-row lineage era is carried over."""
    for ddl in BUILDS_DDL:
        conn.execute(ddl)
    legacy = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'e6score_lineage' "
        "AND table_type = 'BASE TABLE' AND table_catalog = current_database()"
    ).fetchone()[0]
    if legacy:
        with transaction(conn):
            for asset, date, built_at, info in conn.execute(
                "SELECT asset, dump_date, built_at, info FROM e6score_lineage"
            ).fetchall():
                build_id = conn.execute(
                    "INSERT INTO e6score_builds (asset, version, dump_date, outcome, reason, "
                    "started_at, finished_at, inputs, info, files) VALUES "
                    "(?, ?, ?, 'published', 'carried over from the single-row lineage', ?, ?, "
                    "'{}', ?, '{}') RETURNING id",
                    [asset, json.loads(info).get("key", "legacy"), date, built_at, built_at, info],
                ).fetchone()[0]
                conn.execute(
                    "INSERT OR REPLACE INTO e6score_current VALUES (?, ?, ?)",
                    [asset, build_id, built_at],
                )
            conn.execute("DROP TABLE e6score_lineage")
    conn.execute(LINEAGE_VIEW)


def current(conn: duckdb.DuckDBPyConnection, asset: str) -> Build | None:
    """The published build of `asset` (what readers use), or None. Works read-only."""
    if not table_exists(conn, "e6score_current"):
        return None
    row = conn.execute(
        f"SELECT {BUILD_COLUMNS} FROM e6score_builds "
        "WHERE id = (SELECT build_id FROM e6score_current WHERE asset = ?)",
        [asset],
    ).fetchone()
    return _build(row) if row else None


def history(conn: duckdb.DuckDBPyConnection, asset: str) -> list[Build]:
    """Every build of `asset`, newest first."""
    if not table_exists(conn, "e6score_builds"):
        return []
    rows = conn.execute(
        f"SELECT {BUILD_COLUMNS} FROM e6score_builds WHERE asset = ? ORDER BY id DESC", [asset]
    ).fetchall()
    return [_build(r) for r in rows]


def read_lineage(conn: duckdb.DuckDBPyConnection, asset: str) -> tuple[str, dict[str, Any]]:
    """(dump_date, info) of the published build of `asset`; a clear error if there is none."""
    build = current(conn, asset)
    if build is None:
        raise MissingUpstreamError(f"`{asset}` has not been published yet; materialise it first")
    return build.dump_date or "", {"key": build.version, **build.info}
