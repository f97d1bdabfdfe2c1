"""The curation query: the best posts of the current dump, and an e621 search URL for them.

    python -m e6score_dagster.top --k 32 [--rating s] [--ext png,jpg,webp]
        [--tags solo] [--exclude-tags comic,meme] [--exclude-pools] [--include-deleted]
        [--home DIR]
        [--format table|json]

Ranking
-------
Posts are ranked by

    rank_key = fav_score * ln(1 + fav_count)

highest first, ties broken by ascending post id (posts without a score come last).
`fav_score` says how much a post beats what its metadata predicts (the model's probability
that a post with the same metadata gets fewer favourites, ties counted half); the
`ln(1 + fav_count)` factor keeps posts whose high `fav_score` rests on one or two lucky
favourites (a post expected to get 0.1 that got 1) from topping the list, so the head of the
ranking is posts that are both better than expected and actually liked. A post with no
favourites has rank_key 0.

Filters
-------
* deleted posts are left out unless `--include-deleted`;
* `--rating`: one or more of s, q, e (comma list or repeated flag);
* `--ext`: file extensions to keep (png, jpg, webp, ...);
* `--tags`: keep posts having all of these tags; `--exclude-tags`: drop posts having any of
  them (both matched as whole words of each post's `tag_string`; a tag no post of the dump
  has, or a file type no post has, is reported on stderr: most likely a typo);
* `--exclude-pools`: drop posts listed in any pool of the current dump (the pools file named
  by the `raw_dump` lineage; a dump without a pools file is reported on stderr and nothing is
  excluded).

Output is a header line (the dump's date, how many posts match), an aligned table (rank, id,
rating, ext, favs, expected, fav_score, rank_key), then e621 search URLs
`https://e621.net/posts?tags=id:1,2,3`, ids in rank order, at most 100 ids per URL (e621's
limit for an id search); `--format json` prints the same as one JSON object.

The database is opened read-only and only for the duration of the query: DuckDB lets a writer
in only when no reader holds the file, so a pipeline run waits at most for this query. Usage
errors, a missing database or table, and a database locked by a running pipeline end with exit
status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import duckdb

from e6score_dagster.csv_read import DumpFormatError, check_header, read_csv_sql
from e6score_dagster.local_state import (
    DB_FILE,
    MissingUpstreamError,
    default_home,
    read_lineage,
    table_exists,
)
from e6score_dagster.schema import RATINGS

PROG = "python -m e6score_dagster.top"
RANKING = "fav_score * ln(1 + fav_count), highest first; ties by ascending id"
SEARCH_URL = "https://e621.net/posts?tags=id:"
IDS_PER_URL = 100
MATERIALIZE_HINT = "dg launch -m e6score_dagster --job e6score_job"
RATING_WORDS = {"safe": "s", "questionable": "q", "explicit": "e"}
POOL_COLUMNS_NEEDED = ("id", "post_ids")

_temp_names = itertools.count()


class TopError(ValueError):
    """A user-facing problem: bad arguments or missing / unusable inputs."""


def _stderr(message: str) -> None:
    print(f"e6score-top: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- arguments


def split_list(values: str | Iterable[str] | None) -> list[str]:
    """'a,b' / ['a,b', 'c'] / 'a b' -> ['a', 'b', 'c'], lower-cased, empty items dropped."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for v in values:
        for item in re.split(r"[,\s]+", v.strip().lower()):
            if item and item not in out:
                out.append(item)
    return out


def parse_ratings(values: str | Iterable[str] | None) -> list[str]:
    ratings = []
    for r in split_list(values):
        r = RATING_WORDS.get(r, r)
        if r not in RATINGS:
            raise TopError(f"unknown rating {r!r}: use one or more of {', '.join(RATINGS)}")
        if r not in ratings:
            ratings.append(r)
    return ratings


def parse_exts(values: str | Iterable[str] | None) -> list[str]:
    return [e.lstrip(".") for e in split_list(values) if e.lstrip(".")]


# --------------------------------------------------------------------------- the query


def _raw_dump_lineage(conn: duckdb.DuckDBPyConnection) -> tuple[str, dict[str, Any]]:
    try:
        return read_lineage(conn, "raw_dump")
    except MissingUpstreamError as exc:
        raise TopError(
            "`raw_dump` has no lineage record: cannot find the current dump's pools"
        ) from exc


