"""Asset checks: the guarantees each stage makes, visible and enforced in Dagster."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster.resources import QualityGates
from e6score_dagster.store import read_lineage


@dg.asset_check(
    asset="cleaned_posts",
    blocking=True,
    description="At most `max_rejected_share` (env E6SCORE_MAX_REJECTED_SHARE, default 1%) of the "
    "dump's rows are rejected; more means the export format changed or the file is damaged, "
    "so nothing downstream should use it.",
)
def rejected_share_within_limit(duckdb: DuckDBResource, gates: QualityGates) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        _, info = read_lineage(conn, "cleaned_posts")
    share = info["rejected"] / max(info["dump_rows"], 1)
    return dg.AssetCheckResult(
        passed=share <= gates.max_rejected_share,
        metadata={
            "rejected_share": share,
            "rejected_rows": info["rejected"],
            "limit": gates.max_rejected_share,
        },
    )


@dg.asset_check(
    asset="cleaned_posts",
    blocking=True,
    description="The post count did not drop by more than `max_post_count_drop` (env "
    "E6SCORE_MAX_POST_COUNT_DROP, default 20%) against the previous dump: a dump cut short "
    "upstream must not replace good scores.",
)
def post_count_not_collapsed(duckdb: DuckDBResource, gates: QualityGates) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        _, info = read_lineage(conn, "cleaned_posts")
    previous = info.get("previous_rows")
    drop = 1 - info["rows"] / previous if previous else 0.0
    return dg.AssetCheckResult(
        passed=drop <= gates.max_post_count_drop,
        metadata={
            "rows": info["rows"],
            "previous_rows": previous or 0,
            "previous_dump_date": info.get("previous_dump_date") or "",
            "drop": drop,
            "limit": gates.max_post_count_drop,
        },
    )


@dg.asset_check(
    asset="scored_posts",
    blocking=True,
    description="One score per cleaned post, ids unique, fav_score in [0, 1], no missing value.",
)
def every_post_scored(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    with duckdb.get_connection() as conn:
        row = conn.execute(
            """
            SELECT (SELECT count(*) FROM cleaned_posts),
                   count(*), count(DISTINCT id),
                   count(*) FILTER (WHERE fav_score IS NULL OR fav_score < 0 OR fav_score > 1
                                    OR expected_fav_count IS NULL OR fav_zscore IS NULL
                                    OR isnan(fav_zscore))
            FROM scored_posts
            """
        ).fetchone()
    cleaned, scored, distinct, bad = (int(x) for x in row)
    return dg.AssetCheckResult(
        passed=cleaned == scored == distinct and bad == 0,
        metadata={"cleaned": cleaned, "scored": scored, "distinct_ids": distinct, "invalid": bad},
    )
