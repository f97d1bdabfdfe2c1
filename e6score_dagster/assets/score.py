"""Every cleaned post scored with the current params: the table and the CSV export."""

import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster_duckdb import DuckDBResource

from e6score_dagster import checks, stage
from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.code_versions import code_version
from e6score_dagster.gzip_file import gzip_file
from e6score_dagster.memory import release_memory
from e6score_dagster.model import (
    ParquetBatches,
    load_params,
    score_batches,
    use_compilation_cache,
)
from e6score_dagster.plots import histogram_md
from e6score_dagster.report import comparison_table_md, run_summary_lines
from e6score_dagster.resources import DB_FILE, StateDir
from e6score_dagster.schema import POSTS_ALL_COLUMNS
from e6score_dagster.sql import ident
from e6score_dagster.store import memory_limit, query_progress

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
TIMESTAMP_COLUMNS = {"created_at", "updated_at", "last_noted_at", "last_commented_at"}
# Every posts column of e621's current export (old dumps: the three new ones are empty).
EXPORT_COLUMNS = POSTS_ALL_COLUMNS
# The exports stream (a positional join written out; one sort of the scores for the Parquet
# file), so DuckDB's cache of the tables they read is held to this while they run: at 6M posts
# the process's peak was the CSV export, DuckDB at its whole limit on top of what the fit left.
EXPORT_MEMORY_LIMIT = "1GB"


def export_column_sql(col: str) -> str:
    """Back to the export's own spelling: t/f booleans, microsecond timestamps."""
    q = ident(col)
    if col in BOOLEAN_COLUMNS:
        return f"CASE c.{q} WHEN true THEN 't' WHEN false THEN 'f' END AS {q}"
    if col in TIMESTAMP_COLUMNS:
        return f"strftime(c.{q}, '%Y-%m-%d %H:%M:%S.%f') AS {q}"
    return f"c.{q}"


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


def stage_scores(conn, scores: Path, table: str, dump_date: str) -> None:
    """The scores joined to the published posts, into the staging `table`, in the posts'
    own order (the dump's), so the export pairs the two tables row by row without a sort."""
    conn.execute(
        f"""
        CREATE OR REPLACE TABLE {table} AS
        SELECT c.id, c.fav_count, s.expected_fav_count, s.fav_score, s.fav_zscore,
               DATE '{dump_date}' AS dump_date, s.mu AS pred_log_mean,
               s.sigma AS pred_log_scale, c.rating, c.file_ext, c.created_at,
               c.is_deleted
        FROM cleaned_posts c JOIN read_parquet('{scores}') s USING (id)
        ORDER BY c.rowid
        """
    )


def write_csv_export(conn, table: str, tmp_csv: Path, out: Path, log) -> None:
    """Every original posts column plus fav_score, gzip-compressed to `out`, in the dump's
    own row order. The scores are stored in the posts' order, so the two tables are read
    side by side (a positional join streams; sorting the posts' text by id took about 1 GB
    and 40% of the export's time at 1M posts)."""
    cols = ", ".join(export_column_sql(c) for c in EXPORT_COLUMNS)
    side_by_side = f"cleaned_posts c POSITIONAL JOIN {table} s"
    misaligned = conn.execute(
        f"SELECT count(*) FROM {side_by_side} WHERE c.id IS DISTINCT FROM s.id"
    ).fetchone()[0]
    source = side_by_side if misaligned == 0 else (
        f"cleaned_posts c JOIN {table} s USING (id) ORDER BY c.rowid"
    )
    # DuckDB writes plain CSV on all threads; gzip (single-threaded in DuckDB) is done after,
    # on all cores.
    with query_progress(conn, log, "writing the CSV export"):
        conn.execute(
            f"COPY (SELECT {cols}, s.fav_score FROM {source}) TO '{tmp_csv}' (FORMAT csv, HEADER)"
        )
    log(f"compressing the export ({tmp_csv.stat().st_size / 1e6:,.0f} MB)")
    gzip_file(tmp_csv, out)
    tmp_csv.unlink()


def write_parquet_export(conn, table: str, out: Path) -> None:
    """The scores as typed Parquet (the table's own columns and types), for people who load
    them into dataframes rather than parse a GB of CSV."""
    conn.execute(
        f"COPY (SELECT * FROM {table} ORDER BY id) TO '{out}' (FORMAT parquet, COMPRESSION zstd)"
    )


def _log_run_summary(log, state: StateDir, dump_date: str, posts: int) -> None:
    """The last lines of a headless run: what was made, where, and what to try next."""
    lines = run_summary_lines(
        dump_date,
        posts,
        str(state.root / DB_FILE),
        str(state.exports / f"score-{dump_date}.csv.gz"),
        str(state.exports / f"score-{dump_date}.parquet"),
    )
    log("\n".join(lines))


