"""Quoting for the few SQL fragments built from data (column names, paths, dates, config).

DuckDB takes no bind parameters inside table-function arguments or DDL, so values that come
from a file header, a path or a setting are quoted here, in one place, and nowhere by hand.
"""

from __future__ import annotations


class UnsafeSqlText(ValueError):
    """A value that cannot be quoted safely (it holds a NUL character)."""


def _checked(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise UnsafeSqlText(f"{what} must be text, not {type(value).__name__}")
    if "\x00" in value:
        raise UnsafeSqlText(f"{what} {value!r} holds a NUL character")
    return value


def ident(name: str) -> str:
    """A double-quoted SQL identifier: `a"b` -> `"a""b"`."""
    return '"' + _checked(name, "identifier").replace('"', '""') + '"'


def literal(value: str) -> str:
    """A single-quoted SQL string literal: `it's` -> `'it''s'`."""
    return "'" + _checked(str(value) if not isinstance(value, str) else value,
                          "literal").replace("'", "''") + "'"


def tag_tokens_sql(column: str = "tag_string") -> str:
    """The tags of a `tag_string` for bulk reading: `unnest` it and drop `''`.

    `cleaned_posts` stores the export's `tag_string` and not a list: writing a list of ~30
    strings per post costs DuckDB more than parsing the whole CSV (issue 14). No dedup
    (`list_distinct` costs four times the split at a million posts): e621 writes each tag
    once, separated by single spaces; a malformed row with a repeated tag counts it once per
    occurrence.
    """
    return f"string_split(trim({column}), ' ')"
