"""Posts as typed rows in DuckDB; every row the dump has is either cleaned or rejected."""

import time
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.csv_read import (
    DumpFormatError,
    check_header,
    csv_rejects_count_sql,
    read_csv_sql,
)
from e6score_dagster.schema import POSTS_COLUMNS, POSTS_NEW_COLUMNS
from e6score_dagster.sql import ident, literal
from e6score_dagster.store import (
    built_from,
    code_version,
    last_build,
    lineage_metadata,
    query_progress,
    read_lineage,
    record_lineage,
    reused_result,
    table_metadata,
    transaction,
    version_key,
)

TS_FORMATS = "['%Y-%m-%d %H:%M:%S.%f', '%Y-%m-%d %H:%M:%S']"


def _bool(col: str) -> str:
    return f"CASE lower(trim({col})) WHEN 't' THEN true WHEN 'f' THEN false END AS {col}"


def _int(col: str, kind: str = "BIGINT") -> str:
    return f"TRY_CAST(trim({col}) AS {kind}) AS {col}"


def _ts(col: str) -> str:
    return f"TRY_STRPTIME(trim({col}), {TS_FORMATS}) AS {col}"


# Typed projection of the raw VARCHAR columns; unrepairable values are caught by REJECT_REASON.
TYPED_COLUMNS = ",\n".join(
    [
        "id AS id_raw",
        _int("id"),
        _int("uploader_id"),
        _ts("created_at"),
        "created_at AS created_at_raw",
        "md5",
        "source",
        "lower(trim(rating)) AS rating",
        _int("image_width", "INTEGER"),
        _int("image_height", "INTEGER"),
        "tag_string",
        "locked_tags",
        _int("fav_count"),
        "fav_count AS fav_count_raw",
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
        "list_distinct(list_filter(string_split(trim(coalesce(tag_string, '')), ' '), "
        "lambda t: t <> '')) AS tags",
    ]
)

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


STAGED = "cleaned_posts__next"  # becomes cleaned_posts by a rename, inside the transaction
EXTRA_COLUMNS = ("id_raw", "fav_count_raw", "created_at_raw", "reason")


