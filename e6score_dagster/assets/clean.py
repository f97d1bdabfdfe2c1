"""Posts as typed rows in DuckDB; every row the dump has is either cleaned or rejected."""

import time
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster import checks, stage
from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.code_versions import code_version
from e6score_dagster.csv_read import (
    DumpFormatError,
    check_header,
    csv_rejects_count_sql,
    read_csv_sql,
)
from e6score_dagster.resources import QualityGates, StateDir
from e6score_dagster.schema import POSTS_COLUMNS, POSTS_NEW_COLUMNS
from e6score_dagster.sql import ident, literal
from e6score_dagster.store import query_progress

TS_FORMATS = "['%Y-%m-%d %H:%M:%S.%f', '%Y-%m-%d %H:%M:%S']"


def _bool(col: str) -> str:
    return f"CASE lower(trim({col})) WHEN 't' THEN true WHEN 'f' THEN false END AS {col}"


def _int(col: str, kind: str = "BIGINT") -> str:
    return f"TRY_CAST(trim({col}) AS {kind}) AS {col}"


def _ts(col: str) -> str:
    return f"TRY_STRPTIME(trim({col}), {TS_FORMATS}) AS {col}"


def _raw_if_untyped(typed: str, col: str) -> str:
    """The raw text of a required column, kept only where typing it failed (the rejection
    reason quotes it); NULL elsewhere, so the staged table does not carry a second copy."""
    return f"CASE WHEN ({typed.rsplit(' AS ', 1)[0]}) IS NULL THEN {col} END AS {col}_raw"


# Typed projection of the raw VARCHAR columns; unrepairable values are caught by REJECT_REASON.
TYPED_COLUMNS = ",\n".join(
    [
        _raw_if_untyped(_int("id"), "id"),
        _int("id"),
        _int("uploader_id"),
        _ts("created_at"),
        _raw_if_untyped(_ts("created_at"), "created_at"),
        "md5",
        "source",
        "lower(trim(rating)) AS rating",
        _int("image_width", "INTEGER"),
        _int("image_height", "INTEGER"),
        "tag_string",
        "locked_tags",
        _int("fav_count"),
        _raw_if_untyped(_int("fav_count"), "fav_count"),
        "lower(trim(file_ext)) AS file_ext",
        _int("parent_id"),
        _int("change_seq"),
        _int("approver_id"),
        _int("file_size"),
        _int("comment_count", "INTEGER"),
        "description",
        "TRY_CAST(trim(duration) AS DOUBLE) AS duration",
        _ts("updated_at"),
        *(_bool(c) for c in ("is_deleted", "is_pending", "is_flagged")),
        _int("score", "INTEGER"),
        _int("up_score", "INTEGER"),
        _int("down_score", "INTEGER"),
        *(_bool(c) for c in ("is_rating_locked", "is_status_locked", "is_note_locked")),
        "nullif(trim(bg_color), '') AS bg_color",
        _ts("last_noted_at"),
        _ts("last_commented_at"),
    ]
)
# Free text, stored as read: DuckDB's string compression costs more CPU than parsing the CSV,
# for columns nothing but the export reads back (tag_string is split where it is used).
UNCOMPRESSED_TEXT = ("md5", "source", "tag_string", "locked_tags", "description")

REJECT_REASON = """
CASE
  WHEN id IS NULL THEN 'id is not an integer: '
       || coalesce('''' || left(id_raw, 40) || '''', 'empty')
  WHEN id <= 0 THEN 'id is not positive'
  WHEN fav_count IS NULL THEN 'fav_count is not an integer: '
       || coalesce('''' || left(fav_count_raw, 40) || '''', 'empty')
  WHEN fav_count < 0 THEN 'fav_count is negative'
  WHEN created_at IS NULL THEN 'created_at is not a timestamp: '
       || coalesce('''' || left(created_at_raw, 40) || '''', 'empty')
  WHEN rating IS NULL OR rating NOT IN ('s', 'q', 'e') THEN 'rating is not s, q or e'
END
"""

def posts_source_sql(posts: Path, header: list[str]) -> str:
    """The posts file as VARCHAR columns; columns of the current export that an old dump
    lacks are NULL, so both layouts give the same table."""
    source = read_csv_sql(posts, header, "posts_rejects")
    missing = [c for c in POSTS_NEW_COLUMNS if c not in header]
    if not missing:
        return source
    nulls = ", ".join(f"NULL::VARCHAR AS {ident(c)}" for c in missing)
    return f"(SELECT *, {nulls} FROM {source})"


EXTRA_COLUMNS = ("id_raw", "fav_count_raw", "created_at_raw", "reason")


