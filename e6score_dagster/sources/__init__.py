"""Where dumps come from: e621's export layouts, and verified downloads of their files."""

from e6score_dagster.sources.download import DEFAULT_USER_AGENT, USER_AGENT_ENV, user_agent
from e6score_dagster.sources.dump import (
    Dump,
    DumpAbsent,
    DumpFiles,
    DumpSourceError,
    RemoteFile,
    SourceRefused,
    SourceUnreachable,
    validate_date,
)
from e6score_dagster.sources.listing import parse_dump_name, parse_index_page
from e6score_dagster.sources.source import DumpSource, is_url

__all__ = [
    "DEFAULT_USER_AGENT",
    "USER_AGENT_ENV",
    "Dump",
    "DumpAbsent",
    "DumpFiles",
    "DumpSource",
    "DumpSourceError",
    "RemoteFile",
    "SourceRefused",
    "SourceUnreachable",
    "is_url",
    "parse_dump_name",
    "parse_index_page",
    "user_agent",
    "validate_date",
]
