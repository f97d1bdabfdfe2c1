"""Faults an unattended daily job meets: bad dumps, kills mid-step, concurrent runs, extremes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest

from e6score_dagster.definitions import PIPELINE
from e6score_dagster.model import load_params
from e6score_dagster.resources import QualityGates, make_resources
from e6score_dagster.schema import POSTS_COLUMNS
from e6score_dagster.store import memory_limit
from e6score_dagster.synthetic import generate_dump
from e6score_dagster_tests.conftest import DUMP_DATE, QUICK_TRAINING, run_config

REPO_ROOT = Path(__file__).resolve().parents[1]
D2 = "2026-11-21"
# A short fit on 100k posts: these tests kill and resume runs.
QUICK_BIG = {**QUICK_TRAINING, "epochs": 1, "batch_size": 2048}


def _posts(folder: Path, date: str = DUMP_DATE) -> pd.DataFrame:
    return pd.read_csv(folder / f"posts-{date}.csv.gz", dtype=str, keep_default_na=False)


def _write_posts(df: pd.DataFrame, folder: Path, date: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"posts-{date}.csv.gz", "wt", encoding="utf-8", newline="") as f:
        df[list(POSTS_COLUMNS)].to_csv(f, index=False, lineterminator="\n")


def _copy_tags(src: Path, dst: Path, date: str) -> None:
    (dst / f"tags-{date}.csv.gz").write_bytes((src / f"tags-{DUMP_DATE}.csv.gz").read_bytes())


def _run(home: Path, source: Path, gates: QualityGates | None = None):
    resources = make_resources(home, str(source))
    if gates is not None:
        resources["gates"] = gates
    return dg.materialize(PIPELINE, resources=resources, run_config=run_config(),
                          raise_on_error=False)


def _state(home: Path) -> dict:
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        lineage = {a: (str(d), {**json.loads(i), "version": v}) for a, d, v, i in conn.execute(
            "SELECT asset, dump_date, version, info FROM e6score_lineage").fetchall()}
        return {
            "scored": conn.execute("SELECT count(*), min(strftime(dump_date, '%Y-%m-%d')) "
                                   "FROM scored_posts").fetchone(),
            "cleaned": conn.execute("SELECT count(*) FROM cleaned_posts").fetchone()[0],
            "lineage": lineage,
        }


def test_rejected_share_over_the_limit_stops_the_chain(tmp_path, generated_dump):
    df = _posts(generated_dump)
    df.loc[: len(df) // 20, "fav_count"] = "-1"  # 5% unrepairable rows
    src = tmp_path / "src"
    _write_posts(df, src, DUMP_DATE)
    _copy_tags(generated_dump, src, DUMP_DATE)
    result = _run(tmp_path / "home", src)
    assert not result.success
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert check["rejected_share_within_limit"].passed is False
    assert not result.asset_materializations_for_node("tag_vocabulary")  # nothing downstream
    # The same dump passes with a looser, configured threshold.
    loose = _run(tmp_path / "home2", src, QualityGates(max_rejected_share=0.1))
    assert loose.success


def test_post_count_collapse_keeps_the_previous_scores(tmp_path, generated_dump):
    src = tmp_path / "src"
    df = _posts(generated_dump)
    _write_posts(df, src, DUMP_DATE)
    _copy_tags(generated_dump, src, DUMP_DATE)
    home = tmp_path / "home"
    assert _run(home, src).success
    _write_posts(df.iloc[: len(df) // 2], src, D2)  # tomorrow's dump lost half its posts
    _copy_tags(generated_dump, src, D2)
    result = _run(home, src)
    assert not result.success
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert check["post_count_not_collapsed"].passed is False
    assert check["post_count_not_collapsed"].metadata["previous_rows"].value == len(df)
    state = _state(home)
    assert state["scored"] == (len(df), DUMP_DATE)  # the last good scores are still in use


def test_extreme_values_do_not_break_training_or_scoring(tmp_path, generated_dump):
    df = _posts(generated_dump)
    df.loc[0, "fav_count"] = "1000000"
    df.loc[1, "created_at"] = "2099-12-31 23:59:59.999999"
    df.loc[2, "image_width"], df.loc[2, "image_height"] = "100000000", "1"
    df.loc[3, "file_size"], df.loc[3, "duration"] = "999999999999", "1e9"
    src = tmp_path / "src"
    _write_posts(df, src, DUMP_DATE)
    _copy_tags(generated_dump, src, DUMP_DATE)
    home = tmp_path / "home"
    assert _run(home, src).success
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        rows = conn.execute(
            "SELECT id, fav_score, fav_zscore, expected_fav_count FROM scored_posts "
            "WHERE id IN (SELECT unnest(?))", [[int(i) for i in df["id"][:4]]]).fetchall()
    assert len(rows) == 4
    assert all(0 <= r[1] <= 1 and np.isfinite(r[2]) and np.isfinite(r[3]) for r in rows)
    million = next(r for r in rows if r[0] == int(df["id"][0]))
    assert million[1] > 0.99


def _cli(home: Path, source: Path, training: dict) -> subprocess.Popen:
    env = {**os.environ, "E6SCORE_HOME": str(home), "E6SCORE_DUMP_SOURCE": str(source),
           "PYTHONUNBUFFERED": "1"}
    config = json.dumps({"ops": {"fitted_params": {"config": training}}})
    return subprocess.Popen(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "e6score_dagster",
         "--select", "*", "--config-json", config],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def test_two_runs_at_once_do_not_collide(tmp_path, generated_dump):
    home = tmp_path / "home"
    # Dagster's own instance storage (DAGSTER_HOME) exists before, as it does after any first
    # use: two processes that both create its SQLite schema race inside Dagster, not here.
    dg.DagsterInstance.get().dispose()
    runs = [_cli(home, generated_dump, QUICK_TRAINING) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert not any("lock" in o.lower() and "error" in o.lower() for o in outputs)
    state = _state(home)
    assert state["scored"] == (3000, DUMP_DATE) and state["cleaned"] == 3000
    assert len(list((home / "params").glob("*.msgpack"))) == 1  # trained once, reused once


@pytest.fixture(scope="module")
def big_dump(tmp_path_factory) -> Path:
    """A day-two dump big enough to be killed in the middle of a step."""
    day2 = tmp_path_factory.mktemp("day2")
    generate_dump(day2, posts=100_000, date=D2, seed=3)
    return day2


def _kill_during(proc: subprocess.Popen, step: str, marker: str) -> str:
    """Read the run's log until `marker` appears inside `step`, then SIGKILL the whole run."""
    seen: list[str] = []
    started = False
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        seen.append(line)
        if f'Started execution of step "{step}"' in line:
            started = True
        if started and marker in line:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log = "".join(seen) + proc.stdout.read()  # what it printed before it died, too
            assert f"published {step}" not in log, "the kill came after the step published"
            assert f'Finished execution of step "{step}"' not in log
            return log
        assert time.monotonic() < deadline
    raise AssertionError("run ended before the kill point:\n" + "".join(seen[-40:]))