def stage_posts(conn, posts: Path, dump_date: str, table: str, rejected: str, log) -> dict:
    """Parse the posts export into `table` and its unrepairable rows into `rejected`.

    Both are staging tables; returns the counts the checks and the metadata need.
    """
    try:
        header = check_header(posts, POSTS_COLUMNS)
    except DumpFormatError as exc:
        raise dg.Failure(description=str(exc)) from exc
    log(f"reading posts of {dump_date} from {posts}")
    # One pass from the CSV into the staged table (writing the table dominates the step's
    # time, so it is written once; publishing it is a rename).
    typed = (f"SELECT *, {REJECT_REASON} AS reason FROM (SELECT {TYPED_COLUMNS} "
             f"FROM {posts_source_sql(posts, header)})")
    columns = ", ".join(
        f"{ident(name)} {kind}" + (" USING COMPRESSION uncompressed"
                                   if name in UNCOMPRESSED_TEXT else "")
        for name, kind, *_ in conn.execute(f"DESCRIBE {typed}").fetchall()
    )
    conn.execute(f"CREATE OR REPLACE TABLE {table} ({columns})")
    with query_progress(conn, log, "parsing posts"):
        conn.execute(f"INSERT INTO {table} {typed}")
    # Duplicate ids: keep the newest edit of the post, reject the others by name.
    conn.execute(
        f"""
        UPDATE {table}
        SET reason = 'duplicate id (the row with the newest change_seq was kept)'
        WHERE rowid IN (
            SELECT rid FROM (
                SELECT s.rowid AS rid, row_number() OVER (
                    PARTITION BY s.id
                    ORDER BY s.change_seq DESC NULLS LAST, s.updated_at DESC NULLS LAST, s.rowid
                ) AS rn
                FROM {table} s
                WHERE s.reason IS NULL AND s.id IN (
                    SELECT id FROM {table} WHERE reason IS NULL
                    GROUP BY id HAVING count(*) > 1
                )
            ) WHERE rn > 1
        )
        """
    )
    csv_rejected = conn.execute(csv_rejects_count_sql("posts_rejects")).fetchone()[0]
    day = literal(dump_date)
    conn.execute(
        f"""
        CREATE OR REPLACE TABLE {rejected} AS
        SELECT CAST({day} AS DATE) AS dump_date, 'posts' AS file, 'csv' AS stage,
               line, NULL::VARCHAR AS id,
               string_agg(DISTINCT error_type || ': ' || error_message, '; ') AS reason,
               any_value(left(csv_line, 4096)) AS raw
        FROM posts_rejects GROUP BY scan_id, file_id, line
        UNION ALL
        SELECT CAST({day} AS DATE), 'posts', 'typing', NULL,
               left(coalesce(id_raw, CAST(id AS VARCHAR)), 64), reason,
               left(concat_ws(',', coalesce(id_raw, CAST(id AS VARCHAR)),
                              coalesce(created_at_raw, CAST(created_at AS VARCHAR)), rating,
                              coalesce(fav_count_raw, CAST(fav_count AS VARCHAR))), 4096)
        FROM {table} WHERE reason IS NOT NULL
        """
    )
    conn.execute(f"DELETE FROM {table} WHERE reason IS NOT NULL")
    for col in EXTRA_COLUMNS:
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    n_clean, n_rejected = conn.execute(
        f"SELECT (SELECT count(*) FROM {table}), (SELECT count(*) FROM {rejected})"
    ).fetchone()
    reasons = conn.execute(
        f"SELECT regexp_replace(reason, ':.*', '') AS r, count(*) FROM {rejected} "
        "GROUP BY r ORDER BY 2 DESC LIMIT 20"
    ).fetchall()
    return {
        "rows": int(n_clean),
        "rejected": int(n_rejected),
        "dump_rows": int(n_clean + n_rejected),
        "rejected_csv_rows": int(csv_rejected),
        "rejected_by_reason": {r: int(n) for r, n in reasons},
    }


@dg.asset(
    group_name="ingest",
    deps=["raw_dump"],
    kinds={"duckdb"},
    code_version=code_version(__name__),
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    check_specs=[checks.REJECTED_SHARE, checks.POST_COUNT],
    description="Posts of the current dump as typed DuckDB rows (timestamps, booleans; "
    "`tag_string` as exported, split where it is read; `bg_color`, `last_noted_at`, "
    "`last_commented_at` of the current export, null for old dumps). Rows that "
    "cannot be repaired go to `rejected_rows` with their reason, so "
    "`cleaned_posts` + `rejected_rows` account for every row of the dump.",
)
def cleaned_posts(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    state: StateDir,
    gates: QualityGates,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    with stage.begin(
        context, duckdb, state, inputs=["raw_dump"], tables=["cleaned_posts", "rejected_rows"]
    ) as st:
        if st.reuse:
            return st.reused_result()
        dump = st.inputs["raw_dump"]
        with duckdb.get_connection() as conn:
            counts = stage_posts(
                conn, Path(dump.info["posts"]), st.dump_date, st.table("cleaned_posts"),
                st.table("rejected_rows"), context.log.info,
            )
        if counts["rejected"]:
            context.log.warning(
                f"{counts['rejected']} of {counts['dump_rows']} rows rejected: see the "
                "materialisation's rejected_by_reason"
            )
        return st.finish(
            info={k: counts[k] for k in ("rows", "rejected", "dump_rows")},
            checks=[
                checks.rejected_share_within_limit(counts["rows"], counts["rejected"], gates),
                # against the last *accepted* build: a blocked dump is no baseline
                checks.post_count_not_collapsed(counts["rows"], st.published, gates),
            ],
            metadata={
                "dump_rows": dg.MetadataValue.int(counts["dump_rows"]),
                "rejected_rows": dg.MetadataValue.int(counts["rejected"]),
                "rejected_csv_rows": dg.MetadataValue.int(counts["rejected_csv_rows"]),
                "rejected_share": counts["rejected"] / max(counts["dump_rows"], 1),
                "rejected_by_reason": dg.MetadataValue.json(counts["rejected_by_reason"]),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
