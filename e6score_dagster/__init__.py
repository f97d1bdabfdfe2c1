"""E6Score as Dagster assets."""

from e6score_dagster.definitions import defs

__all__ = ["defs"]
