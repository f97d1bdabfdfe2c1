"""The terminal's view of a run: a deliberate failure (`dagster.Failure`: a wrong or unreachable
source, a refused or corrupt download, a home that cannot be written) is one line saying what
is wrong and what to do.

Dagster's console logger prints every failure with its framework stack, and then the same
stack again for the run, so the one useful line drowns. Unexpected errors keep their stack:
that is a bug, and the stack is what finds it.
"""

from __future__ import annotations

import logging

import dagster as dg

# Dagster's own console format, so the lines read as they always did.
FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"


def _failure_description(event) -> str | None:
    """The description of the user `Failure` behind a step or run failure event, if any."""
    data = getattr(event, "event_specific_data", None)
    first = getattr(data, "first_step_failure_event", None)  # a run failure names its step
    if first is not None:
        return _failure_description(first)
    failure = getattr(data, "user_failure_data", None)
    return getattr(failure, "description", None) if failure is not None else None


class OneLineFailures(logging.Filter):
    """Rewrites records of deliberate failures to one line and drops the echoes that follow
    (downstream steps "not executing", the run repeating the step's error)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, "dagster_meta", None)
        if not meta:
            return True
        event = meta.get("dagster_event")
        description = _failure_description(event) if event is not None else None
        if description is not None:
            step = meta.get("step_key") or getattr(
                getattr(event.event_specific_data, "first_step_failure_event", None),
                "step_key", None,
            )
            if event.is_run_failure:
                record.msg = f"run failed at {step}; the last published outputs stay in use"
            else:
                self.failed = step
                record.msg = f"{step} failed: {description}"
            record.args = ()
            return True
        # Dagster's "Dependencies for step X failed ... Not executing." says nothing new.
        return not (self.failed and event is None and meta.get("orig_message", "").startswith(
            "Dependencies for step"
        ))


@dg.logger(
    {
        "log_level": dg.Field(str, is_required=False, default_value="INFO"),
        "name": dg.Field(str, is_required=False, default_value="dagster"),
    },
    description="Dagster's console logger, with a deliberate failure as one line.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    logger = logging.Logger(config["name"], level=config["log_level"])
    handler = logging.StreamHandler()  # stderr, as Dagster's own console logger
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(OneLineFailures())
    logger.addHandler(handler)
    return logger
