"""The curation query (`python -m e6score_dagster.top`) on a really materialised pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

import e6score_dagster.top as top_module
from e6score_dagster.sql import tag_tokens_sql
from e6score_dagster.top import main, search_urls, top_posts
from e6score_dagster_tests.conftest import DUMP_DATE, materialize

REPO = Path(__file__).resolve().parents[1]

TOKENS = tag_tokens_sql("coalesce(tag_string, '')")  # a post without tags: []


@pytest.fixture(scope="module")
def home(generated_dump, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("top_home")
    result = materialize(home, generated_dump)
    assert result.success
    return home


@pytest.fixture
def conn(home):
    c = duckdb.connect(str(home / "e6score.duckdb"), read_only=True)
    yield c
    c.close()


@pytest.fixture(scope="module")
def scored(home) -> pd.DataFrame:
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as c:
        df = c.execute("SELECT * FROM scored_posts").df()
        tags = c.execute(f"SELECT id, list_filter({TOKENS}, lambda t: t <> '') "
                         "AS tags FROM cleaned_posts").df()
    df = df.merge(tags, on="id", how="left", validate="one_to_one")
    df["key"] = df["fav_score"] * np.log1p(df["fav_count"])
    return df


def expected_order(df: pd.DataFrame, k: int | None = None) -> list[int]:
    """The documented ranking, recomputed in pandas: key desc, then id asc."""
    ranked = df.sort_values(["key", "id"], ascending=[False, True], kind="mergesort")
    ids = ranked["id"].astype(int).tolist()
    return ids if k is None else ids[:k]


def live(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["is_deleted"].fillna(False).astype(bool)]


def pool_members(dump: Path) -> set[int]:
    pools = pd.read_csv(dump / f"pools-{DUMP_DATE}.csv.gz", dtype=str, keep_default_na=False)
    out: set[int] = set()
    for cell in pools["post_ids"]:
        out.update(int(x) for x in cell.strip("{}").split(",") if x.strip())
    return out


def ids(posts: list[dict]) -> list[int]:
    return [p["id"] for p in posts]


def db_copy(home: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in home.glob("e6score.duckdb*"):
        shutil.copy(f, dest / f.name)
    return dest


# --------------------------------------------------------------------------- ranking


def test_ranking_matches_pandas_recomputation(conn, scored):
    everything = top_posts(conn, len(scored), include_deleted=True)
    assert ids(everything) == expected_order(scored)
    keys = scored.set_index("id").loc[ids(everything), "key"].to_numpy()
    np.testing.assert_allclose([p["rank_key"] for p in everything], keys, rtol=1e-12)
    assert [p["rank"] for p in everything] == list(range(1, len(scored) + 1))

    top = top_posts(conn, 32)
    assert ids(top) == expected_order(live(scored), 32)
    # The log count does its job: the head is not just the highest fav_score.
    assert ids(top) != live(scored).nlargest(32, "fav_score")["id"].tolist()
    first = top[0]
    assert set(first) >= {"id", "rating", "file_ext", "fav_count", "expected_fav_count",
                          "fav_score", "fav_zscore", "rank_key", "is_deleted", "dump_date"}
    assert first["dump_date"] == DUMP_DATE


def test_deleted_posts_are_excluded_by_default(conn, scored):
    n_deleted = int(scored["is_deleted"].sum())
    assert n_deleted > 0
    default = top_posts(conn, len(scored))
    assert not any(p["is_deleted"] for p in default)
    assert ids(default) == expected_order(live(scored))
    assert len(default) == len(scored) - n_deleted
    with_deleted = top_posts(conn, len(scored), include_deleted=True)
    assert sum(p["is_deleted"] for p in with_deleted) == n_deleted


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "ratings, want", [(["s"], ["s"]), (["q", "e"], ["q", "e"]), ("e", ["e"]), (["safe"], ["s"])]
)
def test_rating_filter(conn, scored, ratings, want):
    got = top_posts(conn, 50, ratings=ratings)
    assert len(got) == 50 and {p["rating"] for p in got} <= set(want)
    df = live(scored)
    assert ids(got) == expected_order(df[df["rating"].isin(want)], 50)


def test_ext_filter(conn, scored):
    got = top_posts(conn, 40, exts=["png", ".webp"])
    assert {p["file_ext"] for p in got} <= {"png", "webp"}
    df = live(scored)
    assert ids(got) == expected_order(df[df["file_ext"].isin(["png", "webp"])], 40)


def test_exclude_tags_drops_every_post_with_any_of_them(conn, scored):
    df = live(scored)
    head = df[df["id"].isin(expected_order(df, 100))]
    counts = Counter(t for tags in head["tags"] for t in tags)
    tag, n = counts.most_common(1)[0]  # a tag that really occurs at the top
    other = next(t for t, _ in counts.most_common() if t != tag)
    assert n >= 10

    got = top_posts(conn, 100, exclude_tags=[tag, other])
    has = df["tags"].map(lambda ts: tag in ts or other in ts)
    assert ids(got) == expected_order(df[~has], 100)
    got_tags = df.set_index("id").loc[ids(got), "tags"]
    assert not any(tag in ts or other in ts for ts in got_tags)
    assert set(ids(got)) != set(expected_order(df, 100))  # it really removed posts


def test_exclude_pools_removes_exactly_the_pool_members(conn, scored, generated_dump):
    members = pool_members(generated_dump)
    df = live(scored)
    assert members & set(df["id"])  # the dump's pools do hold scored posts
    warnings: list[str] = []
    got = top_posts(conn, len(scored), exclude_pools=True, warn=warnings.append)
    assert warnings == []
    assert set(ids(got)) == set(df["id"]) - members
    assert ids(got) == expected_order(df[~df["id"].isin(members)])


def test_filters_combine(conn, scored, generated_dump):
    members = pool_members(generated_dump)
    df = live(scored)
    keep = df["rating"].isin(["s", "q"]) & df["file_ext"].isin(["png", "jpg"]) & ~df["id"].isin(
        members
    )
    got = top_posts(conn, 25, ratings=["s", "q"], exts=["png", "jpg"], exclude_pools=True)
    assert ids(got) == expected_order(df[keep], 25)


def test_a_dump_without_pools_is_reported_and_excludes_nothing(home, tmp_path, capsys):
    copy = db_copy(home, tmp_path / "nopools")
    with duckdb.connect(str(copy / "e6score.duckdb")) as c:
        info = json.loads(
            c.execute("SELECT info FROM e6score_lineage WHERE asset = 'raw_dump'").fetchone()[0]
        )
        info["pools"] = None
        c.execute(
            "UPDATE e6score_builds SET info = ? WHERE id = "
            "(SELECT build_id FROM e6score_current WHERE asset = 'raw_dump')",
            [json.dumps(info)],
        )
    with duckdb.connect(str(copy / "e6score.duckdb"), read_only=True) as c:
        warnings: list[str] = []
        got = top_posts(c, 500, exclude_pools=True, warn=warnings.append)
        assert ids(got) == ids(top_posts(c, 500))
    assert len(warnings) == 1 and "no pools file" in warnings[0]

    capsys.readouterr()
    assert main(["--home", str(copy), "--k", "5", "--exclude-pools"]) == 0
    out, err = capsys.readouterr()
    assert "no pools file" in err and "https://e621.net/posts?tags=id:" in out


# --------------------------------------------------------------------------- output


def test_search_urls_chunk_at_100():
    assert search_urls([3, 1, 2]) == ["https://e621.net/posts?tags=id:3,1,2"]
    urls = search_urls(list(range(1, 251)))
    assert len(urls) == 3
    chunks = [u.removeprefix("https://e621.net/posts?tags=id:").split(",") for u in urls]
    assert [len(c) for c in chunks] == [100, 100, 50]
    assert [int(i) for c in chunks for i in c] == list(range(1, 251))
    assert search_urls([]) == []


def test_table_output_and_urls_in_rank_order(home, scored, capsys):
    assert main(["--home", str(home), "--k", "150"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    n_live = len(live(scored))
    assert lines[0] == (f"dump {DUMP_DATE}: {n_live:,} post(s) match the filters; top 150 by "
                        "rank_key = fav_score * ln(1 + fav_count)")
    assert lines[1].split() == ["rank", "id", "rating", "ext", "favs", "expected", "fav_score",
                                "rank_key"]
    rows = lines[2:152]
    assert len({len(r) for r in rows[:9]}) == 1  # aligned
    assert [int(r.split()[1]) for r in rows] == expected_order(live(scored), 150)
    keys = scored.set_index("id").loc[[int(r.split()[1]) for r in rows], "key"]
    np.testing.assert_allclose([float(r.split()[-1]) for r in rows], keys, atol=5e-4)
    assert lines[152] == ""
    urls = lines[153:]
    assert len(urls) == 2 and all(u.startswith("https://e621.net/posts?tags=id:") for u in urls)
    url_ids = [int(i) for u in urls for i in u.split("id:", 1)[1].split(",")]
    assert url_ids == expected_order(live(scored), 150)
    assert len(urls[0].split(",")) == 100 and len(urls[1].split(",")) == 50


def test_json_output_parses(home, scored, capsys):
    rc = main(["--home", str(home), "--k", "7", "--rating", "s", "--rating", "q",
               "--ext", "png,jpg", "--format", "json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dump_date"] == DUMP_DATE and "ln(1 + fav_count)" in data["ranking"]
    df = live(scored)
    keep = df["rating"].isin(["s", "q"]) & df["file_ext"].isin(["png", "jpg"])
    assert data["matched"] == int(keep.sum())
    assert data["filters"]["ratings"] == ["s", "q"] and data["filters"]["exts"] == ["png", "jpg"]
    assert [p["rank"] for p in data["posts"]] == list(range(1, 8))
    df = live(scored)
    keep = df["rating"].isin(["s", "q"]) & df["file_ext"].isin(["png", "jpg"])
    want = expected_order(df[keep], 7)
    assert [p["id"] for p in data["posts"]] == want
    assert data["urls"] == ["https://e621.net/posts?tags=id:" + ",".join(map(str, want))]


# --------------------------------------------------------------------------- errors


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("e6score-top: error:")
    return lines[0]


def test_missing_database(tmp_path, capsys):
    assert main(["--home", str(tmp_path / "empty")]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert out == ""
    assert "nothing materialised yet" in line
    assert "dg launch -m e6score_dagster --job e6score_job" in line
    assert not (tmp_path / "empty").exists()  # read-only: it creates nothing


def test_missing_scored_table(tmp_path, capsys):
    duckdb.connect(str(tmp_path / "e6score.duckdb")).close()
    assert main(["--home", str(tmp_path)]) == 2
    assert "scored_posts" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--k", "0"], "at least 1"),
        (["--k", "-3"], "at least 1"),
        (["--k", "many"], "invalid int value"),
        (["--rating", "s,x"], "unknown rating 'x'"),
        (["--format", "xml"], "invalid choice"),
    ],
)
def test_bad_arguments(home, argv, needle, capsys):
    assert main(["--home", str(home), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in one_error_line(err)


def test_top_posts_rejects_bad_k_and_rating(conn):
    with pytest.raises(ValueError, match="at least 1"):
        top_posts(conn, 0)
    with pytest.raises(ValueError, match="unknown rating"):
        top_posts(conn, 3, ratings=["x"])


HOLD_LOCK = """
import sys, time, duckdb
c = duckdb.connect(sys.argv[1])
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
c.close()
"""


def test_locked_database_is_reported_then_retried(home, tmp_path, capsys):
    copy = db_copy(home, tmp_path / "locked")
    db = str(copy / "e6score.duckdb")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, db, "30"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert main(["--home", str(copy), "--wait", "0"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "locked by a running pipeline" in line and "retry" in line
    finally:
        holder.kill()
        holder.wait()
    # A writer that lets go within --wait is waited for.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, db, "1.0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert main(["--home", str(copy), "--k", "3", "--wait", "30"]) == 0
        assert capsys.readouterr().out.count("\n") == 1 + 1 + 3 + 1 + 1
    finally:
        holder.wait(timeout=30)


# --------------------------------------------------------------------------- the real CLI


def test_real_cli_via_python_dash_m(home, tmp_path, scored):
    ok = subprocess.run(
        [sys.executable, "-m", "e6score_dagster.top", "--home", str(home), "--k", "5",
         "--format", "json"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert [p["id"] for p in json.loads(ok.stdout)["posts"]] == expected_order(live(scored), 5)

    bad = subprocess.run(
        [sys.executable, "-m", "e6score_dagster.top", "--home", str(tmp_path / "nothing")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr
    ours = [line for line in bad.stderr.splitlines() if line.startswith("e6score-top:")]
    assert len(ours) == 1 and "nothing materialised yet" in ours[0]


def test_help_documents_the_ranking(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "fav_score * ln(1 + fav_count)" in text and "ties by ascending id" in text
    assert "fav_score * ln(1 + fav_count)" in top_module.__doc__


# --------------------------------------------------------------------------- what it tells


def test_tags_keeps_posts_having_all_of_them(conn, scored):
    df = live(scored)
    counts = Counter(t for tags in df["tags"] for t in tags)
    first, second = (t for t, _ in counts.most_common(2))
    got = top_posts(conn, 50, tags=[first, second])
    has = df["tags"].map(lambda ts: first in ts and second in ts)
    assert 0 < has.sum() < len(df)
    assert ids(got) == expected_order(df[has], 50)
    assert got[0]["matched"] == int(has.sum())


def test_filters_that_match_nothing_known_are_reported(home, scored, capsys):
    df = live(scored)
    known_tag = Counter(t for tags in df["tags"] for t in tags).most_common(1)[0][0]
    rc = main(["--home", str(home), "--k", "5", "--ext", "png,tiff",
               "--exclude-tags", f"{known_tag},no_such_tag_xyz", "--tags", "nor_this_one"])
    assert rc == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert any("'tiff'" in w and "png" in w for w in warnings), err
    assert any("--exclude-tags no_such_tag_xyz" in w for w in warnings), err
    assert any("--tags nor_this_one" in w for w in warnings), err
    assert not any(known_tag + ":" in w or "'png'" in w for w in warnings), err
    assert out.splitlines()[0] == "no post matches the filters"

    # Filters that are all known say nothing.
    assert main(["--home", str(home), "--k", "5", "--ext", "png",
                 "--exclude-tags", known_tag]) == 0
    assert "warning" not in capsys.readouterr().err


LIGHT_PATH = """
import sys
from e6score_dagster.top import main
code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"dagster", "dagster_duckdb", "jax",
                                                       "jaxlib", "flax", "optax", "matplotlib"})
print("HEAVY", heavy)
sys.exit(code)
"""


def test_top_imports_neither_dagster_nor_jax(home):
    """The CLI answers in well under a second and a half: no Dagster or JAX on its path."""
    run = subprocess.run([sys.executable, "-c", LIGHT_PATH, "--home", str(home), "--k", "3",
                          "--exclude-pools", "--exclude-tags", "comic"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stdout, run.stdout
