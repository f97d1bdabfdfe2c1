"""Downloads against a misbehaving HTTP server on 127.0.0.1: retries, resume, fallback, timeouts.

The dumps are real gzip files of a few hundred KB of random content, so a connection cut after
100 KB really is cut mid-stream, in the middle of a deflate block.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import json
import random
import time
from pathlib import Path

import pytest

from e6score_dagster.schema import POSTS_COLUMNS, TAGS_COLUMNS, dump_file_name
from e6score_dagster.sources import DumpSource, DumpSourceError
from e6score_dagster_tests.http_server import Faults, FileFault, serve_directory

OLD, NEW = "2024-01-30", "2024-01-31"
CUT = 100_000


def random_gz(kind: str, seed: int, raw_bytes: int = 300_000) -> bytes:
    """A gzip of a CSV header and base64 lines of random bytes: barely compressible."""
    rng = random.Random(seed)
    header = ",".join(POSTS_COLUMNS if kind == "posts" else TAGS_COLUMNS)
    lines = [header] + [f"{i},{base64.b64encode(rng.randbytes(600)).decode()}"
                        for i in range(raw_bytes // 600)]
    return gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6, mtime=0)


def days_ago(n: int) -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=n)).isoformat()


def make_source(folder: Path, *dates: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, date in enumerate(dates):
        for kind in ("posts", "tags"):
            (folder / dump_file_name(kind, date)).write_bytes(random_gz(kind, 2 * seed + len(kind)))
    return folder


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = make_source(tmp_path / "src", OLD, NEW)
    assert (folder / dump_file_name("posts", NEW)).stat().st_size > 3 * CUT
    return folder


def client(url: str, messages: list[str] | None = None, **kwargs: object) -> DumpSource:
    options: dict = {"retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **kwargs}
    return DumpSource(url, progress=(messages.append if messages is not None else None), **options)


def assert_verified_copy(got: Path, original: Path) -> None:
    """Byte for byte the source, with an .ok record of the right size and sha256, no .part."""
    data = original.read_bytes()
    assert got.read_bytes() == data
    record = json.loads(got.with_name(got.name + ".ok").read_text())
    assert record["size"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(got.parent.glob(".*.part"))


def promoted(folder: Path) -> list[str]:
    """Everything a fetch left in a date folder besides its lock file."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != ".fetch.lock")


# ---- resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("drops", [1, 3])
def test_dropped_connection_is_resumed_with_a_range_request(
        src: Path, tmp_path: Path, drops: int) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(drop_after=CUT, times=drops)})
    messages: list[str] = []
    with serve_directory(src, faults=faults) as url:
        files = client(url, messages).fetch(NEW, tmp_path / "dest")
    gets = faults.gets(name)
    assert len(gets) == drops + 1
    assert gets[0].range is None and gets[0].status == 200
    offsets = []
    for get in gets[1:]:
        assert get.status == 206 and get.range is not None and get.range.startswith("bytes=")
        assert get.if_range is not None  # the resume is tied to the same version of the file
        offsets.append(int(get.range.removeprefix("bytes=").removesuffix("-")))
    # Each resume starts where the data received so far ends, a drop further on each time.
    assert offsets == sorted(offsets) and 0 < offsets[0] <= CUT and offsets[-1] <= drops * CUT
    assert_verified_copy(files.posts, src / name)
    assert_verified_copy(files.tags, src / files.tags.name)
    assert any("resuming at byte" in m for m in messages)


def test_retry_count_starts_afresh_when_an_attempt_gets_further(
        src: Path, tmp_path: Path) -> None:
    """More cuts than `retries` still complete while each resume gets further (a multi-GB dump
    on a flaky line); cuts that never get further exhaust the retries (next test)."""
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(drop_after=CUT // 2, times=4)})
    with serve_directory(src, faults=faults) as url:
        files = client(url, retries=1).fetch(NEW, tmp_path / "dest")
    assert [g.status for g in faults.gets(name)] == [200, 206, 206, 206, 206]
    assert_verified_copy(files.posts, src / name)


def test_cut_at_the_same_place_every_time_gives_up(src: Path, tmp_path: Path) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(drop_after=CUT, ignore_range=True)})
    with serve_directory(src, faults=faults) as url, pytest.raises(
            DumpSourceError, match=r"connection .*gave up after 3 attempt"):
        client(url, retries=2).fetch(NEW, tmp_path / "dest")
    assert len(faults.gets(name)) == 3
    assert promoted(tmp_path / "dest" / NEW) == []


