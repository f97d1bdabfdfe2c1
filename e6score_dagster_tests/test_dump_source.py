"""DumpSource against a real HTTP server on 127.0.0.1 and real gzip files."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import pytest

from e6score_dagster.schema import POOLS_COLUMNS, POSTS_COLUMNS, TAGS_COLUMNS, dump_file_name
from e6score_dagster.sources import (
    DumpFiles,
    DumpSource,
    DumpSourceError,
    SourceUnreachable,
    is_url,
    parse_index_page,
    validate_date,
)
from e6score_dagster_tests.http_server import Faults, serve_directory

HEADERS = {"posts": POSTS_COLUMNS, "tags": TAGS_COLUMNS, "pools": POOLS_COLUMNS}


def gz_bytes(kind: str, rows: int = 3) -> bytes:
    lines = [",".join(HEADERS[kind])]
    for i in range(1, rows + 1):
        lines.append(",".join(f'"x, ""{i}"" ü"' if c == "description" else str(i)
                              for c in HEADERS[kind]))
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def write_dump(folder: Path, date: str, kinds: tuple[str, ...] = ("posts", "tags")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        (folder / dump_file_name(kind, date)).write_bytes(gz_bytes(kind))


def days_ago(n: int) -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=n)).isoformat()


def file_gets(log: list[tuple[str, str]]) -> list[str]:
    """Dump files downloaded (not the listing, nor the look for a current-layout index)."""
    return [path for method, path in log
            if method == "GET" and path not in ("/", "/db_exports.json")]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    write_dump(folder, "2024-01-30", ("posts", "tags", "pools"))
    write_dump(folder, "2024-01-31", ("posts",))  # newest, but incomplete
    write_dump(folder, "2024-01-29", ("tags",))
    (folder / "posts-2024-02-30.csv.gz").write_bytes(gz_bytes("posts"))  # not a real date
    (folder / "posts-2024-02-01.csv").write_bytes(b"id\n")
    (folder / "tag_aliases-2024-02-01.csv.gz").write_bytes(b"")
    return folder


def test_is_url() -> None:
    assert is_url("https://e621.net/db_export/")
    assert is_url("HTTP://127.0.0.1:8000")
    assert not is_url("/data/dumps")
    assert not is_url("data/sample")
    assert not is_url("ftp://example.com/")


@pytest.mark.parametrize("bad", ["2024-02-30", "2024-1-01", "20240101", "2024-01-01\n",
                                 "../2024-01-01", "２０２４-01-01", "", "2024-13-01"])
def test_invalid_dates_rejected(bad: str, tmp_path: Path, src: Path) -> None:
    with pytest.raises(DumpSourceError, match="invalid dump date"):
        validate_date(bad)
    with pytest.raises(DumpSourceError, match="invalid dump date"):
        DumpSource(str(src)).fetch(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_valid_date_accepted() -> None:
    assert validate_date("2024-02-29") == "2024-02-29"


def test_local_newest_common_date(src: Path) -> None:
    source = DumpSource(str(src))
    assert source.available_dates() == {
        "posts": {"2024-01-30", "2024-01-31"},
        "tags": {"2024-01-29", "2024-01-30"},
        "pools": {"2024-01-30"},
    }
    assert source.newest_date() == "2024-01-30"


def test_local_missing_or_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DumpSourceError, match="does not exist"):
        DumpSource(str(tmp_path / "nope")).newest_date()
    write_dump(tmp_path / "only_posts", "2024-01-30", ("posts",))
    with pytest.raises(DumpSourceError, match="both a posts and a tags"):
        DumpSource(str(tmp_path / "only_posts")).newest_date()


def test_local_fetch_copies_and_verifies(src: Path, tmp_path: Path) -> None:
    files = DumpSource(str(src)).fetch("2024-01-30", tmp_path / "dest")
    assert files.posts == tmp_path / "dest" / "2024-01-30" / "posts-2024-01-30.csv.gz"
    for kind in ("posts", "tags", "pools"):
        got = getattr(files, kind)
        assert got.read_bytes() == (src / got.name).read_bytes()
    assert files.sizes() == {k: (src / dump_file_name(k, "2024-01-30")).stat().st_size
                             for k in ("posts", "tags", "pools")}


def test_http_index_listing(src: Path) -> None:
    with serve_directory(src) as url:
        assert DumpSource(url).available_dates() == DumpSource(str(src)).available_dates()
        assert DumpSource(url.rstrip("/")).newest_date() == "2024-01-30"


def test_index_parser_ignores_links_outside_the_folder() -> None:
    base = "https://e621.net/db_export/"
    page = """<html><body><pre>
    <a href="../">../</a>
    <a href="posts-2024-01-31.csv.gz">posts-2024-01-31.csv.gz</a>
    <a href="/db_export/tags-2024-01-31.csv.gz">tags</a>
    <a href="https://e621.net/db_export/pools-2024-01-31.csv.gz">pools</a>
    <a href="../posts-2024-02-01.csv.gz">parent</a>
    <a href="sub/posts-2024-02-02.csv.gz">sub</a>
    <a href="https://evil.example/db_export/posts-2024-02-03.csv.gz">other host</a>
    <a href="..%2Fposts-2024-02-04.csv.gz">encoded</a>
    <a href="posts-2024-02-30.csv.gz">bad date</a>
    <a href="tag_aliases-2024-01-31.csv.gz">aliases</a>
    </pre></body></html>"""
    assert parse_index_page(page, base) == {
        "posts": {"2024-01-31"}, "tags": {"2024-01-31"}, "pools": {"2024-01-31"}}


def test_http_probe_fallback_when_index_is_404(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    write_dump(folder, days_ago(0), ("posts",))  # today, tags not out yet
    write_dump(folder, days_ago(1), ("posts", "tags", "pools"))
    write_dump(folder, days_ago(3), ("posts", "tags"))
    log: list[tuple[str, str]] = []
    with serve_directory(folder, index=False, log=log) as url:
        source = DumpSource(url, probe_days=4)
        dates = source.available_dates()
        assert dates == {"posts": {days_ago(1), days_ago(3)}, "tags": {days_ago(1), days_ago(3)},
                         "pools": {days_ago(1)}}
        assert source.newest_date() == days_ago(1)
    assert file_gets(log) == []
    assert ("HEAD", f"/posts-{days_ago(0)}.csv.gz") in log


def test_http_probe_window_is_bounded(tmp_path: Path) -> None:
    write_dump(tmp_path / "src", days_ago(5))
    with serve_directory(tmp_path / "src", index=False) as url:
        with pytest.raises(DumpSourceError, match="both a posts and a tags"):
            DumpSource(url, probe_days=4).newest_date()
        assert DumpSource(url, probe_days=5).newest_date() == days_ago(5)


def test_http_fetch_then_skip(src: Path, tmp_path: Path) -> None:
    log: list[tuple[str, str]] = []
    messages: list[str] = []
    dest = tmp_path / "dest"
    with serve_directory(src, log=log) as url:
        source = DumpSource(url, progress=messages.append)
        files = source.fetch(source.newest_date(), dest)
        assert isinstance(files, DumpFiles) and files.date == "2024-01-30"
        for kind in ("posts", "tags", "pools"):
            got = getattr(files, kind)
            assert got.parent == dest / "2024-01-30"
            assert got.read_bytes() == (src / got.name).read_bytes()
            record = json.loads(got.with_name(got.name + ".ok").read_text())
            assert record["size"] == got.stat().st_size and len(record["sha256"]) == 64
        assert len(file_gets(log)) == 3
        assert sum("done" in m for m in messages) == 3
        assert not list((dest / "2024-01-30").glob("*.part"))

        again = source.fetch("2024-01-30", dest)
        assert again == files
        assert len(file_gets(log)) == 3  # nothing downloaded again

        files.tags.write_bytes(b"damaged")  # size no longer matches its record
        source.fetch("2024-01-30", dest)
        assert file_gets(log)[3:] == ["/tags-2024-01-30.csv.gz"]
        assert files.tags.read_bytes() == (src / files.tags.name).read_bytes()


def test_pools_optional(tmp_path: Path) -> None:
    write_dump(tmp_path / "src", "2024-01-30")
    for location_is_url in (False, True):
        dest = tmp_path / f"dest{location_is_url}"
        with serve_directory(tmp_path / "src") as url:
            source = DumpSource(url if location_is_url else str(tmp_path / "src"))
            files = source.fetch("2024-01-30", dest)
        assert files.pools is None
        assert set(files.sizes()) == {"posts", "tags"}


def test_missing_required_file(tmp_path: Path) -> None:
    write_dump(tmp_path / "src", "2024-01-30", ("posts",))
    with serve_directory(tmp_path / "src") as url, pytest.raises(
            DumpSourceError, match=r"tags for dump 2024-01-30 .*not found"):
        DumpSource(url).fetch("2024-01-30", tmp_path / "dest")


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _bad_crc(good: bytes) -> bytes:
    return good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:]


CORRUPTIONS = {
    "truncated": (_truncated, "truncated"),
    "missing trailer": (lambda g: g[:-4], "truncated"),
    "bad crc": (_bad_crc, "(?i)incorrect (data check|checksum)"),  # zlib or ISA-L wording
    "trailing garbage": (lambda g: g + b"garbage!" * 4, "after the end"),
    "not gzip": (lambda g: b"id,name\n1,a\n", "corrupt gzip"),
    "empty": (lambda g: b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.parametrize("over_http", [True, False])
def test_corrupt_gzip_never_promoted(case: str, over_http: bool, tmp_path: Path) -> None:
    corrupt, reason = CORRUPTIONS[case]
    folder = tmp_path / "src"
    write_dump(folder, "2024-01-30")
    posts = folder / "posts-2024-01-30.csv.gz"
    posts.write_bytes(corrupt(posts.read_bytes()))
    dest = tmp_path / "dest"
    with serve_directory(folder) as url:
        source = DumpSource(url if over_http else str(folder))
        with pytest.raises(DumpSourceError, match=reason) as info:
            source.fetch("2024-01-30", dest)
    assert "posts-2024-01-30.csv.gz" in str(info.value) and "2024-01-30" in str(info.value)
    leftovers = [p.name for p in (dest / "2024-01-30").iterdir() if p.name != ".fetch.lock"]
    assert leftovers == []


def test_concatenated_gzip_members_are_valid(tmp_path: Path) -> None:
    write_dump(tmp_path / "src", "2024-01-30")
    posts = tmp_path / "src" / "posts-2024-01-30.csv.gz"
    posts.write_bytes(posts.read_bytes() + gzip.compress(b"4,more\n"))
    files = DumpSource(str(tmp_path / "src")).fetch("2024-01-30", tmp_path / "dest")
    assert files.posts.read_bytes() == posts.read_bytes()


def test_redirects_same_host_only(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    write_dump(folder, "2024-01-30")
    real = folder / "posts-2024-01-30.csv.gz"
    (folder / "moved.bin").write_bytes(real.read_bytes())
    same = {"/posts-2024-01-30.csv.gz": "/moved.bin"}
    with serve_directory(folder, redirects=same) as url:
        files = DumpSource(url).fetch("2024-01-30", tmp_path / "dest1")
        assert files.posts.read_bytes() == real.read_bytes()
    other = {"/posts-2024-01-30.csv.gz": "http://localhost:9/posts-2024-01-30.csv.gz"}
    with serve_directory(folder, redirects=other) as url, pytest.raises(
            DumpSourceError, match="another host"):
        DumpSource(url).fetch("2024-01-30", tmp_path / "dest2")
    loop = {"/posts-2024-01-30.csv.gz": "/posts-2024-01-30.csv.gz"}
    with serve_directory(folder, redirects=loop) as url, pytest.raises(
            DumpSourceError, match="redirects"):
        DumpSource(url).fetch("2024-01-30", tmp_path / "dest3")


def test_unreachable_host_fails_fast(tmp_path: Path) -> None:
    with serve_directory(tmp_path) as url:
        pass  # server now closed: its port refuses connections
    with pytest.raises(SourceUnreachable, match=r"cannot reach .*Connection refused.*check "
                       "E6SCORE_DUMP_SOURCE") as info:
        DumpSource(url, timeout_s=5, backoff_s=0.01).newest_date()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("over_http", [True, False])
def test_republished_dated_file_is_fetched_again(tmp_path: Path, over_http: bool) -> None:
    """The cache is keyed by the source's version (size, ETag, Last-Modified or mtime), not by
    the date alone: a posts file re-published under the same date is fetched again."""
    folder = tmp_path / "src"
    write_dump(folder, "2024-01-30")
    dest = tmp_path / "dest"
    faults = Faults()
    with serve_directory(folder, faults=faults) as url:
        source = DumpSource(url if over_http else str(folder))
        first = source.fetch("2024-01-30", dest)
        again = source.fetch("2024-01-30", dest)  # unchanged: nothing fetched
        assert again == first
        posts = folder / "posts-2024-01-30.csv.gz"
        posts.write_bytes(gz_bytes("posts", rows=5))
        second = source.fetch("2024-01-30", dest)
        assert second.posts.read_bytes() == posts.read_bytes()
        assert second.identity != first.identity
    if over_http:
        assert len(faults.gets("posts-2024-01-30.csv.gz")) == 2
        assert len(faults.gets("tags-2024-01-30.csv.gz")) == 1
