"""Model inputs as one pre-shuffled Parquet file, built entirely in DuckDB."""

import json
import math
import time
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster import stage
from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.code_versions import code_version
from e6score_dagster.model.data import FeatureLayout
from e6score_dagster.model.network import CATEGORY_CODES, UPLOADER_CATEGORY
from e6score_dagster.resources import StateDir
from e6score_dagster.schema import SITE_LAUNCH, column_description
from e6score_dagster.sql import tag_tokens_sql
from e6score_dagster.store import query_progress

FILE_EXTS = ("jpg", "png", "gif", "webp", "webm", "mp4", "swf")  # index 0 is "other"
RATING_INDEX = "CASE c.rating WHEN 's' THEN 0 WHEN 'q' THEN 1 ELSE 2 END"

AGE_DAYS_SQL = (
    "least(greatest(epoch(TIMESTAMP '{dump_date}' - c.created_at) / 86400, 0), 20000)"
)
# Log age in days with a floor of a quarter hour: the log resolves hours for fresh posts.
LOG_AGE_SQL = f"ln({AGE_DAYS_SQL} + 0.01)"
# Knots of a piecewise-linear function of log age: recency matters most in the first hours,
# days and weeks (a post keeps collecting favourites), so the knots are dense there.
AGE_KNOTS_DAYS = (0.25, 1, 3, 7, 14, 30, 90, 365, 1460)


def age_basis_sql() -> dict[str, str]:
    """One ramp per knot, max(0, log(knot) - log age): with the linear term in log age, any
    continuous function of log age that is linear between knots is a weighted sum of them.
    Younger than the first knot the shape continues the learned slope, so the few posts under
    a day old borrow strength from those a few days old."""
    return {
        f"age_under_{round(d * 24)}h": f"greatest(0, {math.log(d + 0.01)!r} - {LOG_AGE_SQL})"
        for d in AGE_KNOTS_DAYS
    }


# Numeric metadata, each a SQL expression over cleaned_posts `c`, tag counts `a` and uploader
# counts `u`. Outcome columns (fav_count, score, up/down_score, comment_count) are deliberately
# absent: they are engagement, not metadata, and would explain away the signal fav_score is
# meant to expose (a test permutes them and checks no input column changes).
NUMERIC_FEATURES: dict[str, str] = {
    "t_upload_years": "least(greatest(epoch(c.created_at - TIMESTAMP '{launch}') "
    "/ (365.25 * 86400), 0), 40)",
    "log_age_days": f"ln(1 + {AGE_DAYS_SQL})",
    "log_age": LOG_AGE_SQL,
    **age_basis_sql(),
    "log_tag_count": "ln(1 + coalesce(a.n_tags, 0))",
    "log_artist_tags": "ln(1 + coalesce(a.n_artist, 0))",
    "log_character_tags": "ln(1 + coalesce(a.n_character, 0))",
    "log_species_tags": "ln(1 + coalesce(a.n_species, 0))",
    "log_copyright_tags": "ln(1 + coalesce(a.n_copyright, 0))",
    "log_pixels": "ln(1 + least(greatest(coalesce(c.image_width, 0), 0)::DOUBLE "
    "* greatest(coalesce(c.image_height, 0), 0), 1e12))",
    "log_aspect": "CASE WHEN c.image_width > 0 AND c.image_height > 0 THEN "
    "least(greatest(ln(c.image_width / c.image_height), -4), 4) ELSE 0 END",
    "log_file_size": "ln(1 + least(greatest(coalesce(c.file_size, 0), 0), 1e12))",
    "log_duration": "ln(1 + least(greatest(coalesce(c.duration, 0), 0), 1e6))",
    "has_source": "CASE WHEN length(trim(coalesce(c.source, ''))) > 0 THEN 1 ELSE 0 END",
    "has_parent": "CASE WHEN c.parent_id IS NULL THEN 0 ELSE 1 END",
    "log_description_len": "ln(1 + length(coalesce(c.description, '')))",
    # Site activity in the upload month: a measured proxy of the audience a post met.
    "log_monthly_uploads": "ln(1 + coalesce(m.uploads, 0))",
    # How active the uploader is (target-free); their own effect enters as a pseudo-tag.
    "log_uploader_posts": "ln(1 + coalesce(u.n_posts, 0))",
}
# Normalised numeric inputs are divided by at least this: a rare indicator (e.g. the basis
# function of posts under a day old) must not become a huge input.
MIN_NUMERIC_STD = 0.25