def test_server_ignoring_range_restarts_from_zero(src: Path, tmp_path: Path) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(drop_after=CUT, times=1, ignore_range=True)})
    messages: list[str] = []
    with serve_directory(src, faults=faults) as url:
        files = client(url, messages).fetch(NEW, tmp_path / "dest")
    gets = faults.gets(name)
    assert [g.status for g in gets] == [200, 200]
    assert gets[1].range is not None  # asked to resume, got the whole file again
    assert_verified_copy(files.posts, src / name)
    assert any("starting again from byte 0" in m for m in messages)


def test_file_replaced_between_attempts_restarts_via_if_range(src: Path, tmp_path: Path) -> None:
    """The file changes under the same name while the download is cut: If-Range makes the
    server send the new file whole instead of a tail that would not fit the head we have."""
    name = dump_file_name("posts", NEW)
    replacement = random_gz("posts", seed=99)

    def replace() -> None:
        (src / name).write_bytes(replacement)

    faults = Faults(files={name: FileFault(drop_after=CUT, times=1, on_drop=replace)})
    with serve_directory(src, faults=faults) as url:
        files = client(url).fetch(NEW, tmp_path / "dest")
    gets = faults.gets(name)
    assert [g.status for g in gets] == [200, 200] and gets[1].if_range is not None
    assert files.posts.read_bytes() == replacement
    assert_verified_copy(files.posts, src / name)


# ---- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_status_twice_then_ok(src: Path, tmp_path: Path, status: int) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(status=status, times=2)})
    messages: list[str] = []
    with serve_directory(src, faults=faults) as url:
        files = client(url, messages).fetch(NEW, tmp_path / "dest")
    assert [g.status for g in faults.gets(name)] == [status, status, 200]
    assert_verified_copy(files.posts, src / name)


def test_retries_are_bounded_with_backoff(src: Path, tmp_path: Path) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(status=500)})
    t0 = time.monotonic()
    with serve_directory(src, faults=faults) as url, pytest.raises(
            DumpSourceError, match=r"HTTP 500.*gave up after 4 attempt") as info:
        client(url, retries=3, backoff_s=0.05).fetch(NEW, tmp_path / "dest")
    assert len(faults.gets(name)) == 4
    assert time.monotonic() - t0 >= 0.05 + 0.1 + 0.2  # doubling backoff between attempts
    assert name in str(info.value)
    assert promoted(tmp_path / "dest" / NEW) == []


@pytest.mark.parametrize("status", [403, 401, 400])
def test_client_errors_are_not_retried(src: Path, tmp_path: Path, status: int) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(status=status)})
    with serve_directory(src, faults=faults) as url, pytest.raises(
            DumpSourceError, match=f"HTTP {status}"):
        client(url).fetch(NEW, tmp_path / "dest")
    assert len(faults.gets(name)) == 1


# ---- fallback to an earlier dump ---------------------------------------------------------


def test_server_errors_do_not_fall_back(src: Path, tmp_path: Path) -> None:
    """Only a dump that is genuinely absent (404) is skipped; a failing server is an error,
    not a reason to quietly score yesterday's dump."""
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(status=500)})
    dest = tmp_path / "dest"
    with serve_directory(src, faults=faults) as url, pytest.raises(
            DumpSourceError, match=r"HTTP 500.*gave up after 3 attempts"):
        client(url, retries=2).fetch_newest(dest)
    assert len(faults.gets(name)) == 3  # retried before giving up
    assert promoted(dest / NEW) == [] and not (dest / OLD).exists()


def test_fetch_newest_falls_back_on_404_for_todays_posts(tmp_path: Path) -> None:
    """Listed in the index, but the file itself answers 404 (a mirror still syncing)."""
    today, yesterday = days_ago(0), days_ago(1)
    folder = make_source(tmp_path / "src", yesterday, today)
    faults = Faults(files={dump_file_name("posts", today): FileFault(status=404)})
    with serve_directory(folder, faults=faults) as url:
        source = client(url)
        assert source.newest_date() == today
        files = source.fetch_newest(tmp_path / "dest")
    assert files.date == yesterday
    assert files.fallback is not None and today in files.fallback and "not found" in files.fallback
    assert len(faults.gets(dump_file_name("posts", today))) == 1  # 404: not retried
    assert promoted(tmp_path / "dest" / today) == []


def test_fetch_newest_without_trouble_takes_the_newest(src: Path, tmp_path: Path) -> None:
    log: list[tuple[str, str]] = []
    with serve_directory(src, log=log) as url:
        files = client(url).fetch_newest(tmp_path / "dest")
    assert files.date == NEW
    assert not any(OLD in path for _, path in log)


