"""tag_vocabulary and feature_matrix on a small hand-made dump."""

from __future__ import annotations

import json
import math

import duckdb
import pyarrow.parquet as pq
import pytest

from e6score_dagster.assets.clean import cleaned_posts
from e6score_dagster.assets.features import (
    AGE_KNOTS_DAYS,
    FILE_EXTS,
    NUMERIC_FEATURES,
    FeatureConfig,
    feature_sql,
    holdout_sql,
)
from e6score_dagster.assets.ingest import raw_dump
from e6score_dagster.assets.vocabulary import tag_vocabulary
from e6score_dagster.definitions import PIPELINE
from e6score_dagster.model.network import CATEGORY_CODES, UPLOADER_CATEGORY
from e6score_dagster_tests.conftest import DUMP_DATE, materialize, post_row, write_dump

SLOTS = FeatureConfig().max_tags  # 96: post 5's 120 tags overflow it

DATE = "2024-06-30"
TAGS = [["1", "fox", "5", "2"], ["2", "wolf", "5", "2"], ["3", "someartist", "1", "2"],
        ["4", "solo", "0", "3"], ["5", "unused", "0", "0"]]


@pytest.fixture()
def built(tmp_path):
    tags_60 = " ".join(f"t{i:02d}" for i in range(60))
    rows = [
        post_row(id="1", tag_string="fox solo someartist", created_at="2024-06-29 00:00:00.000000"),
        post_row(id="2", tag_string="wolf solo someartist rare_tag", rating="q", file_ext="webm",
                 duration="30.0", created_at="2014-06-30 00:00:00.000000"),
        post_row(id="3", tag_string="fox wolf solo", is_deleted="t", rating="e"),
        post_row(id="4", tag_string="", file_ext="xyz", image_width="", image_height=""),
        post_row(id="5", tag_string=tags_60 + " " + tags_60.replace("t", "u")),
        post_row(id="6", created_at="2099-01-01 00:00:00.000000", fav_count="1000000"),
    ]
    home = tmp_path / "home"
    folder = write_dump(tmp_path / "src", DATE, rows, TAGS)
    assets = [raw_dump, cleaned_posts, tag_vocabulary, PIPELINE[3]]
    assert materialize(home, folder, select=assets).success
    conn = duckdb.connect(str(home / "e6score.duckdb"), read_only=True)
    matrix_dir = json.loads(conn.execute(
        "SELECT info FROM e6score_lineage WHERE asset = 'feature_matrix'").fetchone()[0])["dir"]
    yield conn, pq.read_table(f"{matrix_dir}/matrix.parquet").to_pandas().set_index("id")
    conn.close()


def test_vocabulary_has_category_frequency_and_dense_index(built):
    conn, _ = built
    vocab = {r[0]: r[1:] for r in conn.execute(
        "SELECT name, category_name, freq, in_vocab, tag_index FROM tag_vocabulary").fetchall()}
    assert vocab["solo"][:3] == ("general", 4, True)  # posts 1, 2, 3 and 6
    assert vocab["someartist"][:2] == ("artist", 2)
    assert vocab["solo"][3] == 1  # most frequent tag gets index 1; 0 is padding
    assert vocab["rare_tag"][1:3] == (1, False) and vocab["rare_tag"][0] == "unknown"
    dense = sorted(v[3] for v in vocab.values() if v[2])
    assert dense == list(range(1, len(dense) + 1))
    assert all(v[3] > len(dense) for v in vocab.values() if not v[2])
    assert "unused" not in vocab


def test_feature_matrix_rows_tags_and_flags(built):
    _, m = built
    assert sorted(m.index) == [1, 2, 3, 4, 5, 6]
    assert {len(t) for t in m["tags"]} == {SLOTS}
    # Every post shares uploader 10 (rank 1): the uploader code comes first, then the tags.
    uploader = 1 * CATEGORY_CODES + UPLOADER_CATEGORY
    assert {t[0] for t in m["tags"]} == {uploader}
    assert list(m.loc[4, "tags"]) == [uploader] + [0] * (SLOTS - 1)  # no tags: padding
    assert (m.loc[5, "tags"] > 0).all()  # 120 tags truncated to SLOTS
    assert m.loc[3, "trainable"] == False  # noqa: E712  deleted posts are scored, not trained on
    assert m.loc[2, "rating_idx"] == 1 and m.loc[3, "rating_idx"] == 2
    assert m.loc[4, "ext_idx"] == 0 and m.loc[2, "ext_idx"] == FILE_EXTS.index("webm") + 1
    # Age is measured against the dump date; a future upload has age 0, not a negative one.
    assert m.loc[1, "log_age_days"] == pytest.approx(0.6931, abs=1e-3)
    assert m.loc[6, "log_age_days"] == 0.0
    assert m.loc[2, "t_upload_years"] == pytest.approx(7.39, abs=0.01)
    assert m[list(NUMERIC_FEATURES)].notna().all().all()
    assert m.loc[6, "y"] == pytest.approx(13.8155, abs=1e-3)


