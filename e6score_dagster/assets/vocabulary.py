"""Tags seen in the current posts, with category, frequency and a dense index."""

import time
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster import stage
from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.code_versions import code_version
from e6score_dagster.csv_read import (
    DumpFormatError,
    check_header,
    csv_rejects_count_sql,
    read_csv_sql,
)
from e6score_dagster.resources import StateDir
from e6score_dagster.schema import TAG_CATEGORIES, TAGS_COLUMNS
from e6score_dagster.sql import tag_tokens_sql


class VocabularyConfig(dg.Config):
    min_count: int = 2
    """Tags on fewer posts than this share hashed out-of-vocabulary buckets."""
    max_vocab: int = 1_000_000
    oov_buckets: int = 4096


def _category_names_sql() -> str:
    cases = " ".join(f"WHEN {k} THEN '{v}'" for k, v in TAG_CATEGORIES.items())
    return f"CASE category {cases} ELSE 'unknown' END"


def stage_vocabulary(conn, tags_path: Path, config: VocabularyConfig, table: str) -> dict:
    """Build the vocabulary of the published `cleaned_posts` into the staging `table`."""
    try:
        header = check_header(tags_path, TAGS_COLUMNS)
    except DumpFormatError as exc:
        raise dg.Failure(description=str(exc)) from exc
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE tag_file AS "
        "SELECT trim(name) AS name, any_value(TRY_CAST(category AS INTEGER)) AS category, "
        "any_value(TRY_CAST(post_count AS BIGINT)) AS post_count "
        f"FROM {read_csv_sql(tags_path, header, 'tags_rejects')} GROUP BY 1"
    )
    tags_rejected = conn.execute(csv_rejects_count_sql("tags_rejects")).fetchone()[0]
    conn.execute(
        f"""
        CREATE OR REPLACE TABLE {table} AS
        WITH freq AS (
            SELECT tag AS name, count(*) AS freq
            FROM (SELECT unnest({tag_tokens_sql()}) AS tag FROM cleaned_posts)
            WHERE tag <> '' GROUP BY tag
        ),
        ranked AS (
            SELECT f.name, f.freq, coalesce(t.category, -1) AS category,
                   t.post_count AS dump_post_count,
                   row_number() OVER (ORDER BY f.freq DESC, f.name) AS rank
            FROM freq f LEFT JOIN tag_file t USING (name)
        ),
        dense AS (
            SELECT least({config.max_vocab},
                         count(*) FILTER (WHERE freq >= {config.min_count})) AS n
            FROM ranked
        )
        SELECT name, category, {_category_names_sql()} AS category_name, freq,
               dump_post_count, rank <= dense.n AS in_vocab,
               CAST(CASE WHEN rank <= dense.n THEN rank
                    ELSE dense.n + 1 + hash(name) % {config.oov_buckets} END
                    AS INTEGER) AS tag_index
        FROM ranked, dense
        ORDER BY freq DESC, name
        """
    )
    stats = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE in_vocab), "
        "count(*) FILTER (WHERE category = -1), coalesce(max(tag_index), 0) "
        f"FROM {table}"
    ).fetchone()
    by_category = conn.execute(
        f"SELECT category_name, count(*) FROM {table} GROUP BY 1 ORDER BY 2 DESC"
    ).fetchall()
    top = conn.execute(
        f"SELECT name, category_name, freq FROM {table} ORDER BY freq DESC LIMIT 15"
    ).fetchall()
    top_md = "| tag | category | posts |\n|---|---|---|\n" + "\n".join(
        f"| {n} | {c} | {f} |" for n, c, f in top
    )
    return {
        "tags": int(stats[0]),
        "in_vocab": int(stats[1]),
        "missing_from_tags_file": int(stats[2]),
        "max_index": int(stats[3]),
        "tags_file_rejected_rows": int(tags_rejected),
        "by_category": {c: int(n) for c, n in by_category},
        "most_frequent": top_md,
    }


@dg.asset(
    group_name="features",
    deps=["raw_dump", "cleaned_posts"],
    kinds={"duckdb"},
    code_version=code_version(__name__),
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    description="Every tag used by a current post: category (from the tags export), frequency "
    "and `tag_index`, a dense index (1 = most frequent; 0 is padding). Tags used fewer than "
    "`min_count` times share hashed out-of-vocabulary buckets above the dense range.",
)
def tag_vocabulary(
    context: dg.AssetExecutionContext,
    config: VocabularyConfig,
    duckdb: DuckDBResource,
    state: StateDir,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    with stage.begin(
        context, duckdb, state, inputs=["raw_dump", "cleaned_posts"],
        config=config.model_dump(), tables=["tag_vocabulary"],
    ) as st:
        if st.reuse:
            return st.reused_result()
        with duckdb.get_connection() as conn:
            stats = stage_vocabulary(
                conn, Path(st.inputs["raw_dump"].info["tags"]), config, st.table("tag_vocabulary")
            )
        return st.finish(
            info={k: stats[k] for k in ("tags", "in_vocab", "max_index")},
            metadata={
                "in_vocabulary": dg.MetadataValue.int(stats["in_vocab"]),
                "out_of_vocabulary": dg.MetadataValue.int(stats["tags"] - stats["in_vocab"]),
                "tags_missing_from_tags_file": dg.MetadataValue.int(
                    stats["missing_from_tags_file"]
                ),
                "tags_file_rejected_rows": dg.MetadataValue.int(stats["tags_file_rejected_rows"]),
                "by_category": dg.MetadataValue.json(stats["by_category"]),
                "most_frequent": dg.MetadataValue.md(stats["most_frequent"]),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
