"""Real Dagster runs against e621's current layout, and the source's one-line failures."""

from __future__ import annotations

import gzip

import dagster as dg
import duckdb
import pandas as pd
import pytest

from e6score_dagster.assets.clean import cleaned_posts
from e6score_dagster.assets.ingest import raw_dump
from e6score_dagster.definitions import build_defs
from e6score_dagster.resources import make_resources
from e6score_dagster.schema import POSTS_ALL_COLUMNS, POSTS_COLUMNS
from e6score_dagster_tests.conftest import DUMP_DATE, materialize, post_row, write_csv_gz
from e6score_dagster_tests.current_layout import write_current_layout, write_index
from e6score_dagster_tests.http_server import Faults, FileFault, serve_directory

DAY1 = "2026-11-20T21:30:05.512-05:00"  # UTC date 2026-11-21
DAY2 = "2026-11-21T21:31:40.004-05:00"  # UTC date 2026-11-22


def _query(home, sql):
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def _observe(defs: dg.Definitions, instance: dg.DagsterInstance) -> str:
    result = defs.resolve_job_def("observe_e621_dump").execute_in_process(instance=instance)
    assert result.success
    obs = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    return obs[0].asset_observation_data.asset_observation.tags["dagster/data_version"]


def test_current_layout_scores_every_post_and_follows_new_exports(generated_dump, tmp_path):
    export = write_current_layout(generated_dump, DUMP_DATE, tmp_path / "export", DAY1)
    home = tmp_path / "home"
    faults = Faults()
    with serve_directory(export, faults=faults) as url, dg.instance_for_test() as instance:
        index = url + "db_exports.json"
        defs = build_defs(make_resources(home, index))
        v1 = _observe(defs, instance)
        assert _observe(defs, instance) == v1  # the same index re-listed: same version
        assert materialize(home, index).success
        n_posts = len(pd.read_csv(export / "posts.csv.gz", usecols=["id"]))
        assert _query(home, "SELECT count(*), min(dump_date)::VARCHAR, max(dump_date)::VARCHAR "
                            "FROM scored_posts") == [(n_posts, "2026-11-21", "2026-11-21")]
        new_cols = _query(home, "SELECT count(bg_color), count(last_noted_at), "
                                "count(last_commented_at), count(*) FROM cleaned_posts")[0]
        assert all(0 < n < new_cols[3] for n in new_cols[:3])
        exported = pd.read_csv(home / "exports" / "score-2026-11-21.csv.gz", dtype=str,
                               keep_default_na=False)
        assert list(exported.columns) == [*POSTS_ALL_COLUMNS, "fav_score"]
        assert (exported["bg_color"] != "").sum() == new_cols[0]

        gets = len(faults.gets("posts.csv.gz"))
        assert _observe(defs, instance) == v1
        # The next day's export, new bytes under the same names.
        write_current_layout(generated_dump, DUMP_DATE, export, DAY2, seed=5)
        v2 = _observe(defs, instance)
        assert v2 != v1
        assert materialize(home, index).success
        assert len(faults.gets("posts.csv.gz")) == gets + 1
    assert _query(home, "SELECT DISTINCT dump_date::VARCHAR FROM scored_posts") == [
        ("2026-11-22",)]
    assert (home / "exports" / "score-2026-11-22.csv.gz").exists()


def test_bad_checksum_keeps_the_last_good_scores(generated_dump, tmp_path):
    export = write_current_layout(generated_dump, DUMP_DATE, tmp_path / "export", DAY1)
    home = tmp_path / "home"
    with serve_directory(export) as url:
        index = url + "db_exports.json"
        assert materialize(home, index, select=[raw_dump, cleaned_posts]).success
        before = _query(home, "SELECT count(*) FROM cleaned_posts")
        write_current_layout(generated_dump, DUMP_DATE, export, DAY2, seed=5)
        write_index(export, DAY2, posts={"checksum": "f" * 64})
        result = materialize(home, index, select=[raw_dump, cleaned_posts])
    assert not result.success
    failure = result.failure_data_for_node("raw_dump").user_failure_data.description
    assert "posts.csv.gz: checksum mismatch" in failure and "f" * 64 in failure
    assert "\n" not in failure
    assert _query(home, "SELECT count(*) FROM cleaned_posts") == before
    assert _query(home, "SELECT dump_date::VARCHAR FROM e6score_lineage "
                        "WHERE asset = 'raw_dump'") == [("2026-11-21",)]
    assert not (home / "dumps" / "2026-11-22" / "posts.csv.gz").exists()