@pytest.mark.parametrize(
    ("step", "marker", "training"),
    [
        # Markers inside the step with its heavy part still ahead, and no sleep after them (a
        # fast machine finishes a 100k-post step within a second): while DuckDB parses the
        # CSV; as the linear candidate's fit starts; after the scores are written, before the
        # table and the exports are.
        ("cleaned_posts", "reading posts of", QUICK_BIG),
        ("fitted_params", "candidate linear", QUICK_BIG),
        ("scored_posts", "posts in ", QUICK_BIG),
    ],
)
def test_sigkill_mid_step_leaves_the_last_good_outputs(
    tmp_path, generated_dump, big_dump, step, marker, training
):
    src, day2 = tmp_path / "src", big_dump
    src.mkdir()
    for kind in ("posts", "tags"):
        name = f"{kind}-{DUMP_DATE}.csv.gz"
        (src / name).write_bytes((generated_dump / name).read_bytes())
    home = tmp_path / "home"
    assert _run(home, src).success
    before = _state(home)
    params = Path(before["lineage"]["fitted_params"][1]["path"])
    export = home / "exports" / f"score-{DUMP_DATE}.csv.gz"
    export_bytes = export.read_bytes()

    for kind in ("posts", "tags"):  # tomorrow's dump arrives
        (src / f"{kind}-{D2}.csv.gz").write_bytes((day2 / f"{kind}-{D2}.csv.gz").read_bytes())
    _kill_during(_cli(home, src, training), step, marker)

    after = _state(home)
    assert after["scored"] == before["scored"] == (3000, DUMP_DATE)
    assert after["lineage"]["scored_posts"] == before["lineage"]["scored_posts"]
    if step in ("cleaned_posts", "fitted_params"):  # params in use are still the old ones
        assert after["lineage"]["fitted_params"] == before["lineage"]["fitted_params"]
    if step == "cleaned_posts":
        assert after["cleaned"] == 3000
    load_params(params)  # still loadable
    assert export.read_bytes() == export_bytes
    assert not (home / "exports" / f"score-{D2}.csv.gz").exists()

    # The next run completes normally and moves everything to the new dump.
    proc = _cli(home, src, QUICK_BIG)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    final = _state(home)
    assert final["scored"] == (100_000, D2)


