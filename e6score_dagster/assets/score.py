"""Every cleaned post scored with the current params: the table and the CSV export."""

import os
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster_duckdb import DuckDBResource

from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.gzip_file import gzip_file
from e6score_dagster.model import ParquetBatches, load_params, score_batches
from e6score_dagster.plots import histogram_md
from e6score_dagster.resources import StateDir
from e6score_dagster.schema import POSTS_COLUMNS
from e6score_dagster.store import (
    built_from,
    code_version,
    lineage_metadata,
    query_progress,
    read_lineage,
    record_lineage,
    reused_result,
    table_metadata,
    transaction,
    version_key,
)

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("mu", pa.float32()),
        ("sigma", pa.float32()),
        ("expected_fav_count", pa.float64()),
        ("fav_score", pa.float64()),
        ("fav_zscore", pa.float64()),
    ]
)
BOOLEAN_COLUMNS = {
    "is_deleted",
    "is_pending",
    "is_flagged",
    "is_rating_locked",
    "is_status_locked",
    "is_note_locked",
}
TIMESTAMP_COLUMNS = {"created_at", "updated_at"}


def export_column_sql(col: str) -> str:
    """Back to the export's own spelling: t/f booleans, microsecond timestamps."""
    if col in BOOLEAN_COLUMNS:
        return f"CASE c.{col} WHEN true THEN 't' WHEN false THEN 'f' END AS {col}"
    if col in TIMESTAMP_COLUMNS:
        return f"strftime(c.{col}, '%Y-%m-%d %H:%M:%S.%f') AS {col}"
    return f"c.{col}"


def preview_md(rows: list) -> str:
    head = "| id | favs | expected | fav_score |\n|---|---|---|---|\n"
    return head + "\n".join(f"| {i} | {f} | {e} | {s} |" for i, f, e, s in rows)


def _write_scores(fitted, matrix: Path, out: Path, log) -> tuple[int, float]:
    data = ParquetBatches(matrix, fitted.layout, 8192, rows="all")
    total = data.num_rows()
    t0 = time.perf_counter()
    t_log = t0
    done = 0
    with pq.ParquetWriter(out, SCORE_SCHEMA) as writer:
        for scores in score_batches(fitted, data):
            writer.write_table(
                pa.table({k: scores[k] for k in SCORE_SCHEMA.names}, schema=SCORE_SCHEMA)
            )
            done += len(scores["id"])
            now = time.perf_counter()
            if now - t_log > 10:
                rate = done / (now - t0)
                log(
                    f"scored {done:,}/{total:,} posts, {rate:,.0f}/s, "
                    f"ETA {(total - done) / rate:.0f}s"
                )
                t_log = now
    return done, time.perf_counter() - t0


