"""Versions that cannot drift apart: published inputs only, checked lineage, bounded disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd

from e6score_dagster.assets.features import feature_matrix
from e6score_dagster.assets.model import fitted_params
from e6score_dagster.assets.score import scored_posts
from e6score_dagster.assets.vocabulary import tag_vocabulary
from e6score_dagster.code_versions import code_closure, code_version
from e6score_dagster.definitions import PIPELINE
from e6score_dagster.resources import StateDir, make_resources
from e6score_dagster.store import ensure_lineage, history, read_lineage
from e6score_dagster_tests.conftest import DUMP_DATE, QUICK_TRAINING

DATES = ["2026-11-21", "2026-11-22", "2026-11-23"]


def _posts(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / f"posts-{DUMP_DATE}.csv.gz", dtype=str, keep_default_na=False)


def _publish_dump(src: Path, dump: Path, date: str, posts: pd.DataFrame | None = None) -> None:
    """Tomorrow's dump appears at the source: the given posts (or the same) and the same tags."""
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(dump / f"tags-{DUMP_DATE}.csv.gz", src / f"tags-{date}.csv.gz")
    if posts is None:
        shutil.copy(dump / f"posts-{DUMP_DATE}.csv.gz", src / f"posts-{date}.csv.gz")
    else:
        posts.to_csv(src / f"posts-{date}.csv.gz", index=False, compression="gzip",
                     lineterminator="\n")


def _run(home: Path, src: Path, selection=None, config: dict | None = None,
         keep: int | None = None) -> dg.ExecuteInProcessResult:
    resources = make_resources(home, str(src))
    if keep is not None:
        resources["state"] = StateDir(home=str(home), keep_dumps=keep)
    ops = dict(config or {})
    if selection is None or fitted_params.key in selection:
        ops["fitted_params"] = {"config": QUICK_TRAINING}
    return dg.materialize(PIPELINE, resources=resources, selection=selection,
                          run_config=dg.RunConfig(ops=ops), raise_on_error=False)


def _scored_home(tmp_path: Path, dump: Path) -> tuple[Path, Path]:
    """A source with the first dump, and a home where everything was built from it."""
    src, home = tmp_path / "src", tmp_path / "home"
    _publish_dump(src, dump, DUMP_DATE)
    assert _run(home, src).success
    return src, home