def test_tag_slots_put_identity_tags_then_frequent_ones_first(built):
    conn, m = built
    name_of = dict(conn.execute("SELECT tag_index, name FROM tag_vocabulary").fetchall())
    slots = [name_of[c // CATEGORY_CODES] for c in m.loc[2, "tags"][1:] if c]
    # Non-general first (artist and species tie on frequency: then by index; the unknown
    # category counts as non-general), each group by frequency; then the general tags.
    assert slots == ["someartist", "wolf", "rare_tag", "solo"]
    # Post 5's 120 general tags: SLOTS - 1 slots after the uploader, the most frequent kept.
    kept = [name_of[c // CATEGORY_CODES] for c in m.loc[5, "tags"][1:]]
    assert len(kept) == SLOTS - 1 and set(kept) <= {f"t{i:02d}" for i in range(60)} | {
        f"u{i:02d}" for i in range(60)}
    assert m.loc[5, "log_tag_count"] == pytest.approx(math.log(121), abs=1e-5)
    assert m.loc[4, "log_tag_count"] == 0.0
    assert m.loc[2, "log_tag_count"] == pytest.approx(math.log(5), abs=1e-5)


def test_holdout_depends_on_id_only(built):
    conn, m = built
    ids = list(range(1, 20001))
    flags = conn.execute(
        f"SELECT i, {holdout_sql(0.1, 'i')} FROM range(1, 20001) t(i) ORDER BY i").fetchall()
    share = sum(f for _, f in flags) / len(ids)
    assert 0.09 < share < 0.11
    by_id = dict(flags)
    for i in m.index:
        assert bool(m.loc[i, "holdout"]) == by_id[i]


def test_monthly_uploads_measure_site_activity(built):
    _, m = built
    # Posts 3, 4 and 5 share the default upload month (2019-03); post 1 is alone in its month.
    assert m.loc[3, "log_monthly_uploads"] == pytest.approx(math.log(1 + 3), abs=1e-5)
    assert m.loc[1, "log_monthly_uploads"] == pytest.approx(math.log(2), abs=1e-5)


def test_age_basis_ramps_down_to_the_knots(built):
    _, m = built
    # Post 1 was uploaded a day before the dump: log age ln(1.01); post 2 ten years before.
    assert m.loc[1, "log_age"] == pytest.approx(math.log(1.01), abs=1e-4)
    assert m.loc[1, "age_under_72h"] == pytest.approx(math.log(3.01 / 1.01), abs=1e-4)
    assert m.loc[1, "age_under_6h"] == 0.0 and m.loc[1, "age_under_24h"] == 0.0
    assert all(m.loc[2, f"age_under_{round(d * 24)}h"] == 0.0 for d in AGE_KNOTS_DAYS)
    # From the future: age 0, the floor of the log.
    assert m.loc[6, "age_under_24h"] == pytest.approx(math.log(1.01 / 0.01), abs=1e-4)


def test_no_outcome_column_reaches_the_inputs(generated_dump, tmp_path):
    """Permuting every outcome column of cleaned_posts leaves every input column of the
    feature matrix unchanged (only fav_count and its log, the target, move)."""
    home = tmp_path / "home"
    assert materialize(home, generated_dump, select=PIPELINE[:4]).success
    outcomes = ["fav_count", "score", "up_score", "down_score", "comment_count"]
    config = FeatureConfig()
    with duckdb.connect(str(home / "e6score.duckdb")) as conn:
        def matrix():
            return conn.execute(feature_sql(DUMP_DATE, config)).df().set_index("id").sort_index()

        before = matrix()
        conn.execute(
            "CREATE TEMP TABLE shuffled AS SELECT c.id, "
            + ", ".join(f"o.{c} AS {c}" for c in outcomes)
            + " FROM (SELECT id, row_number() OVER (ORDER BY id) AS r FROM cleaned_posts) c "
            "JOIN (SELECT *, row_number() OVER (ORDER BY hash(id * 7919)) AS r "
            "FROM cleaned_posts) o USING (r)"
        )
        conn.execute(
            "UPDATE cleaned_posts SET "
            + ", ".join(f"{c} = s.{c}" for c in outcomes)
            + " FROM shuffled s WHERE cleaned_posts.id = s.id"
        )
        after = matrix()
    assert (before["fav_count"] != after["fav_count"]).mean() > 0.5  # really permuted
    inputs = [c for c in before.columns if c not in ("fav_count", "y")]
    assert "tags" in inputs and "log_uploader_posts" in inputs and len(inputs) > 20
    for col in inputs:
        assert before[col].astype(str).equals(after[col].astype(str)), col
