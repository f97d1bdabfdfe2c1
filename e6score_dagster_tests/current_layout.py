"""Test data in e621's current export layout, made from a dump in the old dated layout.

``write_current_layout`` turns ``posts-DATE.csv.gz`` / ``tags-DATE.csv.gz`` (e.g. from
``e6score_dagster.synthetic.generate_dump``) into ``posts.csv.gz`` (32 columns) and
``tags.csv.gz`` (7 columns) written with PostgreSQL's ``COPY ... CSV HEADER`` conventions, plus
``db_exports.json`` as e621ng's ``DbExportBlueprint`` renders it. The index's urls start with
``ORIGIN``, which ``http_server.serve_directory`` replaces by its own address.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import random
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from e6score_dagster.schema import POSTS_ALL_COLUMNS, POSTS_COLUMNS, TAGS_COLUMNS, TAGS_NEW_COLUMNS
from e6score_dagster_tests.http_server import EXPORT_PREFIX, INDEX_ORIGIN

ORIGIN = INDEX_ORIGIN
# Declared NOT NULL DEFAULT '' in e621ng: an empty value is an empty string, written "".
NOT_NULL_TEXT = frozenset({"source", "description", "tag_string", "md5", "name"})
TIMESTAMPS = frozenset({"created_at", "updated_at", "last_noted_at", "last_commented_at"})


def pg_timestamp(value: str) -> str:
    """PostgreSQL's text form: trailing zeros of the fraction trimmed, no fraction if zero."""
    if "." not in value:
        return value
    head, frac = value.split(".", 1)
    frac = frac.rstrip("0")
    return f"{head}.{frac}" if frac else head


def pg_field(value: str | None, column: str) -> str:
    """One CSV field as PostgreSQL writes it: NULL empty and unquoted, "" for an empty string,
    quotes only where needed, inner quotes doubled."""
    if value is None or (value == "" and column not in NOT_NULL_TEXT):
        return ""
    if column in TIMESTAMPS:
        value = pg_timestamp(value)
    if value == "" or any(ch in value for ch in ',"\r\n') or value == "\\.":
        return '"' + value.replace('"', '""') + '"'
    return value


def pg_csv(header: Sequence[str], rows: Iterable[Sequence[str | None]]) -> bytes:
    out = io.StringIO()
    out.write(",".join(header) + "\n")
    for row in rows:
        out.write(",".join(pg_field(v, c) for v, c in zip(row, header, strict=True)) + "\n")
    return gzip.compress(out.getvalue().encode("utf-8"), mtime=0)


def _rows(path: Path) -> Iterator[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh)


def _later(ts: str, rng: random.Random, max_days: float) -> str:
    base = dt.datetime.fromisoformat(ts)
    later = base + dt.timedelta(seconds=rng.uniform(60, max_days * 86400))
    return later.isoformat(sep=" ", timespec="microseconds")


def current_posts(old_posts: Path, seed: int = 0) -> bytes:
    """The 32-column posts export, with realistic bg_color, last_noted_at, last_commented_at."""
    rng = random.Random(seed)
    rows = []
    for row in _rows(old_posts):
        new = {
            "bg_color": rng.choice(["ffffff", "000000", "1f2c43"]) if rng.random() < 0.05
            else None,
            "last_noted_at": _later(row["created_at"], rng, 400) if rng.random() < 0.03 else None,
            "last_commented_at": (_later(row["created_at"], rng, 900)
                                  if (row.get("comment_count") or "0") not in ("", "0") else None),
        }
        rows.append([row[c] for c in POSTS_COLUMNS] + [new[c] for c in POSTS_ALL_COLUMNS[29:]])
    return pg_csv(POSTS_ALL_COLUMNS, rows)


def current_tags(old_tags: Path, seed: int = 0) -> bytes:
    """The 7-column tags export: created_at, updated_at and is_locked added."""
    rng = random.Random(seed + 1)
    header = TAGS_COLUMNS + TAGS_NEW_COLUMNS
    rows = []
    for row in _rows(old_tags):
        created = dt.datetime(2007, 2, 10) + dt.timedelta(seconds=rng.uniform(0, 19 * 365 * 86400))
        updated = created + dt.timedelta(seconds=rng.uniform(0, 86400 * 365))
        rows.append([row[c] for c in TAGS_COLUMNS] + [
            created.isoformat(sep=" ", timespec="microseconds"),
            updated.isoformat(sep=" ", timespec="microseconds"),
            "t" if rng.random() < 0.01 else "f",
        ])
    return pg_csv(header, rows)


def entry(folder: Path, name: str, updated_at: str, checksum: bool = True) -> dict:
    """One index entry for ``folder/NAME.csv.gz``, as e621ng's blueprint renders it."""
    data = (folder / f"{name}.csv.gz").read_bytes()
    return {
        "name": name,
        "file_name": f"{name}.csv.gz",
        "file_size": len(data),
        "checksum": hashlib.sha256(data).hexdigest() if checksum else None,
        "updated_at": updated_at,
        "url": f"{ORIGIN}{EXPORT_PREFIX}{name}.csv.gz",
    }


def write_index(folder: Path, updated_at: str, **overrides: dict) -> list[dict]:
    """``db_exports.json`` for every ``*.csv.gz`` in ``folder``; ``overrides`` by export name
    replace fields of its entry (a wrong checksum, a null one, another url...)."""
    names = sorted(p.name.removesuffix(".csv.gz") for p in folder.glob("*.csv.gz"))
    entries = [{**entry(folder, n, updated_at), **overrides.get(n, {})} for n in names]
    (folder / "db_exports.json").write_text(json.dumps(entries, indent=None))
    return entries


def write_current_layout(old_dir: Path, date: str, out: Path, updated_at: str,
                         seed: int = 0, aliases: bool = True) -> Path:
    """The current layout of the old-layout dump ``old_dir/*-DATE.csv.gz`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "posts.csv.gz").write_bytes(current_posts(old_dir / f"posts-{date}.csv.gz", seed))
    (out / "tags.csv.gz").write_bytes(current_tags(old_dir / f"tags-{date}.csv.gz", seed))
    pools = old_dir / f"pools-{date}.csv.gz"
    if pools.exists():
        shutil.copy(pools, out / "pools.csv.gz")
    if aliases:
        header = ("id", "antecedent_name", "consequent_name", "created_at", "status")
        (out / "tag_aliases.csv.gz").write_bytes(
            pg_csv(header, [["1", "kitty", "cat", "2010-01-01 00:00:00.5", "active"]]))
    write_index(out, updated_at)
    return out