@dg.asset(
    group_name="ingest",
    deps=["raw_dump"],
    kinds={"duckdb"},
    code_version="3",
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    description="Posts of the current dump as typed DuckDB rows (timestamps, booleans, a tag "
    "array; `bg_color`, `last_noted_at`, `last_commented_at` of the current export, null for "
    "old dumps). Rows that cannot be repaired go to `rejected_rows` with their reason, so "
    "`cleaned_posts` + `rejected_rows` account for every row of the dump.",
)
def cleaned_posts(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    with duckdb.get_connection() as conn:
        dump_date, dump = read_lineage(conn, "raw_dump")
        inputs = {"raw_dump": dump["key"]}
        key = version_key(inputs, code_version(context))
        if built_from(conn, "cleaned_posts", key):
            context.log.info("cleaned_posts is already built from this dump and code: reused")
            return reused_result(conn, dump_date, key, inputs, "cleaned_posts")
        previous = _previous_dump(conn, dump_date)
        posts = Path(dump["posts"])
        try:
            header = check_header(posts, POSTS_COLUMNS)
        except DumpFormatError as exc:
            raise dg.Failure(description=str(exc)) from exc
        context.log.info(f"reading posts of {dump_date} from {dump['posts']}")
        # One pass from the CSV into the table that becomes cleaned_posts (writing the table
        # dominates the step's time, so it is written once, not staged and then copied).
        with query_progress(conn, context.log.info, "parsing posts"):
            conn.execute(
                f"CREATE OR REPLACE TABLE {STAGED} AS SELECT *, {REJECT_REASON} AS reason "
                f"FROM (SELECT {TYPED_COLUMNS} "
                f"FROM {posts_source_sql(posts, header)})"
            )
        # Duplicate ids: keep the newest edit of the post, reject the others by name.
        conn.execute(
            f"""
            UPDATE {STAGED}
            SET reason = 'duplicate id (the row with the newest change_seq was kept)'
            WHERE rowid IN (
                SELECT rid FROM (
                    SELECT s.rowid AS rid, row_number() OVER (
                        PARTITION BY s.id
                        ORDER BY s.change_seq DESC NULLS LAST, s.updated_at DESC NULLS LAST, s.rowid
                    ) AS rn
                    FROM {STAGED} s
                    WHERE s.reason IS NULL AND s.id IN (
                        SELECT id FROM {STAGED} WHERE reason IS NULL
                        GROUP BY id HAVING count(*) > 1
                    )
                ) WHERE rn > 1
            )
            """
        )
        t_parse = time.perf_counter() - t0
        csv_rejected = conn.execute(csv_rejects_count_sql("posts_rejects")).fetchone()[0]
        day = literal(dump_date)
        with transaction(conn):
            conn.execute(
                f"""
                CREATE OR REPLACE TABLE rejected_rows AS
                SELECT CAST({day} AS DATE) AS dump_date, 'posts' AS file, 'csv' AS stage,
                       line, NULL::VARCHAR AS id,
                       string_agg(DISTINCT error_type || ': ' || error_message, '; ') AS reason,
                       any_value(left(csv_line, 4096)) AS raw
                FROM posts_rejects GROUP BY scan_id, file_id, line
                UNION ALL
                SELECT CAST({day} AS DATE), 'posts', 'typing', NULL, left(id_raw, 64), reason,
                       left(concat_ws(',', id_raw, created_at_raw, rating, fav_count_raw), 4096)
                FROM {STAGED} WHERE reason IS NOT NULL
                """
            )
            conn.execute(f"DELETE FROM {STAGED} WHERE reason IS NOT NULL")
            for col in EXTRA_COLUMNS:
                conn.execute(f"ALTER TABLE {STAGED} DROP COLUMN {col}")
            conn.execute("DROP TABLE IF EXISTS cleaned_posts")
            conn.execute(f"ALTER TABLE {STAGED} RENAME TO cleaned_posts")
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM cleaned_posts), (SELECT count(*) FROM rejected_rows)"
            ).fetchone()
            n_clean, n_rejected = int(counts[0]), int(counts[1])
            record_lineage(
                conn,
                "cleaned_posts",
                dump_date,
                {
                    "key": key,
                    **previous,
                    "rows": n_clean,
                    "rejected": n_rejected,
                    "dump_rows": n_clean + n_rejected,
                },
            )
        reasons = conn.execute(
            "SELECT regexp_replace(reason, ':.*', '') AS r, count(*) FROM rejected_rows "
            "GROUP BY r ORDER BY 2 DESC LIMIT 20"
        ).fetchall()
        meta = table_metadata(conn, "cleaned_posts")
    total = n_clean + n_rejected
    if n_rejected:
        context.log.warning(f"{n_rejected} of {total} rows rejected: see table rejected_rows")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key),
        metadata={
            **meta,
            **lineage_metadata(dump_date, key, inputs, reused=False),
            "dump_rows": dg.MetadataValue.int(total),
            "rejected_rows": dg.MetadataValue.int(n_rejected),
            "rejected_csv_rows": dg.MetadataValue.int(int(csv_rejected)),
            "rejected_share": float(n_rejected / total) if total else 0.0,
            "rejected_by_reason": dg.MetadataValue.json({r: int(n) for r, n in reasons}),
            "parse_seconds": round(t_parse, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )


def _previous_dump(conn, dump_date: str) -> dict:
    """The post count of the last dump cleaned before this one, for the count-drop check."""
    last = last_build(conn, "cleaned_posts")
    if last is None:
        return {}
    date, info = last
    if date == dump_date:  # a rebuild of the same dump compares with the same predecessor
        return {k: info[k] for k in ("previous_rows", "previous_dump_date") if k in info}
    return {"previous_rows": info["rows"], "previous_dump_date": date}