def test_diverging_training_fails_and_keeps_the_previous_params(tmp_path, generated_dump):
    home = tmp_path / "home"
    assert _run(home, generated_dump).success
    before = _state(home)
    resources = make_resources(home, str(generated_dump))
    fitted, scored = PIPELINE[4], PIPELINE[5]
    result = dg.materialize(
        PIPELINE, resources=resources, selection=[fitted.key, scored.key],
        run_config=run_config({**QUICK_TRAINING, "learning_rate": 1e30, "grad_clip": 1e30,
                               "additive_solver": "sgd"}),
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("fitted_params")
    assert "at step" in str(failure.error.cause.message if failure.error.cause else failure.error)
    after = _state(home)
    assert after["lineage"]["fitted_params"] == before["lineage"]["fitted_params"]
    assert after["scored"] == before["scored"]
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        outcome, reason = conn.execute(
            "SELECT outcome, reason FROM e6score_builds WHERE asset = 'fitted_params' "
            "ORDER BY id DESC LIMIT 1").fetchone()
    assert outcome == "failed" and "at step" in reason  # the history says why
    assert not list(home.rglob(".*.part"))


def _refit(home: Path, source: Path, training: dict) -> dg.ExecuteInProcessResult:
    fitted, scored = PIPELINE[4], PIPELINE[5]
    return dg.materialize(
        PIPELINE, resources=make_resources(home, str(source)),
        selection=[fitted.key, scored.key], run_config=run_config({**QUICK_TRAINING, **training}),
        raise_on_error=False,
    )


def _blocked(home: Path, before: dict, result) -> dg.AssetCheckEvaluation:
    gate = {e.check_name: e for e in result.get_asset_check_evaluations()}["fit_is_publishable"]
    assert gate.passed is False
    assert not result.asset_materializations_for_node("scored_posts")  # blocked
    after = _state(home)
    assert after["lineage"]["fitted_params"] == before["lineage"]["fitted_params"]
    assert after["scored"] == before["scored"]
    # Dagster is told the version in use, not the rejected one; the history keeps its metrics.
    mat = result.asset_materializations_for_node("fitted_params")[0]
    assert mat.tags["dagster/data_version"] == before["lineage"]["fitted_params"][1]["version"]
    assert mat.metadata["published"].value is False
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        outcome, reason, info = conn.execute(
            "SELECT outcome, reason, info FROM e6score_builds WHERE asset = 'fitted_params' "
            "ORDER BY id DESC LIMIT 1").fetchone()
    assert outcome == "rejected" and "fit_is_publishable" in reason
    assert json.loads(info)["metrics"]["nll"] > 0
    assert len(list((home / "params").glob("*.msgpack"))) == 1  # a rejected fit is not kept
    return gate


def test_a_fit_no_better_than_a_constant_is_not_used(tmp_path, generated_dump):
    home = tmp_path / "home"
    assert _run(home, generated_dump).success
    before = _state(home)
    # Gradient steps of size 0: every candidate stays at its start, a constant mean with a
    # calibrated scale. Selection picks the simplest of equals, the constant, which must not
    # publish.
    training = {"learning_rate": 0.0, "additive_solver": "sgd"}
    gate = _blocked(home, before, _refit(home, generated_dump, training))
    assert gate.metadata["chosen_candidate"].value == "constant"
    assert "not better than a constant" in gate.metadata["reason"].value



def _export_scores(home: Path, date: str) -> pd.Series:
    export = pd.read_csv(home / "exports" / f"score-{date}.csv.gz", usecols=["id", "fav_score"])
    return export.set_index("id")["fav_score"].sort_index()


def _table_scores(home: Path) -> pd.Series:
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        table = conn.execute("SELECT id, fav_score FROM scored_posts").df()
    return table.set_index("id")["fav_score"].sort_index()


def test_sigkill_during_a_re_export_then_a_rerun(tmp_path, big_dump):
    """New params for the same dump: a kill mid-export must not leave the old export current."""
    home = tmp_path / "home"
    first = _cli(home, big_dump, QUICK_BIG)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out[-3000:]
    before = _state(home)
    export = home / "exports" / f"score-{D2}.csv.gz"
    export_bytes = export.read_bytes()

    # Another version of the params (a slightly larger validation slice: other training rows,
    # other scores, the same quality, so the gate lets it through), the same dump date.
    refit = {**QUICK_BIG, "validation_fraction": 0.06}
    _kill_during(_cli(home, big_dump, refit), "scored_posts", "compressing the export")
    after = _state(home)
    assert after["lineage"]["scored_posts"] == before["lineage"]["scored_posts"]
    assert export.read_bytes() == export_bytes  # the published export, untouched
    assert list((home / "tmp" / "scored_posts").iterdir())  # what the kill left behind

    rerun = _cli(home, big_dump, refit)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out[-3000:]
    final = _state(home)
    assert final["lineage"]["scored_posts"][1]["version"] != before["lineage"]["scored_posts"][1][
        "version"]
    # The export is the one of the scores now in the table, not the earlier build's.
    assert export.read_bytes() != export_bytes
    pd.testing.assert_series_equal(_export_scores(home, D2), _table_scores(home),
                                   check_exact=False, rtol=1e-6)
    assert not list(home.rglob("*.part"))
    assert not list((home / "tmp" / "scored_posts").glob("*"))


def test_the_exports_memory_limit_is_restored_after_a_failed_statement(tmp_path):
    with duckdb.connect(str(tmp_path / "x.duckdb"), config={"memory_limit": "2GB"}) as conn:
        def setting() -> str:
            return conn.execute("SELECT current_setting('memory_limit')").fetchone()[0]

        configured = setting()
        with pytest.raises(duckdb.CatalogException), memory_limit(conn, "100MB", restore="2GB"):
            assert setting() == "95.3 MiB"
            conn.execute("SELECT * FROM no_such_table")
        assert setting() == configured  # the configured limit, not its rounded display
