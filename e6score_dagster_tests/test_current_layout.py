"""e621's current export (JSON index, undated files, checksums) over a real HTTP server."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
from pathlib import Path

import pytest

from e6score_dagster.sources import DumpSource, DumpSourceError, SourceRefused, user_agent
from e6score_dagster_tests.current_layout import (
    current_posts,
    pg_field,
    write_current_layout,
    write_index,
)
from e6score_dagster_tests.http_server import Faults, FileFault, serve_directory

# 21:30 at UTC-5 is the next day in UTC: the dump's date is the UTC date.
DAY1 = "2026-11-20T21:30:05.512-05:00"
DAY2 = "2026-11-21T21:31:40.004-05:00"


@pytest.fixture(scope="module")
def old_dump(tmp_path_factory) -> Path:
    from e6score_dagster.synthetic import generate_dump

    out = tmp_path_factory.mktemp("old")
    generate_dump(out, posts=300, date="2026-11-20", seed=3)
    return out


@pytest.fixture
def export(old_dump: Path, tmp_path: Path) -> Path:
    return write_current_layout(old_dump, "2026-11-20", tmp_path / "export", DAY1)


def fetched(faults: Faults) -> list[str]:
    """Names of dump files GET-ed (not the index)."""
    return [s.path[1:] for s in faults.seen if s.method == "GET" and s.path.endswith(".gz")]


def client(url: str, **kw) -> DumpSource:
    return DumpSource(url, retries=1, backoff_s=0.01, timeout_s=5, **kw)


def test_files_follow_postgresql_csv_conventions(old_dump: Path, export: Path) -> None:
    text = gzip.decompress((export / "posts.csv.gz").read_bytes()).decode()
    header = text.split("\n", 1)[0].split(",")
    assert len(header) == 32 and header[-3:] == ["bg_color", "last_noted_at",
                                                 "last_commented_at"]
    tags_header = gzip.decompress((export / "tags.csv.gz").read_bytes()).decode().split("\n")[0]
    assert tags_header == "id,name,category,post_count,created_at,updated_at,is_locked"
    assert pg_field("", "description") == '""' and pg_field("", "parent_id") == ""
    assert pg_field(None, "description") == ""
    assert pg_field("2019-03-04 17:22:10.120000", "created_at") == "2019-03-04 17:22:10.12"
    assert pg_field("2019-03-04 17:22:10.000000", "created_at") == "2019-03-04 17:22:10"
    assert pg_field('a "b"\nc', "description") == '"a ""b""\nc"'
    assert current_posts(old_dump / "posts-2026-11-20.csv.gz") == (
        export / "posts.csv.gz").read_bytes()  # deterministic


def test_first_fetch_then_same_index_again(export: Path, tmp_path: Path) -> None:
    faults = Faults()
    dest = tmp_path / "dumps"
    with serve_directory(export, faults=faults) as url:
        source = client(url + "db_exports.json")
        dump = source.newest()
        assert dump.date == "2026-11-21" and dump.layout == "current"
        files = source.fetch_newest(dest)
        assert files.date == "2026-11-21" and files.identity == dump.identity
        assert files.posts == dest / "2026-11-21" / "posts.csv.gz"
        assert files.posts.read_bytes() == (export / "posts.csv.gz").read_bytes()
        assert files.pools is not None and "tag_aliases" in files.others
        assert sorted(fetched(faults)) == ["pools.csv.gz", "posts.csv.gz", "tag_aliases.csv.gz",
                                           "tags.csv.gz"]
        assert {s.user_agent for s in faults.seen} == {user_agent()}
        assert "e6score-dagster" in user_agent() and "https://" in user_agent()

        again = client(url + "db_exports.json")  # the same index, listed again
        assert again.newest().identity == dump.identity
        assert again.fetch_newest(dest) == files
    assert len(fetched(faults)) == 4  # nothing fetched the second time


def test_new_export_under_the_same_names_is_fetched_again(
        old_dump: Path, export: Path, tmp_path: Path) -> None:
    faults = Faults()
    dest = tmp_path / "dumps"
    with serve_directory(export, faults=faults) as url:
        first = client(url + "db_exports.json").fetch_newest(dest)
        # Same day, new bytes under the same names: a re-published export.
        write_current_layout(old_dump, "2026-11-20", export, DAY1, seed=5)
        write_index(export, DAY1)
        second = client(url + "db_exports.json").fetch_newest(dest)
        assert second.date == first.date and second.identity != first.identity
        assert second.posts.read_bytes() == (export / "posts.csv.gz").read_bytes()
        # Next day: the date moves.
        write_index(export, DAY2)
        third = client(url + "db_exports.json").fetch_newest(dest)
    assert third.date == "2026-11-22"
    assert fetched(faults).count("posts.csv.gz") == 3


@pytest.mark.parametrize("field", ["checksum", "file_size"])
def test_mismatch_is_refused_and_the_last_good_copy_stays(
        export: Path, tmp_path: Path, field: str) -> None:
    dest = tmp_path / "dumps"
    with serve_directory(export) as url:
        good = client(url + "db_exports.json").fetch_newest(dest)
        before = good.posts.read_bytes()
        wrong = {"checksum": "0" * 64, "file_size": len(before) + 1}[field]
        # A new export of the same day whose posts do not match the index.
        write_index(export, DAY1, posts={field: wrong})
        with pytest.raises(DumpSourceError) as info:
            client(url + "db_exports.json").fetch_newest(dest)
    message = str(info.value)
    assert "posts.csv.gz" in message and "\n" not in message
    assert f"{field.replace('file_', '')} mismatch" in message
    assert f"received {len(before)} bytes, sha256 {hashlib.sha256(before).hexdigest()}" in message
    if field == "checksum":
        assert "0" * 64 in message
    else:
        assert f"announced {len(before) + 1} bytes" in message
    assert good.posts.read_bytes() == before  # nothing promoted
    assert not list(good.posts.parent.glob(".*.part"))


def test_file_replaced_between_index_and_download(
        old_dump: Path, export: Path, tmp_path: Path) -> None:
    with serve_directory(export) as url:
        source = client(url + "db_exports.json")
        source.newest()  # the index is read...
        (export / "posts.csv.gz").write_bytes(  # ...then the file is replaced
            current_posts(old_dump / "posts-2026-11-20.csv.gz", seed=9))
        with pytest.raises(DumpSourceError, match="posts.csv.gz: .*mismatch"):
            source.fetch_newest(tmp_path / "dumps")
    assert not (tmp_path / "dumps" / "2026-11-21" / "posts.csv.gz").exists()


def test_index_without_tags_is_a_clear_error(export: Path, tmp_path: Path) -> None:
    entries = json.loads((export / "db_exports.json").read_text())
    (export / "db_exports.json").write_text(json.dumps([e for e in entries
                                                        if e["name"] != "tags"]))
    with serve_directory(export) as url, pytest.raises(
            DumpSourceError, match=r"lists no tags export \(it lists: pools, posts, tag_aliases"):
        client(url + "db_exports.json").newest()
    assert not (tmp_path / "dumps").exists()


def test_null_checksum_uses_size_and_updated_at(export: Path, tmp_path: Path) -> None:
    write_index(export, DAY1, posts={"checksum": None}, tags={"checksum": None})
    with serve_directory(export) as url:
        first = client(url + "db_exports.json")
        files = first.fetch_newest(tmp_path / "dumps")
        assert files.posts.read_bytes() == (export / "posts.csv.gz").read_bytes()
        write_index(export, DAY2, posts={"checksum": None}, tags={"checksum": None})
        later = client(url + "db_exports.json").newest()
    assert later.identity != first.newest().identity and later.date == "2026-11-22"


def test_url_on_a_host_the_index_did_not_name(export: Path, tmp_path: Path) -> None:
    with serve_directory(export) as url:
        port = url.rsplit(":", 1)[1].strip("/")
        other = f"http://localhost:{port}/data/db_export/posts.csv.gz"
        write_index(export, DAY1, posts={"url": other})
        with pytest.raises(DumpSourceError, match="refusing posts at http://localhost"):
            client(url + "db_exports.json").fetch_newest(tmp_path / "dumps")
        write_index(export, DAY1)
        redirects = {"/data/db_export/posts.csv.gz": other}
    with serve_directory(export, redirects=redirects) as url, pytest.raises(
            DumpSourceError, match="refusing redirect .* to another host: http://localhost"):
        client(url + "db_exports.json").fetch_newest(tmp_path / "dumps")
    assert not (tmp_path / "dumps" / "2026-11-21" / "posts.csv.gz").exists()


@pytest.mark.parametrize("name", ["db_exports.json", "posts.csv.gz"])
def test_403_says_to_set_the_user_agent(export: Path, tmp_path: Path, name: str) -> None:
    faults = Faults(files={name: FileFault(status=403)})
    with serve_directory(export, faults=faults) as url, pytest.raises(SourceRefused) as info:
        client(url + "db_exports.json").fetch_newest(tmp_path / "dumps")
    message = str(info.value)
    assert message.startswith("e621 refused the request (HTTP 403)")
    assert "set E6SCORE_USER_AGENT" in message and "\n" not in message


def test_site_root_and_local_folder_find_the_index(export: Path, tmp_path: Path) -> None:
    with serve_directory(export) as url:
        assert client(url).newest().layout == "current"
        assert client(url).newest_date() == "2026-11-21"
    local = client(str(export)).fetch_newest(tmp_path / "dumps")
    assert local.date == "2026-11-21" and local.layout == "current"
    assert local.posts.read_bytes() == (export / "posts.csv.gz").read_bytes()


def test_dump_date_is_the_utc_date_of_posts_updated_at(export: Path) -> None:
    write_index(export, DAY1, tags={"updated_at": "2026-11-25T01:00:00.000+00:00"})
    assert client(str(export)).newest().date == (
        dt.datetime.fromisoformat(DAY1).astimezone(dt.UTC).date().isoformat())
