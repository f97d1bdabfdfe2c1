"""cleaned_posts on a hand-made dump with every quirk of the real export."""

from __future__ import annotations

import gzip

import duckdb
import pytest

from e6score_dagster.assets.clean import cleaned_posts
from e6score_dagster.assets.ingest import raw_dump
from e6score_dagster.resources import QualityGates
from e6score_dagster.schema import POSTS_COLUMNS
from e6score_dagster.sql import tag_tokens_sql
from e6score_dagster_tests.conftest import materialize, post_row, write_dump

DATE = "2025-01-02"
# A post's distinct, non-empty tags, split as the bulk readers split `tag_string`.
_TOKENS = tag_tokens_sql("coalesce(tag_string, '')")
POST_TAGS = f"list_distinct(list_filter({_TOKENS}, lambda t: t <> ''))"
TAGS = [["1", "fox", "5", "3"], ["2", "solo", "0", "2"], ["3", "artist_x", "1", "1"]]

DESCRIPTION = 'Line one, with "quotes"\nline two ✓ 日本語 émoji 🦊\n\n"quoted start'


@pytest.fixture()
def quirky(tmp_path):
    rows = [
        post_row(id="1", description=DESCRIPTION, source="https://a.example/x\nhttps://b.example/y"),
        post_row(id="2", created_at="2020-01-01 00:00:00", tag_string="", is_deleted="t",
                 rating="e", fav_count="0", duration="12.5", parent_id="1"),
        post_row(id="3", fav_count="abc"),
        post_row(id="4", fav_count="-2"),
        post_row(id="5", created_at="yesterday"),
        post_row(id="6", rating="x"),
        post_row(id="7", change_seq="1", tag_string="fox"),
        post_row(id="7", change_seq="9", tag_string="solo fox  artist_x "),
        post_row(id="x9"),
        post_row(id="10", image_width="", file_size="", comment_count="", approver_id="",
                 up_score="", is_flagged=""),
    ]
    folder = write_dump(tmp_path / "src", DATE, rows, TAGS)
    # A line with too many columns and one with invalid UTF-8, appended as raw bytes.
    posts = folder / f"posts-{DATE}.csv.gz"
    raw = gzip.decompress(posts.read_bytes())
    raw += b"11,1,2020-01-01 00:00:00,m,,s,1,1,fox,,1,png,,1,,1,0,,,,f,f,f,0,0,0,f,f,f,EXTRA\n"
    bad = post_row(id="12", description="PLACEHOLDER")
    raw += ",".join(bad).replace("PLACEHOLDER", "caf\xe9").encode("latin-1") + b"\n"
    posts.write_bytes(gzip.compress(raw))
    home = tmp_path / "home"
    # Two thirds of this dump are broken on purpose: the rejected-share gate must not block it.
    result = materialize(home, folder, select=[raw_dump, cleaned_posts],
                         gates=QualityGates(max_rejected_share=1.0))
    assert result.success
    return home, result


def _query(home, sql):
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def test_every_row_is_cleaned_or_rejected_with_a_reason(quirky):
    home, result = quirky
    cleaned = {r[0] for r in _query(home, "SELECT id FROM cleaned_posts")}
    assert cleaned == {1, 2, 7, 10}
    rejected = _query(home, "SELECT stage, id, reason FROM rejected_rows ORDER BY reason")
    reasons = [r[2] for r in rejected]
    assert len(rejected) == 12 - len(cleaned)  # 12 data rows in the file
    assert any(r.startswith("fav_count is not an integer: 'abc'") for r in reasons)
    assert "fav_count is negative" in reasons
    assert any(r.startswith("created_at is not a timestamp: 'yesterday'") for r in reasons)
    assert "rating is not s, q or e" in reasons
    assert any(r.startswith("duplicate id") for r in reasons)
    assert any(r.startswith("id is not an integer: 'x9'") for r in reasons)
    csv_stage = [r for r in rejected if r[0] == "csv"]
    assert len(csv_stage) == 2  # too many columns, invalid UTF-8
    meta = result.asset_materializations_for_node("cleaned_posts")[0].metadata
    assert meta["dump_rows"].value == 12
    assert meta["rejected_rows"].value == 8
    assert meta["dagster/row_count"].value == 4


