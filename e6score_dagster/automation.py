"""When things run: a daily look at the source, and re-materialisation on new data versions."""

import os

import dagster as dg

# Eager, but "updated" means "its data version changed": re-observing an unchanged dump, or
# re-running a stage whose inputs did not change, triggers nothing downstream. A deployed code
# change of a stage also re-runs it (and so, through its new data version, its descendants).
ON_NEW_DATA_VERSION = dg.AutomationCondition.eager().replace(
    "newly_updated", dg.AutomationCondition.data_version_changed()
) | (
    dg.AutomationCondition.code_version_changed()
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.in_progress()
)

DEFAULT_CRON = "0 6 * * *"  # e621 publishes its export once a day; 06:00 UTC is after that


def observe_job():
    # An observable source asset is selected by key string, not by object.
    return dg.define_asset_job(
        "observe_e621_dump",
        selection=dg.AssetSelection.assets("e621_dump"),
        description="Look at the dump source; a new dump version triggers the pipeline.",
    )


def daily_schedule(job) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="daily_dump_check",
        job=job,
        cron_schedule=os.environ.get("E6SCORE_SCHEDULE_CRON", DEFAULT_CRON),
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Observes e621_dump daily (cron from E6SCORE_SCHEDULE_CRON).",
    )


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        "e6score_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=int(os.environ.get("E6SCORE_AUTOMATION_INTERVAL_S", "30")),
        description="Requests the pipeline's assets when their inputs' data versions change.",
    )