@dg.asset(
    group_name="scoring",
    deps=["fitted_params", "feature_matrix", "cleaned_posts"],
    kinds={"jax", "duckdb", "csv"},
    code_version="2",
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    description="`fav_score` for every cleaned post: the model's probability of a favourite "
    "count at or below the observed one, given metadata only (0.5 = as expected), from the "
    "model fitted without the post's cross-fitting fold (no score comes from a model that saw "
    "that post's favourites). Also "
    "`expected_fav_count` (predictive median) and `fav_zscore`. Table `scored_posts` plus "
    "`exports/score-DATE.csv.gz` (every posts column with fav_score appended).",
)
def scored_posts(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, state: StateDir
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    with duckdb.get_connection() as conn:
        dump_date, params_info = read_lineage(conn, "fitted_params")
        _, features = read_lineage(conn, "feature_matrix")
        posts_date, posts = read_lineage(conn, "cleaned_posts")
        if posts_date != dump_date:
            raise dg.Failure(f"params are for {dump_date} but cleaned_posts is from {posts_date}")
        inputs = {
            "fitted_params": params_info["key"],
            "feature_matrix": features["key"],
            "cleaned_posts": posts["key"],
        }
        key = version_key(inputs, code_version(context))
        export = state.exports / f"score-{dump_date}.csv.gz"
        # The export is written after the table's transaction; a run killed in between must
        # not leave a "reused" table with no export.
        if built_from(conn, "scored_posts", key) and export.exists():
            context.log.info("scored_posts is already built from these inputs: reused")
            return reused_result(conn, dump_date, key, inputs, "scored_posts")
    fitted = load_params(Path(params_info["path"]))
    matrix = Path(features["dir"]) / "matrix.parquet"
    tmp_scores = state.sub("tmp") / f"scores-{os.getpid()}.parquet"
    tmp_csv = tmp_scores.with_suffix(".csv")
    export_part = export.with_name("." + export.name + ".part")
    try:
        n_scored, score_s = _write_scores(fitted, matrix, tmp_scores, context.log.info)
        context.log.info(f"scored {n_scored:,} posts in {score_s:.1f}s")
        with duckdb.get_connection() as conn:
            with transaction(conn):
                conn.execute(
                    f"""
                    CREATE OR REPLACE TABLE scored_posts AS
                    SELECT c.id, c.fav_count, s.expected_fav_count, s.fav_score, s.fav_zscore,
                           DATE '{dump_date}' AS dump_date, s.mu AS pred_log_mean,
                           s.sigma AS pred_log_scale, c.rating, c.file_ext, c.created_at,
                           c.is_deleted
                    FROM cleaned_posts c JOIN read_parquet('{tmp_scores}') s USING (id)
                    ORDER BY c.id
                    """
                )
                n_table = conn.execute("SELECT count(*) FROM scored_posts").fetchone()[0]
                n_clean = conn.execute("SELECT count(*) FROM cleaned_posts").fetchone()[0]
                if n_table != n_clean:
                    raise dg.Failure(f"scored {n_table} posts but {n_clean} are cleaned")
                record_lineage(
                    conn,
                    "scored_posts",
                    dump_date,
                    {
                        "key": key,
                        "params": params_info["path"],
                        "rows": int(n_table),
                        "export": str(export),
                    },
                )
            cols = ", ".join(export_column_sql(c) for c in POSTS_COLUMNS)
            t_export = time.perf_counter()
            # DuckDB writes plain CSV on all threads; gzip (single-threaded in DuckDB) is done
            # after, on all cores.
            with query_progress(conn, context.log.info, "writing the CSV export"):
                conn.execute(
                    f"COPY (SELECT {cols}, s.fav_score FROM cleaned_posts c "
                    f"JOIN scored_posts s USING (id) ORDER BY c.id) TO '{tmp_csv}' "
                    "(FORMAT csv, HEADER)"
                )
            context.log.info(f"compressing the export ({tmp_csv.stat().st_size / 1e6:,.0f} MB)")
            gzip_file(tmp_csv, export_part)
            os.replace(export_part, export)
            export_s = time.perf_counter() - t_export
            meta = table_metadata(conn, "scored_posts")
            summary = conn.execute(
                "SELECT avg(fav_score), median(fav_score), corr(fav_score, fav_zscore) "
                "FROM scored_posts"
            ).fetchone()
            sample = conn.execute(
                "SELECT fav_score FROM scored_posts USING SAMPLE 100000 ROWS"
            ).fetchnumpy()["fav_score"]
            preview = {
                order: conn.execute(
                    "SELECT id, fav_count, round(expected_fav_count, 1), round(fav_score, 4) "
                    f"FROM scored_posts ORDER BY fav_score {order}, id LIMIT 10"
                ).fetchall()
                for order in ("DESC", "ASC")
            }
    finally:
        tmp_scores.unlink(missing_ok=True)
        tmp_csv.unlink(missing_ok=True)
        export_part.unlink(missing_ok=True)

    removed = state.prune_dumps(keep_through=dump_date)
    if removed:
        context.log.info(f"removed dumps older than the newest {state.keep_dumps}: {removed}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key),
        metadata={
            **meta,
            **lineage_metadata(dump_date, key, inputs, reused=False),
            "params_path": dg.MetadataValue.path(params_info["path"]),
            "export_path": dg.MetadataValue.path(str(export)),
            "mean_fav_score": float(summary[0]),
            "median_fav_score": float(summary[1]),
            "posts_per_second": round(n_scored / max(score_s, 1e-9), 1),
            "score_seconds": round(score_s, 2),
            "export_seconds": round(export_s, 2),
            "top_posts": dg.MetadataValue.md(preview_md(preview["DESC"])),
            "bottom_posts": dg.MetadataValue.md(preview_md(preview["ASC"])),
            "fav_score_histogram": dg.MetadataValue.md(
                histogram_md(np.asarray(sample), "fav_score", bins=40)
            ),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
