"""The whole graph, for real: HTTP download, DuckDB, training, scoring, export."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest

from e6score_dagster.assets.model import PUBLISHED_ROW
from e6score_dagster.assets.score import write_csv_export
from e6score_dagster.model import load_params
from e6score_dagster.schema import POSTS_ALL_COLUMNS, POSTS_COLUMNS
from e6score_dagster_tests.conftest import DUMP_DATE, FAST_TRAINING, materialize
from e6score_dagster_tests.http_server import serve_directory


@pytest.fixture(scope="module")
def pipeline(generated_dump, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with serve_directory(generated_dump) as url:
        result = materialize(home, url, training=FAST_TRAINING)
    assert result.success
    return home, result


def _dump_posts(folder) -> pd.DataFrame:
    return pd.read_csv(folder / f"posts-{DUMP_DATE}.csv.gz", dtype=str, keep_default_na=False)


def test_scored_table_matches_the_dump_row_by_row(pipeline, generated_dump):
    home, _ = pipeline
    dump = _dump_posts(generated_dump)
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        scored = conn.execute(
            "SELECT id, fav_count, expected_fav_count, fav_score, fav_zscore, "
            "strftime(dump_date, '%Y-%m-%d') AS dump_date FROM scored_posts"
        ).df()
        rejected = conn.execute("SELECT count(*) FROM rejected_rows").fetchone()[0]
    assert rejected == 0  # the generator writes only valid rows
    assert len(scored) == len(dump) == scored["id"].nunique()
    merged = dump.assign(id=dump["id"].astype(int)).merge(scored, on="id", suffixes=("_dump", ""))
    assert len(merged) == len(dump)
    assert (merged["fav_count_dump"].astype(int) == merged["fav_count"]).all()
    assert (merged["dump_date"] == DUMP_DATE).all()
    assert merged["fav_score"].between(0, 1).all()
    assert (merged["expected_fav_count"] >= 0).all() and np.isfinite(merged["fav_zscore"]).all()
    # Posts far above their expectation score high, far below score low.
    hi = merged["fav_count"] > 3 * (merged["expected_fav_count"] + 1)
    lo = merged["fav_count"] * 3 + 1 < merged["expected_fav_count"]
    assert merged.loc[hi, "fav_score"].min() > merged.loc[lo, "fav_score"].max()


def test_export_has_every_original_column_and_fav_score(pipeline, generated_dump):
    home, _ = pipeline
    dump = _dump_posts(generated_dump).set_index("id")
    export = pd.read_csv(home / "exports" / f"score-{DUMP_DATE}.csv.gz", dtype=str,
                         keep_default_na=False)
    assert list(export.columns) == [*POSTS_ALL_COLUMNS, "fav_score"]
    export = export.set_index("id")
    assert list(export.index) == list(dump.index)  # row for row, in the dump's own order
    exact = [c for c in POSTS_COLUMNS if c not in ("id", "duration")]
    pd.testing.assert_frame_equal(export.loc[dump.index, exact], dump[exact])
    dur = dump["duration"] != ""
    np.testing.assert_allclose(export.loc[dump.index[dur], "duration"].astype(float),
                               dump.loc[dur, "duration"].astype(float))
    assert export["fav_score"].astype(float).between(0, 1).all()


def test_export_of_scores_in_another_order_is_the_same_file(pipeline, tmp_path):
    """The export reads posts and scores side by side when they are stored in the same order;
    scores stored in any other order take the sorted join and give the same rows."""
    home, _ = pipeline
    db = tmp_path / "copy.duckdb"
    shutil.copy(home / "e6score.duckdb", db)
    published = pd.read_csv(home / "exports" / f"score-{DUMP_DATE}.csv.gz", dtype=str,
                            keep_default_na=False)
    with duckdb.connect(str(db)) as conn:
        conn.execute("CREATE TABLE shuffled AS SELECT * FROM scored_posts ORDER BY fav_score")
        write_csv_export(conn, "shuffled", tmp_path / "x.csv", tmp_path / "x.csv.gz", print)
    again = pd.read_csv(tmp_path / "x.csv.gz", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(again, published)


def test_materialisations_carry_metadata_and_checks_pass(pipeline):
    _, result = pipeline
    for asset in ("raw_dump", "cleaned_posts", "tag_vocabulary", "feature_matrix",
                  "fitted_params", "scored_posts"):
        mats = result.asset_materializations_for_node(asset)
        assert len(mats) == 1, asset
        meta = mats[0].metadata
        assert meta["dump_date"].value == DUMP_DATE, asset
        assert "seconds" in meta, asset
    meta = result.asset_materializations_for_node("fitted_params")[0].metadata
    # Every candidate is reported; the chosen one has the best validation NLL.
    chosen = meta["chosen_candidate"].value
    candidates = meta["candidate_metrics"].value
    published = candidates.pop(PUBLISHED_ROW)
    assert set(candidates) == {"constant", "linear", "additive", "deep"} and chosen in candidates
    best = min(row["val_nll"] for row in candidates.values())
    assert candidates[chosen]["val_nll"] <= best + 1e-4
    assert meta["holdout_nll"].value == pytest.approx(published["nll"], abs=1e-4)
    assert meta["holdout_nll"].value < candidates["constant"]["nll"]
    for k in ("mae", "median_ae", "spearman", "coverage_50", "coverage_80", "coverage_95"):
        assert k in candidates[chosen] and k in candidates["linear"], k
    assert list(meta)[0] == "model_comparison"
    assert f"**{chosen}** ✓" in meta["model_comparison"].value
    # The additive part's prior widths per tag group, in words (the generator's artists vary
    # far more than its general tags).
    widths = meta["tag_effect_sd"].value
    if "artist" in widths:  # the published additive part has a prior per group
        assert widths["artist"] > 2 * widths["general"] > 0
    else:  # the plain ridge (or the constant): one prior for all tags
        assert set(widths) <= {"all tags"}
    assert meta["stage_curves"].value.count("data:image/png") == 1
    assert not [k for k in meta if k.startswith("holdout_") and k not in
                ("holdout_nll", "holdout_posts")]
    raw_meta = result.asset_materializations_for_node("raw_dump")[0].metadata
    assert [c.name for c in raw_meta["dagster/column_schema"].schema.columns] == list(POSTS_COLUMNS)
    scored_meta = result.asset_materializations_for_node("scored_posts")[0].metadata
    assert "top_posts" in scored_meta and "bottom_posts" in scored_meta
    assert "fav_score_histogram" in scored_meta
    assert list(scored_meta)[0] == "model_comparison"  # what the scores are worth, first
    assert scored_meta["model_comparison"].value == meta["model_comparison"].value
    assert scored_meta["dagster/row_count"].value == 3000
    assert [c.name for c in scored_meta["dagster/column_schema"].schema.columns][:5] == [
        "id", "fav_count", "expected_fav_count", "fav_score", "fav_zscore"]
    for asset in ("cleaned_posts", "tag_vocabulary", "feature_matrix", "scored_posts"):
        columns = result.asset_materializations_for_node(asset)[0].metadata[
            "dagster/column_schema"].schema.columns
        assert [c.name for c in columns if not c.description] == [], asset
    rejected = result.asset_materializations_for_node("cleaned_posts")[0].metadata[
        "rejected_rows_columns"].schema.columns
    assert "reason" in [c.name for c in rejected]
    assert [c.name for c in rejected if not c.description] == []
    evaluations = result.get_asset_check_evaluations()
    names = {e.check_name for e in evaluations}
    assert names == {"rejected_share_within_limit", "post_count_not_collapsed",
                     "every_post_scored", "fit_is_publishable"}
    assert all(e.passed for e in evaluations)


def test_params_file_is_keyed_and_loadable(pipeline):
    home, _ = pipeline
    files = list((home / "params").glob("*.msgpack"))
    assert len(files) == 1
    assert files[0].name.startswith(DUMP_DATE)
    fitted = load_params(files[0])
    assert fitted.meta["dump_date"] == DUMP_DATE and fitted.config.batch_size == 256
    # The chosen candidate's config, and one model per cross-fitting fold.
    architecture = {"deep": "e6score"}.get(fitted.meta["chosen_candidate"])
    assert fitted.config.architecture == (architecture or fitted.meta["chosen_candidate"])
    assert len(fitted.fold_params) == fitted.config.folds == 3


def test_dump_was_downloaded_and_verified(pipeline, generated_dump):
    home, _ = pipeline
    folder = home / "dumps" / DUMP_DATE
    for kind in ("posts", "tags"):
        local = folder / f"{kind}-{DUMP_DATE}.csv.gz"
        assert local.read_bytes() == (generated_dump / local.name).read_bytes()
        assert (folder / f"{local.name}.ok").exists()