def test_fetch_newest_gives_up_naming_every_date(tmp_path: Path) -> None:
    dates = ["2024-01-27", "2024-01-28", "2024-01-29", "2024-01-30"]
    folder = make_source(tmp_path / "src", *dates)
    faults = Faults(files={dump_file_name("posts", "2024-01-30"): FileFault(status=404),
                           dump_file_name("tags", "2024-01-29"): FileFault(status=410),
                           dump_file_name("posts", "2024-01-28"): FileFault(status=404)})
    with serve_directory(folder, faults=faults) as url, pytest.raises(DumpSourceError) as info:
        client(url, retries=1).fetch_newest(tmp_path / "dest", max_fallback=2)
    text = str(info.value)
    assert "2024-01-30: posts" in text and "not found" in text
    assert "2024-01-29: tags" in text
    assert "2024-01-28: posts" in text
    assert "1 older dump(s) not tried" in text
    assert not (tmp_path / "dest" / "2024-01-27").exists()  # beyond max_fallback


# ---- broken files ------------------------------------------------------------------------


def test_truncated_file_is_rejected_and_never_promoted(src: Path, tmp_path: Path) -> None:
    name = dump_file_name("posts", NEW)
    size = (src / name).stat().st_size
    faults = Faults(files={name: FileFault(truncate_to=size // 2)})
    dest = tmp_path / "dest"
    with serve_directory(src, faults=faults) as url:
        source = client(url)
        with pytest.raises(DumpSourceError, match="truncated gzip"):
            source.fetch(NEW, dest)
        assert len(faults.gets(name)) == 1  # what the server has is broken: no retry
        assert promoted(dest / NEW) == []  # neither the file, nor .ok, nor .part
        with pytest.raises(DumpSourceError, match="truncated gzip"):
            source.fetch_newest(dest)  # broken is not absent: no fallback to OLD
    assert promoted(dest / NEW) == [] and not (dest / OLD).exists()


def test_stale_part_file_is_discarded(src: Path, tmp_path: Path) -> None:
    """A .part left by a killed process is neither taken for a finished file nor resumed."""
    name = dump_file_name("posts", NEW)
    folder = tmp_path / "dest" / NEW
    folder.mkdir(parents=True)
    good = (src / name).read_bytes()
    (folder / f".{name}.part").write_bytes(good[:CUT] + b"\0" * 1000)  # right start, bad end
    with serve_directory(src, faults=Faults()) as url:
        files = client(url).fetch(NEW, tmp_path / "dest")
    assert_verified_copy(files.posts, src / name)


# ---- slow and stalled servers ------------------------------------------------------------


def test_slow_server_within_timeout_succeeds(src: Path, tmp_path: Path) -> None:
    """A transfer that takes longer than the timeout in all is fine while data keeps coming."""
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(delay_s=0.03, chunk_bytes=16 << 10)})
    t0 = time.monotonic()
    with serve_directory(src, faults=faults) as url:
        files = client(url, timeout_s=0.25, retries=0).fetch(NEW, tmp_path / "dest")
    assert time.monotonic() - t0 > 0.25
    assert len(faults.gets(name)) == 1
    assert_verified_copy(files.posts, src / name)


def test_stall_times_out_and_is_retried(src: Path, tmp_path: Path) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(stall_after=CUT, stall_s=10, times=1)})
    messages: list[str] = []
    t0 = time.monotonic()
    with serve_directory(src, faults=faults) as url:
        files = client(url, messages, timeout_s=0.3).fetch(NEW, tmp_path / "dest")
    assert time.monotonic() - t0 < 5
    assert len(faults.gets(name)) == 2
    assert any("timed out" in m for m in messages)
    assert_verified_copy(files.posts, src / name)


def test_stall_every_time_gives_a_clear_error(src: Path, tmp_path: Path) -> None:
    name = dump_file_name("posts", NEW)
    faults = Faults(files={name: FileFault(stall_after=0, stall_s=10)})
    t0 = time.monotonic()
    with serve_directory(src, faults=faults) as url, pytest.raises(
            DumpSourceError,
            match=r"timed out: the server sent nothing for 0.2 s \(gave up after 3 attempt"):
        client(url, timeout_s=0.2, retries=2).fetch(NEW, tmp_path / "dest")
    assert time.monotonic() - t0 < 5
    assert len(faults.gets(name)) == 3
    assert promoted(tmp_path / "dest" / NEW) == []