def _query(home: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        return conn.execute(sql, params or []).fetchall()


def _current(home: Path) -> dict[str, tuple[str, dict, dict]]:
    """asset -> (version, inputs, info) of the published build."""
    return {a: (v, json.loads(i), json.loads(info)) for a, v, i, info in _query(
        home, "SELECT asset, version, inputs, info FROM e6score_lineage")}


def _data_version(result: dg.ExecuteInProcessResult, asset: str) -> str:
    mat = result.asset_materializations_for_node(asset)[-1]
    return mat.tags["dagster/data_version"]


def test_two_collapsed_dumps_in_a_row_are_both_blocked(tmp_path, generated_dump):
    src, home = tmp_path / "src", tmp_path / "home"
    df = _posts(generated_dump)
    _publish_dump(src, generated_dump, DUMP_DATE)
    assert _run(home, src).success
    before = _current(home)
    scores = _query(home, "SELECT id, fav_score FROM scored_posts ORDER BY id")
    ids = _query(home, "SELECT id FROM cleaned_posts ORDER BY id")

    # Half the posts, then a little less again: the second drop is small against the first
    # collapsed dump but large against the last accepted one, so it is blocked too.
    for date, n in [(DATES[0], len(df) // 2), (DATES[1], len(df) * 47 // 100)]:
        _publish_dump(src, generated_dump, date, df.iloc[:n])
        result = _run(home, src)
        assert not result.success
        check = {e.check_name: e for e in result.get_asset_check_evaluations()}
        gate = check["post_count_not_collapsed"]
        assert gate.passed is False
        assert gate.metadata["previous_rows"].value == len(df)
        assert gate.metadata["previous_dump_date"].value == DUMP_DATE
        assert gate.metadata["rows"].value == n
        # The rejected dump never reached the table `top` reads; Dagster is told the truth.
        assert _data_version(result, "cleaned_posts") == before["cleaned_posts"][0]
        meta = result.asset_materializations_for_node("cleaned_posts")[-1].metadata
        assert meta["published"].value is False and meta["dump_date"].value == DUMP_DATE
        assert not result.asset_materializations_for_node("tag_vocabulary")
        assert _query(home, "SELECT id FROM cleaned_posts ORDER BY id") == ids
        assert _query(home, "SELECT id, fav_score FROM scored_posts ORDER BY id") == scores
        after = _current(home)
        assert {a: after[a] for a in after if a != "raw_dump"} == {
            a: before[a] for a in before if a != "raw_dump"}
    history = _query(home, "SELECT strftime(dump_date, '%Y-%m-%d'), outcome, reason "
                           "FROM e6score_builds WHERE asset = 'cleaned_posts' ORDER BY id")
    assert [(d, o) for d, o, _ in history] == [
        (DUMP_DATE, "published"), (DATES[0], "rejected"), (DATES[1], "rejected")]
    assert all("post_count_not_collapsed" in r for _, o, r in history if o == "rejected")
    assert _query(home, "SELECT count(*) FROM information_schema.tables "
                        "WHERE table_name LIKE '%__staged'") == [(0,)]


def test_rejected_share_leaves_the_previous_table_in_place(tmp_path, generated_dump):
    src, home = _scored_home(tmp_path, generated_dump)
    rejected_before = _query(home, "SELECT count(*) FROM rejected_rows")
    df = _posts(generated_dump)
    df.loc[: len(df) // 20, "fav_count"] = "-1"  # 5% unrepairable rows
    _publish_dump(src, generated_dump, DATES[0], df)
    result = _run(home, src)
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert check["rejected_share_within_limit"].passed is False
    # Judged on the staged table: neither cleaned_posts nor rejected_rows was replaced.
    assert _query(home, "SELECT count(*), min(id) FROM cleaned_posts") == [
        (len(df), int(df["id"].astype(int).min()))]
    assert _query(home, "SELECT count(*) FROM rejected_rows") == rejected_before
    assert _query(home, "SELECT DISTINCT strftime(dump_date, '%Y-%m-%d') FROM scored_posts") == [
        (DUMP_DATE,)]


def test_params_are_never_applied_to_another_feature_matrix(tmp_path, generated_dump):
    src, home = _scored_home(tmp_path, generated_dump)
    scores = _query(home, "SELECT id, fav_score FROM scored_posts ORDER BY id")
    before = _current(home)

    # The vocabulary alone, with other settings: the matrix and params in use still agree,
    # so scoring is consistent (and has nothing to redo).
    other_vocab = {"tag_vocabulary": {"config": {"min_count": 5}}}
    assert _run(home, src, [tag_vocabulary.key], other_vocab).success
    alone = _run(home, src, [scored_posts.key])
    assert alone.success
    assert alone.asset_materializations_for_node("scored_posts")[0].metadata["reused"].value

    # Vocabulary and matrix rebuilt: the params in use were fitted on the old matrix.
    assert _run(home, src, [tag_vocabulary.key, feature_matrix.key], other_vocab).success
    now = _current(home)
    assert now["feature_matrix"][0] != before["feature_matrix"][0]
    refused = _run(home, src, [scored_posts.key])
    assert not refused.success
    message = refused.failure_data_for_node("scored_posts").user_failure_data.description
    assert f"fitted_params {before['fitted_params'][0]}" in message
    assert f"feature_matrix {before['feature_matrix'][0]}" in message
    assert now["feature_matrix"][0] in message and "\n" not in message
    assert _query(home, "SELECT id, fav_score FROM scored_posts ORDER BY id") == scores

    # Refit, then score: everything in use was built from what is published.
    assert _run(home, src, [fitted_params.key, scored_posts.key]).success
    final = _current(home)
    assert final["fitted_params"][1]["feature_matrix"] == final["feature_matrix"][0]
    assert final["scored_posts"][1] == {a: final[a][0] for a in (
        "fitted_params", "feature_matrix", "cleaned_posts")}
    assert final["feature_matrix"][1]["tag_vocabulary"] == final["tag_vocabulary"][0]


def test_retention_keeps_the_last_n_exports_params_and_dumps(tmp_path, generated_dump):
    src, home = tmp_path / "src", tmp_path / "home"
    dates = [DUMP_DATE, *DATES]
    for date in dates:
        _publish_dump(src, generated_dump, date)
        result = _run(home, src, keep=2)
        assert result.success
    in_use = _current(home)
    assert sorted(p.name for p in (home / "exports").iterdir()) == sorted(
        f"score-{d}.{ext}" for d in dates[-2:] for ext in ("csv.gz", "parquet"))
    params = sorted(p.name for p in (home / "params").iterdir())
    assert len(params) == 2 and Path(in_use["fitted_params"][2]["path"]).name in params
    assert [p.name for p in (home / "features").iterdir()] == [
        Path(in_use["feature_matrix"][2]["dir"]).name]
    assert sorted(p.name for p in (home / "dumps").iterdir()) == dates[-2:]
    # Every materialisation reports what its stage keeps on disk.
    for asset, folder in [("scored_posts", "exports"), ("fitted_params", "params"),
                          ("feature_matrix", "features"), ("raw_dump", "dumps")]:
        meta = result.asset_materializations_for_node(asset)[0].metadata
        kept = sum(p.stat().st_size for p in (home / folder).rglob("*") if p.is_file())
        assert meta["disk_bytes"].value == kept, asset
    assert result.asset_materializations_for_node("cleaned_posts")[0].metadata[
        "disk_bytes"].value > 0


def test_a_home_of_the_single_row_lineage_is_carried_over(tmp_path):
    """An existing home keeps working: its lineage rows become published builds."""
    db = tmp_path / "e6score.duckdb"
    info = {"key": "abc", "pools": None, "posts": "/x/posts.csv.gz"}
    with duckdb.connect(str(db)) as conn:
        conn.execute("CREATE TABLE e6score_lineage (asset VARCHAR PRIMARY KEY, dump_date DATE, "
                     "built_at TIMESTAMP, info JSON)")
        conn.execute("INSERT INTO e6score_lineage VALUES ('raw_dump', DATE '2026-01-02', "
                     "TIMESTAMP '2026-01-02 06:00:00', ?)", [json.dumps(info)])
        ensure_lineage(conn)
        ensure_lineage(conn)  # idempotent
        assert read_lineage(conn, "raw_dump") == ("2026-01-02", info)
        assert [(b.version, b.outcome) for b in history(conn, "raw_dump")] == [
            ("abc", "published")]


def test_code_versions_ignore_comments_and_docstrings(tmp_path):
    pkg = tmp_path / "e6score_dagster"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .util import f\n")
    (pkg / "sub" / "util.py").write_text('"""Doc."""\n\ndef f():\n    return 1\n')
    (pkg / "stage.py").write_text("X = 1\n")  # orchestration only: never part of a version
    (pkg / "asset.py").write_text("from e6score_dagster import stage\n"
                                  "from e6score_dagster.sub import f\n")
    v0 = code_version("e6score_dagster.asset", pkg)
    assert set(code_closure("e6score_dagster.asset", pkg)) == {
        "e6score_dagster.asset", "e6score_dagster.sub", "e6score_dagster.sub.util"}
    (pkg / "sub" / "util.py").write_text('"""Other doc."""\n\n# note\ndef f():\n    return 1\n')
    (pkg / "stage.py").write_text("X = 2\n")
    assert code_version("e6score_dagster.asset", pkg) == v0
    (pkg / "sub" / "util.py").write_text("def f():\n    return 2\n")  # through a relative import
    assert code_version("e6score_dagster.asset", pkg) != v0