class FeatureConfig(dg.Config):
    max_tags: int = 96
    """Tags kept per post (non-general categories first, then the most frequent). One post in
    20 has more than 64 and one in 90 more than 96; the rare general tags a cap drops carry
    effects of their own (64 -> 96 at 100k posts: 0.009 nats of hold-out NLL in heavy_tails;
    128 gained 0.001 more, for 4% more wall time and 0.23 GB more peak memory at 1M)."""
    holdout_fraction: float = 0.1
    """Share of posts, chosen by a hash of the id (stable across dumps), never trained on."""
    dense_min_count: int = 5
    """Tags on at least this many posts get their own additive effect; rarer ones share
    hashed rows. The number of dense effects thus grows with the vocabulary. 5, not 10: a
    hashed row mixes many tags' effects, and a shrunk effect of its own is better even on 5
    posts (1M posts, classic: hold-out NLL 1.447 -> 1.439; at 100k in heavy_tails 3 gained
    nothing over 5)."""
    uploader_min_posts: int = 2
    """Uploaders with at least this many posts get a (shrunk) effect of their own."""
    row_group_size: int = 65536


# Each tag slot holds the vocabulary index (1 = most frequent tag) with the category in its
# low 4 bits, so the model knows both a tag's rarity and its kind without a second column.
TAG_CODE_SQL = (
    f"tag_index * {CATEGORY_CODES} + least(greatest(category + 1, 0), {CATEGORY_CODES - 1})"
)
# A post's tags in slot order (non-general categories first, then the most frequent, then by
# index) as one integer per tag that sorts in that order and carries the code in its low 31
# bits: `list_sort` of plain integers then sorts them, where an ordered `list(... ORDER BY
# ...)` aggregate cost DuckDB three times as much (issue 14).
_MAX31 = 2**31 - 1
TAG_SLOT_KEY_SQL = (
    f"((category = 0)::BIGINT << 62) | (({_MAX31} - least(freq, {_MAX31}))::BIGINT << 31) "
    f"| ({TAG_CODE_SQL})::BIGINT"
)
TAG_LIST_SQL = (
    f"list_transform(list_sort(list({TAG_SLOT_KEY_SQL})), lambda k: (k & {_MAX31})::INTEGER)"
)


# The uploader as the first "tag": their rank by post count, with the uploader category code.
UPLOADER_CODE_SQL = f"CAST(u.rank * {CATEGORY_CODES} + {UPLOADER_CATEGORY} AS INTEGER)"


def holdout_sql(fraction: float, id_col: str = "c.id") -> str:
    """Knuth multiplicative hash of the id: the same post is held out in every dump."""
    return f"(({id_col}::HUGEINT * 2654435761) % 4294967296) < {fraction} * 4294967296"


def _ext_sql() -> str:
    cases = " ".join(f"WHEN '{e}' THEN {i + 1}" for i, e in enumerate(FILE_EXTS))
    return f"CASE c.file_ext {cases} ELSE 0 END"


def feature_sql(dump_date: str, config: FeatureConfig) -> str:
    numeric = ",\n".join(
        f"CAST({expr.format(launch=SITE_LAUNCH, dump_date=dump_date)} AS FLOAT) AS {name}"
        for name, expr in NUMERIC_FEATURES.items()
    )
    return f"""
    WITH pt AS (
        SELECT p.id, v.tag_index, v.category, v.freq
        FROM (SELECT id, unnest({tag_tokens_sql()}) AS name FROM cleaned_posts) p
        JOIN tag_vocabulary v USING (name)
    ),
    a AS (
        SELECT id,
               {TAG_LIST_SQL} AS tag_list,
               count(*) AS n_tags,
               count(*) FILTER (WHERE category = 1) AS n_artist,
               count(*) FILTER (WHERE category = 4) AS n_character,
               count(*) FILTER (WHERE category = 5) AS n_species,
               count(*) FILTER (WHERE category = 3) AS n_copyright
        FROM pt GROUP BY id
    ),
    m AS (
        SELECT date_trunc('month', created_at) AS month, count(*) AS uploads
        FROM cleaned_posts GROUP BY 1
    ),
    u AS (
        SELECT uploader_id, count(*) AS n_posts,
               row_number() OVER (ORDER BY count(*) DESC, uploader_id) AS rank
        FROM cleaned_posts WHERE uploader_id IS NOT NULL GROUP BY 1
    )
    SELECT c.id, c.fav_count, CAST(ln(1 + c.fav_count) AS FLOAT) AS y,
           CAST(list_resize(
               CASE WHEN u.n_posts >= {config.uploader_min_posts}
                    THEN list_prepend({UPLOADER_CODE_SQL}, coalesce(a.tag_list, []))
                    ELSE coalesce(a.tag_list, []) END,
               {config.max_tags}, 0) AS INTEGER[]) AS tags,
           CAST({RATING_INDEX} AS TINYINT) AS rating_idx,
           CAST({_ext_sql()} AS TINYINT) AS ext_idx,
           {numeric},
           {holdout_sql(config.holdout_fraction)} AS holdout,
           NOT coalesce(c.is_deleted, false) AS trainable
    FROM cleaned_posts c LEFT JOIN a USING (id)
    LEFT JOIN m ON m.month = date_trunc('month', c.created_at)
    LEFT JOIN u ON u.uploader_id = c.uploader_id
    ORDER BY hash(c.id), c.id
    """