def model_comparison(params_info: dict) -> dict:
    """The comparison table of the params these scores come from, so scored_posts also leads
    with what the model is worth."""
    table, chosen = params_info.get("table"), params_info.get("chosen_candidate")
    if not table or not chosen:
        return {}
    return {"model_comparison": dg.MetadataValue.md(comparison_table_md(table, chosen))}


def score_summary(conn, table: str) -> dict:
    summary = conn.execute(
        f"SELECT avg(fav_score), median(fav_score), corr(fav_score, fav_zscore) FROM {table}"
    ).fetchone()
    sample = conn.execute(
        f"SELECT fav_score FROM {table} USING SAMPLE 100000 ROWS"
    ).fetchnumpy()["fav_score"]
    preview = {
        order: conn.execute(
            "SELECT id, fav_count, round(expected_fav_count, 1), round(fav_score, 4) "
            f"FROM {table} ORDER BY fav_score {order}, id LIMIT 10"
        ).fetchall()
        for order in ("DESC", "ASC")
    }
    return {
        "mean_fav_score": float(summary[0]),
        "median_fav_score": float(summary[1]),
        "top_posts": dg.MetadataValue.md(preview_md(preview["DESC"])),
        "bottom_posts": dg.MetadataValue.md(preview_md(preview["ASC"])),
        "fav_score_histogram": dg.MetadataValue.md(
            histogram_md(np.asarray(sample), "fav_score", bins=40)
        ),
    }


@dg.asset(
    group_name="scoring",
    deps=["fitted_params", "feature_matrix", "cleaned_posts"],
    kinds={"jax", "duckdb", "csv"},
    code_version=code_version(__name__),
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    check_specs=[checks.EVERY_POST_SCORED],
    description="`fav_score` for every cleaned post: the model's probability that a post "
    "with the same metadata gets fewer favourites (ties counted half; 0.5 = as expected), from the "
    "model fitted without the post's cross-fitting fold (no score comes from a model that saw "
    "that post's favourites). Also "
    "`expected_fav_count` (predictive median) and `fav_zscore`. Table `scored_posts` plus "
    "`exports/score-DATE.csv.gz` (every posts column with fav_score appended).",
)
def scored_posts(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource, state: StateDir
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    for legacy in state.sub("tmp").glob("scores-*.*"):  # left by killed runs of older versions
        legacy.unlink(missing_ok=True)
    with stage.begin(
        context, duckdb, state, inputs=["fitted_params", "feature_matrix", "cleaned_posts"],
        tables=["scored_posts"], folder=state.exports,
    ) as st:
        export = state.exports / f"score-{st.dump_date}.csv.gz"
        parquet_export = export.with_name(f"score-{st.dump_date}.parquet")
        if st.reuse:
            _log_run_summary(context.log.info, state, st.dump_date, st.reuse.info.get("rows", 0))
            return st.reused_result(
                **model_comparison(st.inputs["fitted_params"].info),
                export_path=dg.MetadataValue.path(str(export)),
                parquet_export_path=dg.MetadataValue.path(str(parquet_export)),
            )
        params = st.inputs["fitted_params"].info["path"]
        use_compilation_cache(state.sub("jax_cache"))
        fitted = load_params(Path(params))
        matrix = Path(st.inputs["feature_matrix"].info["dir"]) / "matrix.parquet"
        scores = st.tmp / "scores.parquet"  # st.tmp is emptied at the start of every build
        try:
            n_scored, score_s = _write_scores(fitted, matrix, scores, context.log.info)
            context.log.info(f"scored {n_scored:,} posts in {score_s:.1f}s")
            release_memory()  # the scoring's buffers, before DuckDB's join and sort
            table = st.table("scored_posts")
            with duckdb.get_connection() as conn:
                stage_scores(conn, scores, table, st.dump_date)
                check = checks.every_post_scored(conn, table)
                t_export = time.perf_counter()
                if check.passed:  # no export of scores that will not be published
                    configured = duckdb.connection_config["memory_limit"]
                    with memory_limit(conn, EXPORT_MEMORY_LIMIT, restore=configured):
                        write_csv_export(
                            conn, table, st.tmp / "export.csv", st.path(export), context.log.info
                        )
                        write_parquet_export(conn, table, st.path(parquet_export))
                export_s = time.perf_counter() - t_export
                summary = score_summary(conn, table)
        finally:
            shutil.rmtree(st.tmp, ignore_errors=True)
        result = st.finish(
            info={"params": params, "rows": n_scored, "export": str(export)},
            checks=[check],
            metadata={
                **model_comparison(st.inputs["fitted_params"].info),
                "params_path": dg.MetadataValue.path(params),
                "export_path": dg.MetadataValue.path(str(export)),
                "parquet_export_path": dg.MetadataValue.path(str(parquet_export)),
                **summary,
                "posts_per_second": round(n_scored / max(score_s, 1e-9), 1),
                "score_seconds": round(score_s, 2),
                "export_seconds": round(export_s, 2),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        if check.passed:
            _log_run_summary(context.log.info, state, st.dump_date, n_scored)
        return result
