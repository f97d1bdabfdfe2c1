"""The synthetic dump must look like the real e621 export to every reader we use."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from e6score_dagster.schema import POOLS_COLUMNS, POSTS_COLUMNS, TAGS_COLUMNS
from e6score_dagster.synthetic import generate_dump, iter_chunks, main

POSTS = 3000
DATE = "2026-11-20"
BOOL_COLUMNS = (
    "is_deleted",
    "is_pending",
    "is_flagged",
    "is_rating_locked",
    "is_status_locked",
    "is_note_locked",
)
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$")


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_dump(tmp_path_factory.mktemp("dump"), POSTS, DATE, seed=7)


def _pandas(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _duckdb(path: Path) -> pd.DataFrame:
    sql = (
        f"SELECT * FROM read_csv('{path}', header=true, all_varchar=true, quote='\"', "
        "escape='\"', delim=',', strict_mode=true)"
    )
    with duckdb.connect() as con:
        frame = con.sql(sql).df()
    return frame.fillna("").astype(object)


@pytest.fixture(scope="module")
def posts(dump: dict[str, Path]) -> pd.DataFrame:
    return _pandas(dump["posts"])


@pytest.fixture(scope="module")
def tags(dump: dict[str, Path]) -> pd.DataFrame:
    return _pandas(dump["tags"])


def _header(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return fh.readline().rstrip("\n")


def test_exact_headers(dump: dict[str, Path]) -> None:
    assert _header(dump["posts"]) == ",".join(POSTS_COLUMNS)
    assert _header(dump["tags"]) == ",".join(TAGS_COLUMNS)
    assert _header(dump["pools"]) == ",".join(POOLS_COLUMNS)
    assert set(dump) == {"posts", "tags", "pools", "truth"}


def test_text_quirks_appear(dump: dict[str, Path], posts: pd.DataFrame) -> None:
    with gzip.open(dump["posts"], "rt", encoding="utf-8", newline="") as fh:
        raw = fh.read()
    desc = posts["description"]
    assert desc.str.contains("\n").any(), "multi-line quoted description"
    assert desc.str.contains("\r\n").any(), "CRLF inside a quoted field"
    assert desc.str.contains('"').any() and '""' in raw, "doubled quotes"
    assert desc.str.contains(",").any()
    assert desc.map(lambda s: any(ord(ch) > 127 for ch in s)).any(), "non-ASCII"
    assert desc.map(lambda s: any(ord(ch) > 0xFFFF for ch in s)).any(), "emoji"
    assert (desc == "").mean() > 0.5
    assert posts["source"].str.contains("\n").any(), "several sources on separate lines"
    assert (posts["source"] == "").any()
    assert (posts["locked_tags"] == "").mean() > 0.9


def test_value_formats(posts: pd.DataFrame) -> None:
    for col in BOOL_COLUMNS:
        assert set(posts[col]) <= {"t", "f"}, col
    others = [c for c in POSTS_COLUMNS if c not in BOOL_COLUMNS]
    assert not posts[others].isin(["t", "f", "true", "false", "True", "False"]).any().any()
    for col in ("created_at", "updated_at"):
        assert posts[col].str.fullmatch(TS_RE).all(), col
    assert (posts["updated_at"] >= posts["created_at"]).all()
    assert posts["created_at"].min() >= "2007-02-10" and posts["created_at"].max() < DATE
    assert posts["md5"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert set(posts["rating"]) == {"s", "q", "e"}
    assert set(posts["file_ext"]) <= {"jpg", "png", "gif", "webm", "mp4", "swf", "webp"}
    animated = posts["file_ext"].isin(["gif", "webm", "mp4"])
    assert (posts.loc[animated, "duration"] != "").all()
    assert (posts.loc[~animated, "duration"] == "").all()
    assert (posts["parent_id"] == "").mean() > 0.8 and (posts["approver_id"] == "").any()


def test_ids_ascending_with_gaps(posts: pd.DataFrame) -> None:
    ids = posts["id"].astype(np.int64).to_numpy()
    assert (np.diff(ids) > 0).all()
    assert ids[-1] > len(ids), "ids must not equal row numbers"
    parents = posts.loc[posts["parent_id"] != "", "parent_id"].astype(np.int64)
    assert parents.isin(ids).all()


def test_tag_and_status_quirks(posts: pd.DataFrame, tags: pd.DataFrame) -> None:
    assert (posts["tag_string"] == "").any()
    assert (tags["post_count"] == "0").any()
    deleted = (posts["is_deleted"] == "t").mean()
    assert 0.02 < deleted < 0.1
    n_tags = posts["tag_string"].str.split().str.len()
    assert 20 < n_tags.mean() < 40
    assert tags["name"].is_unique and tags["id"].is_unique
    assert not tags["name"].str.contains(r"[\s,]").any()
    assert set(tags["category"].astype(int)) == {0, 1, 3, 4, 5, 7, 8}


def test_scores_add_up(posts: pd.DataFrame) -> None:
    up, down, score = (posts[c].astype(np.int64) for c in ("up_score", "down_score", "score"))
    assert (score == up + down).all()
    assert (down <= 0).all() and (up >= 0).all()
    fav = posts["fav_count"].astype(np.int64)
    assert np.corrcoef(np.log1p(fav), np.log1p(up))[0, 1] > 0.8


def test_tag_post_counts_match_posts(posts: pd.DataFrame, tags: pd.DataFrame) -> None:
    counted = posts["tag_string"].str.split().explode().dropna().value_counts()
    declared = tags.set_index("name")["post_count"].astype(np.int64)
    assert counted.index.isin(declared.index).all()
    assert (declared.reindex(counted.index) == counted).all()
    assert (declared.drop(counted.index) == 0).all()


def test_pools(dump: dict[str, Path], posts: pd.DataFrame) -> None:
    pools = _pandas(dump["pools"])
    assert len(pools) > 0
    assert pools["post_ids"].str.fullmatch(r"\{\d+(,\d+)*\}").all()
    members = pools["post_ids"].str.strip("{}").str.split(",").explode().astype(np.int64)
    assert members.isin(posts["id"].astype(np.int64)).all()
    assert pools["created_at"].str.fullmatch(TS_RE).all()
    assert set(pools["is_active"]) <= {"t", "f"}


@pytest.mark.parametrize("kind", ["posts", "tags", "pools"])
def test_round_trip_pandas_and_duckdb_agree(dump: dict[str, Path], kind: str) -> None:
    by_pandas = _pandas(dump[kind])
    by_duckdb = _duckdb(dump[kind])
    assert list(by_duckdb.columns) == list(by_pandas.columns)
    assert len(by_duckdb) == len(by_pandas)
    assert (by_duckdb.to_numpy() == by_pandas.to_numpy()).all()


def test_round_trip_matches_generated_values(posts: pd.DataFrame) -> None:
    _, chunks = iter_chunks(POSTS, DATE, seed=7)
    parts = [pd.DataFrame(c.posts) for c in chunks]
    generated = pd.concat(parts, ignore_index=True).astype(object)
    assert len(posts) == len(generated) == POSTS
    assert (posts.to_numpy() == generated.to_numpy()).all()


def test_truth_parquet(dump: dict[str, Path], posts: pd.DataFrame) -> None:
    truth = pd.read_parquet(dump["truth"])
    assert list(truth.columns) == [
        "id",
        "quality",
        "expected_log_fav",
        "oracle_mean",
        "oracle_sd",
        "oracle_score",
    ]
    assert [str(t) for t in truth.dtypes] == ["int64"] + ["float64"] * 5
    assert (truth["id"].to_numpy() == posts["id"].astype(np.int64).to_numpy()).all()
    assert abs(truth["quality"].std() - 1.0) < 0.1


def test_deterministic(tmp_path: Path, dump: dict[str, Path]) -> None:
    again = generate_dump(tmp_path / "same", POSTS, DATE, seed=7)
    for kind, path in dump.items():
        assert again[kind].read_bytes() == path.read_bytes(), kind
    other = generate_dump(tmp_path / "other", POSTS, DATE, seed=8)
    assert other["posts"].read_bytes() != dump["posts"].read_bytes()


def _within_year_spearman(frame: pd.DataFrame, a: str, b: str) -> float:
    """Rank correlation after ranking inside each upload year, so age cannot explain it."""
    ranks = frame.groupby("year")[[a, b]].rank(pct=True)
    return float(np.corrcoef(ranks[a], ranks[b])[0, 1])


def test_quality_signal_survives_in_fav_count(dump: dict[str, Path], posts: pd.DataFrame) -> None:
    truth = pd.read_parquet(dump["truth"])
    frame = pd.DataFrame(
        {
            "fav": posts["fav_count"].astype(np.int64),
            "quality": truth["quality"],
            "year": posts["created_at"].str[:4],
        }
    )
    old_enough = posts["created_at"] < "2026-10-01"
    assert _within_year_spearman(frame[old_enough], "fav", "quality") > 0.2
    by_year = frame.groupby("year")["fav"].mean()
    assert by_year.iloc[-3:].mean() > 10 * by_year.iloc[:3].mean(), "audience grows"


def test_young_posts_are_immature(dump: dict[str, Path], posts: pd.DataFrame) -> None:
    truth = pd.read_parquet(dump["truth"])
    young = posts["created_at"] >= "2026-11-18"
    assert young.any()
    mature = posts["created_at"].between("2026-06-01", "2026-10-01")
    log_mu = truth["expected_log_fav"]
    assert log_mu[young].mean() < log_mu[mature].mean()


def test_cli_and_validation(tmp_path: Path) -> None:
    main(["--posts", "300", "--date", "2020-01-01", "--out", str(tmp_path), "--tags", "500"])
    tags = _pandas(tmp_path / "tags-2020-01-01.csv.gz")
    assert len(tags) == 500
    assert len(_pandas(tmp_path / "posts-2020-01-01.csv.gz")) == 300
    with pytest.raises(ValueError):
        generate_dump(tmp_path / "bad", 10, "2006-01-01")
    with pytest.raises(ValueError):
        generate_dump(tmp_path / "bad", 10, DATE, n_tags=10)