def _load_pool_posts(
    conn: duckdb.DuckDBPyConnection, scored_dump: str | None, warn: Callable[[str], None]
) -> str | None:
    """A temp table of the post ids in any pool of the current dump; None if it has no pools."""
    dump_date, info = _raw_dump_lineage(conn)
    if scored_dump and dump_date != scored_dump:
        warn(f"pools are from dump {dump_date} but the scores are from {scored_dump}")
    pools = info.get("pools")
    if not pools:
        warn(f"dump {dump_date} has no pools file; --exclude-pools excludes nothing")
        return None
    path = Path(pools)
    if not path.is_file():
        raise TopError(f"the pools file of dump {dump_date} is gone: {path}")
    try:
        header = check_header(path, POOL_COLUMNS_NEEDED)
    except (DumpFormatError, OSError, EOFError) as e:
        raise TopError(f"cannot read pools file {path}: {e}") from None
    n = next(_temp_names)
    table, rejects = f"_top_pool_posts_{n}", f"_top_pool_rejects_{n}"
    conn.execute(
        f"""
        CREATE TEMP TABLE {table} AS
        SELECT DISTINCT TRY_CAST(trim(item) AS BIGINT) AS id, trim(item) AS raw
        FROM (
            SELECT unnest(string_split(trim(coalesce(post_ids, ''), '{{}} '), ',')) AS item
            FROM {read_csv_sql(path, header, rejects)}
        )
        WHERE trim(item) <> ''
        """
    )
    bad_lines = conn.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT scan_id, file_id, line FROM {rejects})"
    ).fetchone()[0]
    if bad_lines:
        warn(f"{bad_lines} line(s) of {path.name} could not be parsed; their posts stay in")
    bad_ids = conn.execute(f"SELECT count(*) FROM {table} WHERE id IS NULL").fetchone()[0]
    if bad_ids:
        warn(f"{bad_ids} pool member(s) in {path.name} are not post ids and were ignored")
    for t in (rejects, f"{rejects}_scan"):
        conn.execute(f"DROP TABLE IF EXISTS temp.{t}")
    return table


