"""Blocking checks: judged on a stage's staged output, before it is published.

Each check is declared on its asset (`check_specs`) and computed inside the asset's step on
what the step just staged; only when all pass is the output published (see `stage.py`). So a
rejected dump never reaches `cleaned_posts`, and scores with a gap never replace good ones.
"""

from __future__ import annotations

import dagster as dg
import duckdb

from e6score_dagster.resources import QualityGates
from e6score_dagster.store import Build

REJECTED_SHARE = dg.AssetCheckSpec(
    "rejected_share_within_limit",
    asset="cleaned_posts",
    blocking=True,
    description="At most `max_rejected_share` (env E6SCORE_MAX_REJECTED_SHARE, default 1%) of "
    "the dump's rows are rejected; more means the export format changed or the file is "
    "damaged, so the dump is not published and nothing downstream uses it.",
)
POST_COUNT = dg.AssetCheckSpec(
    "post_count_not_collapsed",
    asset="cleaned_posts",
    blocking=True,
    description="The post count did not drop by more than `max_post_count_drop` (env "
    "E6SCORE_MAX_POST_COUNT_DROP, default 20%) against the last accepted dump: a dump cut "
    "short upstream must not replace good scores.",
)
EVERY_POST_SCORED = dg.AssetCheckSpec(
    "every_post_scored",
    asset="scored_posts",
    blocking=True,
    description="One score per cleaned post, ids unique, fav_score in [0, 1], no missing "
    "value; judged on the staged scores before they replace the published ones.",
)


def rejected_share_within_limit(
    n_clean: int, n_rejected: int, gates: QualityGates
) -> dg.AssetCheckResult:
    share = n_rejected / max(n_clean + n_rejected, 1)
    return dg.AssetCheckResult(
        check_name=REJECTED_SHARE.name,
        passed=share <= gates.max_rejected_share,
        metadata={
            "rejected_share": share,
            "rejected_rows": n_rejected,
            "limit": gates.max_rejected_share,
        },
    )


def post_count_not_collapsed(
    rows: int, accepted: Build | None, gates: QualityGates
) -> dg.AssetCheckResult:
    """Compared with the last *accepted* build: a blocked dump is no baseline for the next."""
    previous = int(accepted.info.get("rows", 0)) if accepted else 0
    drop = 1 - rows / previous if previous else 0.0
    return dg.AssetCheckResult(
        check_name=POST_COUNT.name,
        passed=drop <= gates.max_post_count_drop,
        metadata={
            "rows": rows,
            "previous_rows": previous,
            "previous_dump_date": (accepted.dump_date if accepted else None) or "",
            "previous_version": accepted.version if accepted else "",
            "drop": drop,
            "limit": gates.max_post_count_drop,
        },
    )


def every_post_scored(
    conn: duckdb.DuckDBPyConnection, scores: str, posts: str = "cleaned_posts"
) -> dg.AssetCheckResult:
    row = conn.execute(
        f"""
        SELECT (SELECT count(*) FROM "{posts}"),
               count(*), count(DISTINCT id),
               count(*) FILTER (WHERE fav_score IS NULL OR fav_score < 0 OR fav_score > 1
                                OR expected_fav_count IS NULL OR fav_zscore IS NULL
                                OR isnan(fav_zscore)),
               (SELECT count(*) FROM "{posts}" WHERE id NOT IN (SELECT id FROM "{scores}"))
        FROM "{scores}"
        """
    ).fetchone()
    cleaned, scored, distinct, bad, missing = (int(x) for x in row)
    return dg.AssetCheckResult(
        check_name=EVERY_POST_SCORED.name,
        passed=cleaned == scored == distinct and bad == 0 and missing == 0,
        metadata={
            "cleaned": cleaned,
            "scored": scored,
            "distinct_ids": distinct,
            "invalid": bad,
            "unscored": missing,
        },
    )
