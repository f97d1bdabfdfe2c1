"""A real `dagster dev` (webserver + daemon) on 127.0.0.1 driving the pipeline by itself.

Ingestion is triggered over GraphQL exactly as a user's button or script would; everything
after that (the chain of runs) is the automation sensor's doing. The source is e621's current
layout (``db_exports.json`` and undated files) served on 127.0.0.1.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dagster_graphql import DagsterGraphQLClient

from e6score_dagster_tests.conftest import DUMP_DATE
from e6score_dagster_tests.current_layout import write_current_layout
from e6score_dagster_tests.dagster_dev import DagsterDev
from e6score_dagster_tests.http_server import serve_directory

NEW_DATE = "2026-11-21"
SENSOR_INTERVAL_S = 5

LATEST_QUERY = """
query ($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          label
          ... on TextMetadataEntry { text }
          ... on BoolMetadataEntry { boolValue }
          ... on PathMetadataEntry { path }
        }
      }
    }
  }
}
"""


class LiveDagster(DagsterDev):
    """dagster dev over a dump folder, with a fast automation sensor."""

    def __init__(self, tmp: Path, source: str) -> None:
        super().__init__(tmp, source, {"E6SCORE_AUTOMATION_INTERVAL_S": str(SENSOR_INTERVAL_S)})
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=self.port)

    def latest(self, asset: str) -> dict | None:
        mats = self.gql(LATEST_QUERY, path=[asset])["assetOrError"].get("assetMaterializations")
        if not mats:
            return None
        m = mats[0]
        meta = {e["label"]: e.get("text", e.get("boolValue", e.get("path")))
                for e in m["metadataEntries"]}
        return {"runId": m["runId"], **meta}

    def trigger_ingestion(self) -> str:
        return self.client.submit_job_execution(
            "observe_e621_dump", repository_location_name="e6score_dagster",
            repository_name="__repository__",
        )

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            failed = [r for r in self.runs() if r["status"] == "FAILURE"]
            assert not failed, f"a run failed while waiting for {what}: {failed}"
            time.sleep(2)
        raise TimeoutError(f"timed out waiting for {what}; runs: {self.runs()}")


def _publish(dump: Path, export: Path, date: str, seed: int) -> None:
    """The dump as e621 publishes it today, exported at 07:12 UTC on ``date``."""
    write_current_layout(dump, DUMP_DATE, export, f"{date}T02:12:33.512-05:00", seed=seed)


@pytest.mark.slow
def test_dagster_dev_follows_new_dumps_and_ignores_unchanged_ones(tmp_path, generated_dump):
    """dagster dev trains with its default settings, whatever model selection then picks."""
    export = tmp_path / "export"
    _publish(generated_dump, export, DUMP_DATE, seed=0)
    with serve_directory(export) as url:
        _follow(LiveDagster(tmp_path, url + "db_exports.json"), generated_dump, export)


def _follow(live: LiveDagster, dump: Path, export: Path) -> None:
    try:
        live.wait_ready()
        time.sleep(5)  # let the automation sensor take its first look before anything exists
        live.trigger_ingestion()
        first = live.wait_for(
            lambda: (m := live.latest("scored_posts")) and m["dump_date"] == DUMP_DATE and m,
            timeout=300, what="scored_posts of the first dump",
        )
        params_1 = live.latest("fitted_params")
        assert params_1["dump_date"] == DUMP_DATE and params_1["reused"] is False

        _publish(dump, export, NEW_DATE, seed=1)  # new files under the same names
        live.trigger_ingestion()
        second = live.wait_for(
            lambda: (m := live.latest("scored_posts")) and m["dump_date"] == NEW_DATE and m,
            timeout=300, what="scored_posts of the new dump",
        )
        params_2 = live.latest("fitted_params")
        assert params_2["dump_date"] == NEW_DATE and params_2["reused"] is False
        assert params_2["runId"] != params_1["runId"]
        # The new scores come from the new params (the automation may launch the two assets
        # in one run or in two).
        assert second["params_path"] == params_2["params_path"] != params_1["params_path"]
        assert second["runId"] != first["runId"]

        # No new dump: the observation runs, and nothing else is launched.
        before = {r["runId"] for r in live.runs()}
        observe_run = live.trigger_ingestion()
        live.wait_for(lambda: any(r["runId"] == observe_run and r["status"] == "SUCCESS"
                                  for r in live.runs()), timeout=120, what="the observation")
        time.sleep(3 * SENSOR_INTERVAL_S)  # three automation sensor ticks
        new_runs = [r for r in live.runs() if r["runId"] not in before]
        assert [r["jobName"] for r in new_runs] == ["observe_e621_dump"], new_runs
        assert live.latest("fitted_params")["runId"] == params_2["runId"]
    finally:
        live.stop()
        assert live.proc.poll() is not None