def test_quirky_values_survive_typing(quirky):
    home, _ = quirky
    row = _query(
        home,
        f"SELECT description, source, created_at, is_deleted, {POST_TAGS} FROM cleaned_posts "
        "WHERE id = 1",
    )[0]
    assert row[0] == DESCRIPTION
    assert row[1] == "https://a.example/x\nhttps://b.example/y"
    assert row[2].microsecond == 123456 and row[2].year == 2019
    assert row[3] is False
    assert sorted(row[4]) == ["fox", "solo"]
    two = _query(home, f"SELECT {POST_TAGS}, is_deleted, rating, duration, parent_id, created_at "
                       "FROM cleaned_posts WHERE id = 2")[0]
    assert two[0] == [] and two[1] is True and two[2] == "e"
    assert two[3] == 12.5 and two[4] == 1 and two[5].second == 0
    ten = _query(home, "SELECT image_width, file_size, comment_count, approver_id, up_score, "
                       "is_flagged FROM cleaned_posts WHERE id = 10")[0]
    assert ten == (None, None, None, None, None, None)


def test_duplicate_id_keeps_the_newest_edit(quirky):
    home, _ = quirky
    rows = _query(home, f"SELECT change_seq, {POST_TAGS} FROM cleaned_posts WHERE id = 7")
    assert len(rows) == 1
    assert rows[0][0] == 9 and sorted(rows[0][1]) == ["artist_x", "fox", "solo"]


def test_missing_column_is_a_clear_failure(tmp_path):
    header = [c for c in POSTS_COLUMNS if c != "fav_count"]
    folder = tmp_path / "src"
    folder.mkdir()
    from e6score_dagster_tests.conftest import write_csv_gz

    idx = POSTS_COLUMNS.index("fav_count")
    write_csv_gz(folder / f"posts-{DATE}.csv.gz", header, [post_row()[:idx] + post_row()[idx + 1:]])
    write_csv_gz(folder / f"tags-{DATE}.csv.gz", ["id", "name", "category", "post_count"], TAGS)
    result = materialize(tmp_path / "home", folder, select=[raw_dump, cleaned_posts])
    assert not result.success
    failure = result.failure_data_for_node("cleaned_posts")
    assert "lacks column(s) fav_count" in str(failure.user_failure_data.description)


def test_reordered_header_is_read_by_name(tmp_path):
    cols = list(reversed(POSTS_COLUMNS))
    folder = tmp_path / "src"
    folder.mkdir()
    from e6score_dagster_tests.conftest import write_csv_gz

    row = dict(zip(POSTS_COLUMNS, post_row(id="42", fav_count="17"), strict=True))
    write_csv_gz(folder / f"posts-{DATE}.csv.gz", cols, [[row[c] for c in cols]])
    write_csv_gz(folder / f"tags-{DATE}.csv.gz", ["id", "name", "category", "post_count"], TAGS)
    home = tmp_path / "home"
    assert materialize(home, folder, select=[raw_dump, cleaned_posts]).success
    assert _query(home, "SELECT id, fav_count FROM cleaned_posts") == [(42, 17)]


def test_enormous_field_is_quarantined_not_fatal(tmp_path):
    huge = "x" * (20 * 1024 * 1024)  # 20 MiB description, over the 16 MiB line limit
    rows = [post_row(id="1"), post_row(id="2", description=huge), post_row(id="3")]
    folder = write_dump(tmp_path / "src", DATE, rows, TAGS)
    home = tmp_path / "home"
    result = materialize(home, folder, select=[raw_dump, cleaned_posts],
                         gates=QualityGates(max_rejected_share=1.0))  # 1 row of 3 is rejected
    assert result.success
    assert {r[0] for r in _query(home, "SELECT id FROM cleaned_posts")} == {1, 3}
    rejected = _query(home, "SELECT stage, reason, length(raw) FROM rejected_rows")
    assert len(rejected) == 1 and rejected[0][0] == "csv"
    assert rejected[0][2] <= 4096  # the quarantined copy is bounded too
