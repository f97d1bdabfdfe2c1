"""Dump versions drive everything: observation, automation, reuse of unchanged stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from e6score_dagster.assets.ingest import e621_dump
from e6score_dagster.definitions import CHECKS, PIPELINE, build_defs
from e6score_dagster.resources import StateDir, make_resources
from e6score_dagster_tests.conftest import DUMP_DATE, run_config

NEW_DATE = "2026-11-21"
PIPELINE_KEYS = {a.key for a in PIPELINE}


def copy_dump(src: Path, dst: Path, date: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for kind in ("posts", "tags"):
        shutil.copy(src / f"{kind}-{DUMP_DATE}.csv.gz", dst / f"{kind}-{date}.csv.gz")


class World:
    """One Dagster instance, one dump folder, the real definitions over them."""

    def __init__(self, instance: dg.DagsterInstance, home: Path, source: Path) -> None:
        self.instance, self.home, self.source = instance, home, source
        self.resources = make_resources(home, str(source))
        self.defs = build_defs(self.resources)
        self.cursor = None

    def observe(self) -> str:
        job = self.defs.resolve_job_def("observe_e621_dump")
        result = job.execute_in_process(instance=self.instance)
        assert result.success
        obs = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
        return obs[0].asset_observation_data.asset_observation.tags["dagster/data_version"]

    def tick(self) -> dict[dg.AssetKey, int]:
        """One evaluation of the automation sensor: what it would request."""
        res = dg.evaluate_automation_conditions(
            defs=self.defs, instance=self.instance, cursor=self.cursor
        )
        self.cursor = res.cursor
        return {k: n for k in PIPELINE_KEYS if (n := res.get_num_requested(k))}

    def run(self) -> dg.ExecuteInProcessResult:
        """What the requested run does: materialise the chain (and its checks)."""
        return dg.materialize(
            [*PIPELINE, *CHECKS], instance=self.instance, resources=self.resources,
            run_config=run_config(),
        )

    def scored(self) -> tuple[str, str]:
        with duckdb.connect(str(self.home / "e6score.duckdb"), read_only=True) as conn:
            date = conn.execute("SELECT DISTINCT strftime(dump_date, '%Y-%m-%d') "
                                "FROM scored_posts").fetchall()
            params = conn.execute("SELECT json_extract_string(info, '$.params') "
                                  "FROM e6score_lineage WHERE asset = 'scored_posts'").fetchone()
        assert len(date) == 1
        return date[0][0], params[0]


@pytest.fixture()
def world(tmp_path, generated_dump):
    copy_dump(generated_dump, tmp_path / "src", DUMP_DATE)
    with dg.instance_for_test() as instance:
        yield World(instance, tmp_path / "home", tmp_path / "src")


def test_new_dump_runs_the_chain_once_and_an_unchanged_one_nothing(world):
    assert world.tick() == {}  # the sensor's first tick, before anything was observed
    v1 = world.observe()
    assert world.tick() == {k: 1 for k in PIPELINE_KEYS}
    first = world.run()
    assert first.success
    assert world.tick() == {}
    assert world.observe() == v1  # re-observing an unchanged source: same version
    assert world.tick() == {}
    date, params_v1 = world.scored()
    assert date == DUMP_DATE

    copy_dump(world.source, world.source, NEW_DATE)  # tomorrow's dump appears
    v2 = world.observe()
    assert v2 != v1
    assert world.tick() == {k: 1 for k in PIPELINE_KEYS}
    second = world.run()
    assert second.success
    date, params_v2 = world.scored()
    assert date == NEW_DATE and params_v2 != params_v1
    assert NEW_DATE in Path(params_v2).name
    meta = second.asset_materializations_for_node("fitted_params")[0].metadata
    assert meta["reused"].value is False and meta["built_from"].value
    assert Path(params_v1).exists()  # params of earlier versions stay loadable


def test_rerun_on_unchanged_dump_reuses_every_stage(world):
    assert world.run().success
    params = sorted((world.home / "params").glob("*.msgpack"))
    mtimes = {p: p.stat().st_mtime_ns for p in (world.home / "dumps").rglob("*.csv.gz")}
    again = world.run()
    assert again.success
    for asset in PIPELINE:
        meta = again.asset_materializations_for_node(asset.key.path[-1])[0].metadata
        if asset.key.path[-1] != "raw_dump":
            assert meta["reused"].value is True, asset.key
    assert sorted((world.home / "params").glob("*.msgpack")) == params  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing downloaded
    # Same data versions as before, so nothing downstream would be triggered.
    for asset in PIPELINE:
        versions = [
            m.tags["dagster/data_version"]
            for r in (world.instance.fetch_materializations(asset.key, limit=2).records)
            for m in [r.asset_materialization]
        ]
        assert len(set(versions)) == 1, asset.key


def test_code_version_change_reruns_that_asset_and_its_descendants(world):
    assert world.run().success
    assert world.tick() == {}
    resolver = get_stale_status_resolver(world.instance, PIPELINE)
    assert all(resolver.get_status(k) == StaleStatus.FRESH for k in PIPELINE_KEYS)

    bumped = [
        a.map_asset_specs(lambda s: s.replace_attributes(code_version="999"))
        if a.key.path == ["tag_vocabulary"] else a
        for a in PIPELINE
    ]
    resolver = get_stale_status_resolver(world.instance, bumped)
    assert resolver.get_status(dg.AssetKey("tag_vocabulary")) == StaleStatus.STALE  # "Unsynced"
    assert resolver.get_status(dg.AssetKey("cleaned_posts")) == StaleStatus.FRESH
    # The automation sensor, after the code change is deployed, requests the changed asset and
    # everything below it, once, and nothing above it.
    world.defs = dg.Definitions(assets=[e621_dump, *bumped], resources=world.resources)
    assert set(world.tick()) == {dg.AssetKey(n) for n in (
        "tag_vocabulary", "feature_matrix", "fitted_params", "scored_posts")}
    # Re-materialising it gives a new data version, which makes its child unsynced in turn.
    assert dg.materialize(bumped[2:3], instance=world.instance, resources=world.resources,
                          selection=["tag_vocabulary"]).success
    resolver = get_stale_status_resolver(world.instance, bumped)
    assert resolver.get_status(dg.AssetKey("tag_vocabulary")) == StaleStatus.FRESH
    assert resolver.get_status(dg.AssetKey("feature_matrix")) == StaleStatus.STALE


def test_schedule_tick_requests_the_observation(world, monkeypatch):
    schedule = world.defs.resolve_schedule_def("daily_dump_check")
    assert schedule.cron_schedule == "0 6 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    with dg.build_schedule_context(instance=world.instance) as ctx:
        requests = schedule.evaluate_tick(ctx).run_requests
    assert len(requests) == 1
    assert schedule.job_name == "observe_e621_dump"
    sensor = world.defs.resolve_sensor_def("e6score_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    monkeypatch.setenv("E6SCORE_SCHEDULE_CRON", "15 3 * * *")
    assert build_defs(world.resources).resolve_schedule_def(
        "daily_dump_check").cron_schedule == "15 3 * * *"


def test_old_dumps_are_pruned_only_behind_a_successful_newer_one(tmp_path):
    state = StateDir(home=str(tmp_path), keep_dumps=3)
    dates = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05"]
    for d in dates:
        (state.dumps / d).mkdir()
    # The dump just scored is kept even when it is not among the newest three.
    assert state.prune_dumps(keep_through="2026-01-02") == ["2026-01-01"]
    assert state.prune_dumps(keep_through="2026-01-05") == ["2026-01-02"]
    assert sorted(p.name for p in state.dumps.iterdir()) == dates[2:]


def test_a_missing_export_is_rewritten_not_reused(world):
    assert world.run().success
    export = world.home / "exports" / f"score-{DUMP_DATE}.csv.gz"
    export.unlink()  # as if a run had been killed between the table swap and the export
    again = world.run()
    assert again.success
    meta = again.asset_materializations_for_node("scored_posts")[0].metadata
    assert meta["reused"].value is False
    assert export.exists()
