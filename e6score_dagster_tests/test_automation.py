"""Dump versions drive everything: observation, automation, reuse of unchanged stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from e6score_dagster.assets.ingest import e621_dump
from e6score_dagster.definitions import PIPELINE, build_defs
from e6score_dagster.resources import make_resources
from e6score_dagster_tests.conftest import DUMP_DATE, run_config

NEW_DATE = "2026-11-21"
REPO_ROOT = Path(__file__).resolve().parents[1]
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
            PIPELINE, instance=self.instance, resources=self.resources,
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


def _declared_code_versions(package_parent: Path, home: Path) -> dict[str, str]:
    """The code versions the definitions of the package under `package_parent` declare."""
    code = ("import json; from e6score_dagster.definitions import PIPELINE; "
            "print(json.dumps({a.key.path[-1]: a.code_versions_by_key[a.key] for a in PIPELINE}))")
    env = {**os.environ, "PYTHONPATH": str(package_parent), "E6SCORE_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=package_parent,
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_source_edit_changes_the_derived_code_version(world, tmp_path):
    """Editing model/network.py (on a copy of the package) marks what runs it unsynced."""
    copy = tmp_path / "copy"
    shutil.copytree(REPO_ROOT / "e6score_dagster", copy / "e6score_dagster",
                    ignore=shutil.ignore_patterns("__pycache__"))
    original = {a.key.path[-1]: a.code_versions_by_key[a.key] for a in PIPELINE}
    assert _declared_code_versions(copy, tmp_path / "h") == original  # derived, not typed

    network = copy / "e6score_dagster" / "model" / "network.py"
    network.write_text(network.read_text() + "\n\ndef _edited() -> int:\n    return 1\n")
    clean = copy / "e6score_dagster" / "assets" / "clean.py"  # comments do not count
    clean.write_text(clean.read_text().replace("\nimport time\n", "\n# a comment\nimport time\n"))
    edited = _declared_code_versions(copy, tmp_path / "h")
    changed = {k for k in original if edited[k] != original[k]}
    # fitted_params and scored_posts run the network; feature_matrix imports its tag coding.
    assert changed == {"feature_matrix", "fitted_params", "scored_posts"}

    assert world.run().success
    assert world.tick() == {}
    resolver = get_stale_status_resolver(world.instance, PIPELINE)
    assert all(resolver.get_status(k) == StaleStatus.FRESH for k in PIPELINE_KEYS)
    deployed = [a.map_asset_specs(lambda s: s.replace_attributes(
        code_version=edited[s.key.path[-1]])) for a in PIPELINE]
    resolver = get_stale_status_resolver(world.instance, deployed)
    for key in PIPELINE_KEYS:  # "Unsynced" in the UI
        expected = StaleStatus.STALE if key.path[-1] in changed else StaleStatus.FRESH
        assert resolver.get_status(key) == expected, key
    # The automation sensor, after the edit is deployed, requests what runs the edited code,
    # once, and nothing above it.
    world.defs = dg.Definitions(assets=[e621_dump, *deployed], resources=world.resources)
    assert set(world.tick()) == {dg.AssetKey(n) for n in changed}
    # Re-materialising the matrix under its new code version builds a new version, which makes
    # the params built from the old one unsynced in turn (and scored_posts refuses to mix them).
    result = dg.materialize(deployed, instance=world.instance, resources=world.resources,
                            selection=["feature_matrix"])
    assert result.asset_materializations_for_node("feature_matrix")[0].metadata[
        "reused"].value is False
    resolver = get_stale_status_resolver(world.instance, deployed)
    assert resolver.get_status(dg.AssetKey("feature_matrix")) == StaleStatus.FRESH
    assert resolver.get_status(dg.AssetKey("fitted_params")) == StaleStatus.STALE


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


def test_a_missing_export_is_rewritten_not_reused(world):
    assert world.run().success
    export = world.home / "exports" / f"score-{DUMP_DATE}.csv.gz"
    export.unlink()  # as if a run had been killed between the table swap and the export
    again = world.run()
    assert again.success
    meta = again.asset_materializations_for_node("scored_posts")[0].metadata
    assert meta["reused"].value is False
    assert export.exists()