def top_posts(
    conn: duckdb.DuckDBPyConnection,
    k: int,
    ratings: Sequence[str] | None = None,
    exts: Sequence[str] | None = None,
    exclude_tags: Sequence[str] | None = None,
    exclude_pools: bool = False,
    include_deleted: bool = False,
    *,
    tags: Sequence[str] | None = None,
    warn: Callable[[str], None] = _stderr,
) -> list[dict[str, Any]]:
    """The top `k` rows of `scored_posts` by `fav_score * ln(1 + fav_count)`, ties by id.

    Each dict has rank, id, rating, file_ext, fav_count, expected_fav_count, fav_score,
    fav_zscore, rank_key, is_deleted, created_at (ISO string), dump_date (ISO string) and
    matched (how many posts pass the filters). Empty / None filters filter nothing; `tags`
    keeps posts having all of them. A filter value that matches nothing known (a file type no
    post has, a tag not in the vocabulary) is reported through `warn`. Raises `TopError` for
    bad arguments or missing tables.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TopError(f"k must be a whole number of at least 1, got {k!r}")
    ratings = parse_ratings(ratings)
    exts = parse_exts(exts)
    exclude_tags = split_list(exclude_tags)
    tags = split_list(tags)
    if not table_exists(conn, "scored_posts"):
        raise TopError(f"the database has no scored_posts table: run `{MATERIALIZE_HINT}` first")
    _warn_unknown(conn, exts, {"--tags": tags, "--exclude-tags": exclude_tags}, warn)
    where = ["TRUE"]
    params: list[Any] = []
    if not include_deleted:
        where.append("NOT coalesce(s.is_deleted, FALSE)")
    if ratings:
        where.append("list_contains(?::VARCHAR[], s.rating)")
        params.append(ratings)
    if exts:
        where.append("list_contains(?::VARCHAR[], lower(s.file_ext))")
        params.append(exts)
    if (exclude_tags or tags) and not table_exists(conn, "cleaned_posts"):
        raise TopError("tag filters need the cleaned_posts table, which is missing")
    if exclude_tags or tags:  # one pass over the tag strings for both filters
        wanted = [f"({_has_tags_sql(tags, ' AND ')})"] if tags else []
        if exclude_tags:
            wanted.append(f"NOT ({_has_tags_sql(exclude_tags, ' OR ')})")
        where.append("s.id IN (SELECT c.id FROM cleaned_posts c WHERE "
                     + " AND ".join(wanted) + ")")
        params.extend([*(tags or []), *(exclude_tags or [])])
    pool_table = None
    if exclude_pools:
        row = conn.execute(
            "SELECT strftime(max(dump_date), '%Y-%m-%d') FROM scored_posts"
        ).fetchone()
        pool_table = _load_pool_posts(conn, row[0] if row else None, warn)
        if pool_table:
            where.append(f"NOT EXISTS (SELECT 1 FROM temp.{pool_table} p WHERE p.id = s.id)")
    params.append(k)
    try:
        cur = conn.execute(
            f"""
            SELECT s.id, s.rating, s.file_ext, s.fav_count, s.expected_fav_count, s.fav_score,
                   s.fav_zscore, s.fav_score * ln(1 + s.fav_count) AS rank_key, s.is_deleted,
                   strftime(s.created_at, '%Y-%m-%dT%H:%M:%S.%f') AS created_at,
                   strftime(s.dump_date, '%Y-%m-%d') AS dump_date, count(*) OVER () AS matched
            FROM scored_posts s
            WHERE {" AND ".join(where)}
            ORDER BY rank_key DESC NULLS LAST, s.id
            LIMIT ?
            """,
            params,
        )
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    finally:
        if pool_table:
            conn.execute(f"DROP TABLE IF EXISTS temp.{pool_table}")
    return [{"rank": i, **dict(zip(names, r, strict=True))} for i, r in enumerate(rows, 1)]


def _has_tags_sql(tags: list[str], join: str) -> str:
    """Whether `c.tag_string` holds the bound tags (all: " AND ", any: " OR "), as a word search
    in the space-separated string: no per-post list, so it stays fast at millions of posts."""
    return join.join(
        "contains(' ' || coalesce(c.tag_string, '') || ' ', ' ' || ? || ' ')" for _ in tags
    )


def _warn_unknown(
    conn: duckdb.DuckDBPyConnection,
    exts: Sequence[str],
    tag_filters: dict[str, Sequence[str]],
    warn: Callable[[str], None],
) -> None:
    """A filter value nothing in this dump has is most likely a typo: say so."""
    if exts:
        known = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT lower(file_ext) FROM scored_posts "
                "WHERE file_ext IS NOT NULL ORDER BY 1"
            ).fetchall()
        ]
        for ext in exts:
            if ext not in known:
                warn(f"warning: no post has file type {ext!r} (known: {', '.join(known)})")
    asked = sorted({t for values in tag_filters.values() for t in values})
    if not asked or not table_exists(conn, "tag_vocabulary"):
        return
    present = {
        r[0]
        for r in conn.execute(
            "SELECT name FROM tag_vocabulary WHERE list_contains(?::VARCHAR[], name)", [asked]
        ).fetchall()
    }
    for flag, values in tag_filters.items():
        for tag in values:
            if tag not in present:
                warn(f"warning: {flag} {tag}: no post of this dump has this tag")


# --------------------------------------------------------------------------- output


def search_urls(ids: Sequence[int], per_url: int = IDS_PER_URL) -> list[str]:
    """e621 search URLs for `ids` in order, at most `per_url` ids each."""
    return [
        SEARCH_URL + ",".join(str(i) for i in ids[start : start + per_url])
        for start in range(0, len(ids), per_url)
    ]


def _fmt(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is not None:
        return f"{value:.{digits}f}"
    return str(value)


def header_line(posts: Sequence[dict[str, Any]], k: int) -> str:
    """What the list is: which dump, how many posts matched, how they are ranked."""
    if not posts:
        return "no post matches the filters"
    matched = posts[0]["matched"]
    return (
        f"dump {posts[0]['dump_date']}: {matched:,} post(s) match the filters; top "
        f"{min(k, matched):,} by rank_key = fav_score * ln(1 + fav_count)"
    )


def format_table(posts: Sequence[dict[str, Any]]) -> str:
    header = ("rank", "id", "rating", "ext", "favs", "expected", "fav_score", "rank_key")
    right = (True, True, False, False, True, True, True, True)
    body = [
        (
            _fmt(p["rank"]),
            _fmt(p["id"]),
            _fmt(p["rating"]),
            _fmt(p["file_ext"]),
            _fmt(p["fav_count"]),
            _fmt(p["expected_fav_count"], 1),
            _fmt(p["fav_score"], 4),
            _fmt(p["rank_key"], 3),
        )
        for p in posts
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        ).rstrip()
        for row in (header, *body)
    ]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        _stderr(f"error: {message} (see --help)")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Print the top posts of the current dump by fav_score and an e621 search "
        "URL for them. Ranking: fav_score * ln(1 + fav_count), highest first, ties by "
        "ascending id. fav_score says how much a post beats what its metadata predicts; the "
        "log favourite count keeps posts with one lucky favourite from topping the list. "
        "Deleted posts are left out unless --include-deleted.",
        epilog="Search URLs hold at most 100 ids each (e621's limit), so k > 100 prints "
        "several. Exit status 2 on bad arguments, a missing database or table, or a database "
        "locked by a running pipeline.",
    )
    p.add_argument("-k", "--k", type=int, default=32, help="how many posts (default 32)")
    p.add_argument(
        "--rating",
        action="append",
        metavar="R[,R]",
        help="keep only these ratings: s, q, e (comma list or repeated flag)",
    )
    p.add_argument(
        "--ext",
        action="append",
        metavar="EXT[,EXT]",
        help="keep only these file extensions, e.g. png,jpg,webp",
    )
    p.add_argument(
        "--exclude-tags",
        action="append",
        metavar="TAG[,TAG]",
        help="drop posts having any of these tags, e.g. comic,meme",
    )
    p.add_argument(
        "--tags",
        action="append",
        metavar="TAG[,TAG]",
        help="keep only posts having all of these tags, e.g. solo,fox",
    )
    p.add_argument(
        "--exclude-pools",
        action="store_true",
        help="drop posts that are in any pool of the current dump",
    )
    p.add_argument(
        "--include-deleted", action="store_true", help="keep deleted posts (left out by default)"
    )
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help=f"state folder holding {DB_FILE} (default: $E6SCORE_HOME, else data/)",
    )
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="an aligned table and URLs (default), or one JSON object for scripts",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to retry while a running pipeline holds the database lock (default 3)",
    )
    return p


def _connect(db: Path, wait_s: float) -> duckdb.DuckDBPyConnection:
    if not db.is_file():
        raise TopError(
            f"nothing materialised yet ({db} does not exist): run `{MATERIALIZE_HINT}` first"
        )
    deadline = time.monotonic() + max(wait_s, 0.0)
    while True:
        try:
            return duckdb.connect(str(db), read_only=True)
        except duckdb.Error as e:
            message = str(e)
            if "lock" not in message.lower():
                raise TopError(f"cannot open {db}: {message.splitlines()[0]}") from None
            if time.monotonic() >= deadline:
                raise TopError(
                    f"{db} is locked by a running pipeline (another process is writing it); "
                    "retry when the run has finished, or pass --wait SECONDS"
                ) from None
            time.sleep(0.25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already reported)
        return int(e.code or 0)
    try:
        if args.k < 1:
            raise TopError(f"--k must be at least 1, got {args.k}")
        ratings = parse_ratings(args.rating)
        exts = parse_exts(args.ext)
        exclude_tags = split_list(args.exclude_tags)
        tags = split_list(args.tags)
        home = args.home.expanduser().resolve() if args.home else default_home()
        conn = _connect(home / DB_FILE, args.wait)
        try:
            posts = top_posts(
                conn,
                args.k,
                ratings,
                exts,
                exclude_tags,
                args.exclude_pools,
                args.include_deleted,
                tags=tags,
            )
        finally:
            conn.close()
    except TopError as e:
        _stderr(f"error: {e}")
        return 2
    except duckdb.Error as e:
        _stderr(f"error: query failed: {str(e).splitlines()[0]}")
        return 2
    urls = search_urls([p["id"] for p in posts])
    if len(posts) < args.k:
        _stderr(f"only {len(posts)} post(s) match the filters")
    if args.format == "json":
        out = {
            "dump_date": posts[0]["dump_date"] if posts else None,
            "matched": posts[0]["matched"] if posts else 0,
            "ranking": RANKING,
            "k": args.k,
            "filters": {
                "ratings": ratings,
                "exts": exts,
                "tags": tags,
                "exclude_tags": exclude_tags,
                "exclude_pools": args.exclude_pools,
                "include_deleted": args.include_deleted,
            },
            "posts": posts,
            "urls": urls,
        }
        print(json.dumps(out, indent=2, default=_json_default))
        return 0
    print(header_line(posts, args.k))
    if posts:
        print(format_table(posts))
        print()
        print("\n".join(urls))
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