def test_header_cells_with_a_quote_or_sql_are_read_by_name(tmp_path):
    odd = ['say "hi"', "x'); DROP TABLE e6score_lineage; --"]
    folder = tmp_path / "src"
    folder.mkdir()
    write_csv_gz(folder / "posts-2025-01-02.csv.gz", [*POSTS_COLUMNS, *odd],
                 [post_row(id="1") + ["a", "b"], post_row(id="2") + ["c", "d"]])
    write_csv_gz(folder / "tags-2025-01-02.csv.gz", ["id", "name", "category", "post_count"],
                 [["1", "fox", "5", "2"]])
    home = tmp_path / "home"
    assert materialize(home, folder, select=[raw_dump, cleaned_posts]).success
    assert _query(home, "SELECT id FROM cleaned_posts ORDER BY id") == [(1,), (2,)]
    assert _query(home, "SELECT count(*) FROM e6score_lineage")[0][0] >= 2
    # Columns that old dumps lack are null, not missing.
    assert _query(home, "SELECT count(bg_color) FROM cleaned_posts") == [(0,)]


def test_header_cell_with_a_control_character_is_refused_by_name(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    header = ",".join([*POSTS_COLUMNS, '"bad\ncell"'])
    body = ",".join(post_row(id="1") + ["x"])
    (folder / "posts-2025-01-02.csv.gz").write_bytes(gzip.compress(f"{header}\n{body}\n".encode()))
    write_csv_gz(folder / "tags-2025-01-02.csv.gz", ["id", "name", "category", "post_count"], [])
    result = materialize(tmp_path / "home", folder, select=[raw_dump, cleaned_posts])
    assert not result.success
    failure = result.failure_data_for_node("cleaned_posts").user_failure_data.description
    assert "'bad\\ncell'" in failure and "refusing" in failure


def _closed_port_url(tmp_path) -> str:
    with serve_directory(tmp_path) as url:
        pass
    return url


@pytest.mark.parametrize("case", ["missing folder", "unreachable", "refused", "home unwritable"])
def test_source_configuration_errors_are_one_line_before_any_work(tmp_path, generated_dump, case):
    home = tmp_path / "home"
    if case == "home unwritable":  # a file where a folder should be
        (tmp_path / "a-file").write_text("")
        home = tmp_path / "a-file" / "home"
    export = tmp_path / "export"
    export.mkdir()
    (export / "db_exports.json").write_text("[]")
    faults = Faults(files={"db_exports.json": FileFault(status=403)})
    expected = {"missing folder": "dump source directory does not exist",
                "unreachable": "cannot reach http://127.0.0.1",
                "refused": "e621 refused the request (HTTP 403)",
                "home unwritable": f"cannot create dump folder {home}/dumps/"}[case]
    with serve_directory(export, faults=faults) as url:
        source = {"missing folder": str(tmp_path / "nope"),
                  "unreachable": _closed_port_url(tmp_path / "closed"),
                  "refused": url + "db_exports.json",
                  "home unwritable": str(generated_dump)}[case]
        result = materialize(home, source, select=[raw_dump])
    assert not result.success
    failure = result.failure_data_for_node("raw_dump").user_failure_data.description
    assert failure.startswith(expected) and "\n" not in failure
    assert "E6SCORE" in failure  # says what to set
    assert not (home / "dumps").exists() and not (home / "tmp").exists()