def _layout(conn, matrix: Path, config: FeatureConfig, vocabulary_key: str) -> FeatureLayout:
    """Normalisation statistics from the training rows only; how many tags have dense
    effects (vocabulary indices below `dense_tags`; 0 is padding)."""
    names = list(NUMERIC_FEATURES)
    aggs = ", ".join(f"avg({n}), stddev_pop({n})" for n in names)
    row = conn.execute(
        f"SELECT avg(y), stddev_pop(y), count(*), {aggs} FROM read_parquet('{matrix}') "
        "WHERE trainable AND NOT holdout"
    ).fetchone()
    if not row[2]:
        raise dg.Failure("no trainable posts outside the hold-out set")
    means = [float(row[3 + 2 * i] or 0.0) for i in range(len(names))]
    stds = [max(float(row[4 + 2 * i] or 0.0), MIN_NUMERIC_STD) for i in range(len(names))]
    n_dense = conn.execute(
        "SELECT count(*) FROM tag_vocabulary WHERE in_vocab AND freq >= ?",
        [config.dense_min_count],
    ).fetchone()[0]
    return FeatureLayout(
        numeric=tuple(names),
        max_tags=config.max_tags,
        n_ext=len(FILE_EXTS) + 1,
        n_rating=3,
        y_mean=float(row[0]),
        y_std=float(row[1] or 1.0) or 1.0,
        numeric_mean=tuple(means),
        numeric_std=tuple(stds),
        extra={
            "holdout_fraction": config.holdout_fraction,
            "tag_code": TAG_CODE_SQL,
            "vocabulary": vocabulary_key,
            "dense_tags": int(n_dense) + 1 if n_dense else 0,
        },
    )


def stage_features(
    conn, folder: Path, dump_date: str, config: FeatureConfig, vocabulary: str, log
) -> dict:
    """Write matrix.parquet and layout.json of the published posts and vocabulary to `folder`."""
    folder.mkdir(parents=True)
    matrix = folder / "matrix.parquet"
    with query_progress(conn, log, "building features"):
        conn.execute(
            f"COPY ({feature_sql(dump_date, config)}) TO '{matrix}' "
            f"(FORMAT parquet, ROW_GROUP_SIZE {config.row_group_size}, COMPRESSION zstd)"
        )
    layout = _layout(conn, matrix, config, vocabulary)
    (folder / "layout.json").write_text(json.dumps(layout.to_dict(), indent=1))
    counts = conn.execute(
        f"SELECT count(*), count(*) FILTER (WHERE holdout), "
        f"count(*) FILTER (WHERE trainable AND NOT holdout) FROM read_parquet('{matrix}')"
    ).fetchone()
    schema = conn.execute(f"DESCRIBE SELECT * FROM read_parquet('{matrix}')").fetchall()
    return {
        "rows": int(counts[0]),
        "holdout_rows": int(counts[1]),
        "training_rows": int(counts[2]),
        "schema": [(r[0], r[1]) for r in schema],
        "bytes": matrix.stat().st_size,
    }


@dg.asset(
    group_name="features",
    deps=["cleaned_posts", "tag_vocabulary"],
    kinds={"duckdb", "parquet"},
    code_version=code_version(__name__),
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    description="One row per cleaned post: id, log1p(fav_count), a fixed-width tag-code list "
    "(the uploader first, then the tags), rating, file type, numeric metadata (upload time, "
    "age at the dump with a flexible basis, sizes, tag counts by category, uploader activity) "
    "and the hash-based hold-out flag. No outcome column is an input. Parquet, pre-shuffled, "
    "in row groups.",
)
def feature_matrix(
    context: dg.AssetExecutionContext,
    config: FeatureConfig,
    duckdb: DuckDBResource,
    state: StateDir,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    # Only the matrix in use is kept: older ones are rebuilt from their tables if ever needed.
    with stage.begin(
        context, duckdb, state, inputs=["cleaned_posts", "tag_vocabulary"],
        config=config.model_dump(), folder=state.features, keep=1,
    ) as st:
        final_dir = state.features / f"features-{st.version}"
        if st.reuse:
            return st.reused_result(path=dg.MetadataValue.path(str(final_dir / "matrix.parquet")))
        with duckdb.get_connection() as conn:
            out = stage_features(
                conn, st.path(final_dir), st.dump_date, config,
                st.inputs["tag_vocabulary"].version, context.log.info,
            )
        return st.finish(
            info={"dir": str(final_dir), "rows": out["rows"]},
            metadata={
                "dagster/row_count": dg.MetadataValue.int(out["rows"]),
                "dagster/column_schema": dg.TableSchema(
                    columns=[
                        dg.TableColumn(n, t, description=column_description("feature_matrix", n))
                        for n, t in out["schema"]
                    ]
                ),
                "holdout_rows": dg.MetadataValue.int(out["holdout_rows"]),
                "training_rows": dg.MetadataValue.int(out["training_rows"]),
                "numeric_features": dg.MetadataValue.json(list(NUMERIC_FEATURES)),
                "path": dg.MetadataValue.path(str(final_dir / "matrix.parquet")),
                "bytes": dg.MetadataValue.int(out["bytes"]),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
