"""The code location: assets, checks, resources, jobs and schedules."""

from __future__ import annotations

import dagster as dg

from e6score_dagster import automation
from e6score_dagster.assets.clean import cleaned_posts
from e6score_dagster.assets.features import feature_matrix
from e6score_dagster.assets.ingest import e621_dump, raw_dump
from e6score_dagster.assets.model import fitted_params
from e6score_dagster.assets.score import scored_posts
from e6score_dagster.assets.vocabulary import tag_vocabulary
from e6score_dagster.console_log import console_logger
from e6score_dagster.resources import make_resources

PIPELINE = [raw_dump, cleaned_posts, tag_vocabulary, feature_matrix, fitted_params, scored_posts]
# The blocking checks are declared on their assets (`check_specs`) and judged on the staged
# output inside each asset's step, before it is published: see checks.py and stage.py.

e6score_job = dg.define_asset_job(
    "e6score_job",
    selection=dg.AssetSelection.assets(*PIPELINE),
    description="Fetch the current dump and rebuild everything down to scored_posts.",
    # Selecting the logger is what makes Dagster use it (a job's loggers apply only when its
    # run config names them): a deliberate failure then reads as one line.
    config={"loggers": {"console": {"config": {}}}},
)


def build_defs(resources: dict | None = None) -> dg.Definitions:
    observe = automation.observe_job()
    return dg.Definitions(
        assets=[e621_dump, *PIPELINE],
        jobs=[e6score_job, observe],
        schedules=[automation.daily_schedule(observe)],
        sensors=[automation.automation_sensor()],
        resources=resources if resources is not None else make_resources(),
        # The chain is linear, so separate step processes buy no parallelism, only ~4 s of
        # start-up each; concurrent runs are still serialised on DuckDB by the `duckdb` pool.
        executor=dg.in_process_executor,
        loggers={"console": console_logger},
    )


defs = build_defs()
