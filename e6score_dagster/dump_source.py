"""Find and fetch e621 database exports from an HTTP index or a local directory.

Pure I/O with no Dagster imports, so it can be tested against a plain HTTP server and wrapped
by a resource elsewhere. Every byte that reaches its final name has been gzip-verified (CRC,
length, complete stream) and hashed; a sidecar ``NAME.ok`` records that, so a later fetch of the
same dump can skip files it already holds without re-reading several GB.

Downloads survive a flaky network: a transient failure (connection error or cut, read timeout,
HTTP 5xx or 429) is retried with exponential backoff, resuming with ``Range: bytes=N-`` where
the server allows it; the hash and the gzip check carry on across the resume, so the result is
checked exactly as if it had arrived in one piece. ``fetch_newest`` falls back to an earlier
dump when the newest one cannot be fetched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import requests
import urllib3

from e6score_dagster.schema import DUMP_FILE_RE, dump_file_name

try:  # POSIX only; elsewhere concurrent fetches of one date are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

USER_AGENT = "e6score-dagster/0.1 (+https://github.com/)"
KINDS: tuple[str, ...] = ("posts", "tags", "pools")
REQUIRED_KINDS: tuple[str, ...] = ("posts", "tags")
CHUNK_BYTES = 1 << 20
MAX_REDIRECTS = 5
PROGRESS_INTERVAL_S = 5.0
INDEX_MAX_BYTES = 16 << 20
# Gzip only (not zlib auto-detection): a .csv.gz must be readable by every gzip reader.
GZIP_WBITS = 16 + zlib.MAX_WBITS
# Bounds memory per decompress call, so a gzip bomb cannot expand a 1 MiB chunk into GBs at once.
MAX_INFLATE_BYTES = 8 << 20

_ISO_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_ABSENT_STATUSES = frozenset({404, 410})
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")

Progress = Callable[[str], None]


class DumpSourceError(RuntimeError):
    """A dump could not be listed or fetched; the message is meant for the person running it."""


class _Invalid(Exception):
    """Internal: a verification or protocol failure, wrapped into DumpSourceError with context."""


class _Transient(Exception):
    """Internal: a failure worth retrying (server overloaded, transfer cut short)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class DumpFiles:
    """The verified local files of one dump date; pools is None where the source has none."""

    date: str
    posts: Path
    tags: Path
    pools: Path | None

    def sizes(self) -> dict[str, int]:
        paths = {"posts": self.posts, "tags": self.tags, "pools": self.pools}
        return {kind: path.stat().st_size for kind, path in paths.items() if path is not None}


def is_url(location: str) -> bool:
    """True for http(s) URLs; anything else is treated as a local directory."""
    return urlsplit(location.strip()).scheme.lower() in ("http", "https")


def validate_date(date: str) -> str:
    """Return ``date`` if it is an exact ASCII YYYY-MM-DD real calendar date, else raise.

    Dates end up in file and folder names, so only this round-tripped form is ever used.
    """
    if not isinstance(date, str) or not _ISO_DATE_RE.fullmatch(date):
        raise DumpSourceError(f"invalid dump date {date!r}: expected YYYY-MM-DD")
    try:
        parsed = dt.date.fromisoformat(date)
    except ValueError as exc:
        raise DumpSourceError(f"invalid dump date {date!r}: {exc}") from exc
    if parsed.isoformat() != date:
        raise DumpSourceError(f"invalid dump date {date!r}: expected YYYY-MM-DD")
    return date


def parse_dump_name(name: str) -> tuple[str, str] | None:
    """(kind, date) for a well-formed dump file name with a real date; None for anything else."""
    match = DUMP_FILE_RE.fullmatch(name)  # fullmatch: `$` alone would accept a trailing newline
    if match is None:
        return None
    try:
        return match.group(1), validate_date(match.group(2))
    except DumpSourceError:
        return None


class _HrefParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for key, value in attrs if key == "href" and value)


def _empty_listing() -> dict[str, set[str]]:
    return {kind: set() for kind in KINDS}


def parse_index_page(html: str, base_url: str) -> dict[str, set[str]]:
    """Dump dates per kind from an autoindex page.

    Only links that resolve to a file directly inside ``base_url`` count, so a link elsewhere
    (another host, a parent folder, ``../``) can never steer where files are fetched from.
    """
    parser = _HrefParser()
    parser.feed(html)
    parser.close()
    base = urlsplit(base_url)
    listing = _empty_listing()
    for href in parser.hrefs:
        target = urlsplit(urljoin(base_url, href.strip()))
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            continue
        directory, _, last = target.path.rpartition("/")
        if directory + "/" != base.path:
            continue
        parsed = parse_dump_name(unquote(last))
        if parsed is not None:
            listing[parsed[0]].add(parsed[1])
    return listing


class _GzipVerifier:
    """Inflates and discards, so a truncated or corrupt gzip is caught before it is promoted.

    Concatenated gzip members are valid gzip and accepted; anything after the last member that
    is not itself a complete gzip member (trailing garbage) is an error.
    """

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(GZIP_WBITS)
        self._member_started = False
        self.members = 0
        self.uncompressed_bytes = 0

    def feed(self, data: bytes) -> None:
        while data:
            self._member_started = True
            try:
                out = self._inflater.decompress(data, MAX_INFLATE_BYTES)
            except zlib.error as exc:
                where = " after the end of the gzip stream" if self.members else ""
                raise _Invalid(f"corrupt gzip data{where} ({exc})") from exc
            self.uncompressed_bytes += len(out)
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                self.members += 1
                data = self._inflater.unused_data + data
                self._inflater = zlib.decompressobj(GZIP_WBITS)
                self._member_started = False

    def finish(self) -> None:
        if self._member_started and self.members:
            raise _Invalid("unexpected data after the end of the gzip stream")
        if self._member_started:
            raise _Invalid("truncated gzip stream (it ends before its final block and checksum)")
        if not self.members:
            raise _Invalid("empty file, not a gzip stream")


class _Meter:
    """Throttled progress messages: at most one per interval, plus one at the end."""

    def __init__(self, label: str, total: int | None, sink: Progress,
                 interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self._label, self.total, self._sink, self._interval_s = label, total, sink, interval_s
        self._start = self._last = time.monotonic()

    def _rate(self, done: int, now: float) -> float:
        return done / 1e6 / max(now - self._start, 1e-9)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return
        self._last = now
        of = ""
        if self.total:
            of = f" of {self.total / 1e6:.1f} MB ({100 * done / self.total:.0f}%)"
        self._sink(f"{self._label}: {done / 1e6:.1f} MB{of}, {self._rate(done, now):.1f} MB/s")

    def done(self, done: int) -> None:
        now = time.monotonic()
        self._sink(f"{self._label}: done, {done / 1e6:.1f} MB in {now - self._start:.1f} s "
                   f"({self._rate(done, now):.1f} MB/s), gzip verified")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".ok")


def _fsync_dir(directory: Path) -> None:
    """Make renames durable; best effort where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_intact(path: Path) -> bool:
    """True if ``path`` was verified earlier and its size still matches the record.

    Size, not a fresh sha256, because re-hashing GBs on every run would defeat the skip; the
    recorded sha256 is there for anyone who wants the slow check.
    """
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        size = path.stat().st_size
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("name") == path.name
            and record.get("size") == size and isinstance(record.get("sha256"), str))


def _write_sidecar(path: Path, record: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.ok.part")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, _sidecar(path))
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise fetches of one date across processes (e.g. two Dagster runs at once)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / ".fetch.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _PartWriter:
    """``.NAME.part`` with the running sha256 and gzip check of exactly the bytes written to it.

    Opened with "wb": a ``.part`` left behind by a killed process is discarded, never trusted.
    Appending after a resume continues the same hash and inflater, so a resumed download is
    verified exactly like one that arrived in one piece.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by finish() or close()
        self.reset()

    def reset(self) -> None:
        """Back to an empty file, for a download that has to start again from byte 0."""
        self._fh.seek(0)
        self._fh.truncate()
        self._sha = hashlib.sha256()
        self._gz = _GzipVerifier()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._sha.update(chunk)
        self._gz.feed(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        """Check the gzip stream is complete, make the bytes durable; the sha256 (hex)."""
        self._gz.finish()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        self._fh.close()


@dataclass
class _Transfer:
    """What one HTTP download knows across its attempts."""

    writer: _PartWriter | None = None
    meter: _Meter | None = None
    total: int | None = None  # the whole file's size, as announced
    validator: str | None = None  # strong ETag or Last-Modified, for If-Range


def _same_host(src: str, dst: str) -> bool:
    """Same scheme, host and port, or an http->https upgrade on the same host name."""
    a, b = urlsplit(src), urlsplit(dst)
    if (a.hostname or "").lower() != (b.hostname or "").lower() or not b.hostname:
        return False
    if a.scheme == b.scheme:
        return a.port == b.port
    return a.scheme == "http" and b.scheme == "https"


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise _Invalid(f"invalid Content-Length header {value!r}")
    return int(value)


_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
# Worth another try: the network or the server may do better in a moment. Mid-stream TLS errors
# (urllib3's SSLError) are usually a cut connection; requests' SSLError at connect time is a
# certificate or handshake problem and is not retried.
_RETRYABLE_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.SSLError,
)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _Transient):
        return True
    if isinstance(exc, requests.exceptions.SSLError):
        return False
    return isinstance(exc, _RETRYABLE_ERRORS)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return f"timed out: the server sent nothing for {timeout_s:g} s"
    if isinstance(exc, (urllib3.exceptions.ProtocolError,
                        requests.exceptions.ChunkedEncodingError)):
        return f"connection broken ({exc})"
    return str(exc)


def _retry_after(resp: requests.Response) -> float | None:
    """Retry-After in seconds, where given as seconds (the HTTP-date form is ignored)."""
    value = resp.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _validator(resp: requests.Response) -> str | None:
    """What If-Range can use to make sure a resume continues the same file, if anything."""
    etag = resp.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        return etag
    return resp.headers.get("Last-Modified", "").strip() or None


class DumpSource:
    """An e621 ``db_export`` location: an http(s) base URL or a local directory."""

    def __init__(self, location: str, *, timeout_s: float = 60.0, probe_days: int = 7,
                 progress: Progress | None = None, retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0) -> None:
        """``timeout_s`` bounds each wait for data (connect, headers, every read), not a whole
        transfer, so a slow but live server is fine and a stalled one fails and is retried.

        A download is retried after a transient failure up to ``retries`` times in a row without
        new bytes arriving (an attempt that gets further than any before starts the count
        afresh), waiting ``backoff_s``, doubling each time, at most ``max_backoff_s``.
        """
        if not isinstance(location, str) or not location.strip():
            raise DumpSourceError("dump source location is empty")
        if timeout_s <= 0 or probe_days < 0:
            raise DumpSourceError("timeout_s must be > 0 and probe_days >= 0")
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise DumpSourceError("retries, backoff_s and max_backoff_s must be >= 0")
        self.location = location.strip()
        self.timeout_s = float(timeout_s)
        self.probe_days = int(probe_days)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._progress: Progress = progress or log.info
        self._base_url: str | None = None
        self._dir: Path | None = None
        self._session: requests.Session | None = None
        if is_url(self.location):
            if not urlsplit(self.location).hostname:
                raise DumpSourceError(f"dump source URL has no host: {self.location!r}")
            self._base_url = self.location if self.location.endswith("/") else self.location + "/"
        else:
            self._dir = Path(self.location).expanduser()

    def __repr__(self) -> str:
        return f"DumpSource({self.location!r})"

    # ---- listing -------------------------------------------------------------------------

    def available_dates(self) -> dict[str, set[str]]:
        """Dates present per kind ("posts", "tags", "pools"); every kind is a key."""
        if self._dir is not None:
            return self._local_dates()
        return self._http_dates()

    def newest_date(self) -> str:
        """The newest date with both posts and tags: by contract, "the current dump"."""
        return self._complete_dates()[0]

    def _complete_dates(self) -> list[str]:
        """Dates with both posts and tags, newest first; raises if there are none."""
        dates = self.available_dates()
        common = dates["posts"] & dates["tags"]
        if not common:
            raise DumpSourceError(
                f"no dump at {self.location} has both a posts and a tags file "
                f"(posts dates: {sorted(dates['posts'])[-5:]}, "
                f"tags dates: {sorted(dates['tags'])[-5:]})")
        return sorted(common, reverse=True)

    def fingerprint(self, date: str) -> str:
        """What identifies one dump's files without downloading them: the date plus, per file,
        the size and ETag / Last-Modified (HTTP) or the modification time (local folder).

        A dump re-published under the same date therefore still counts as a new version.
        """
        date = validate_date(date)
        parts = [date]
        for kind in REQUIRED_KINDS:
            name = dump_file_name(kind, date)
            if self._dir is not None:
                st = (self._dir / name).stat()
                parts.append(f"{kind}:{st.st_size}:{st.st_mtime_ns}")
                continue
            assert self._base_url is not None
            try:
                with contextlib.closing(self._request("HEAD", self._base_url + name)) as resp:
                    if resp.status_code != 200:
                        raise _Invalid(f"HTTP {resp.status_code}")
                    h = resp.headers
                    parts.append(f"{kind}:{h.get('content-length', '')}:{h.get('etag', '')}:"
                                 f"{h.get('last-modified', '')}")
            except (*_TRANSPORT_ERRORS, _Invalid) as exc:
                raise DumpSourceError(f"cannot inspect {name} at {self._base_url}: {exc}") from exc
        return "|".join(parts)

    def _local_dates(self) -> dict[str, set[str]]:
        assert self._dir is not None
        if not self._dir.is_dir():
            raise DumpSourceError(f"dump source directory does not exist: {self._dir}")
        listing = _empty_listing()
        for entry in self._dir.iterdir():
            parsed = parse_dump_name(entry.name)
            if parsed is not None and entry.is_file():
                listing[parsed[0]].add(parsed[1])
        return listing

    def _http_dates(self) -> dict[str, set[str]]:
        assert self._base_url is not None
        try:
            listing, problem = self._index_listing()
            if any(listing.values()):
                return listing
            self._progress(f"dump index {self._base_url} unusable ({problem}); probing the "
                           f"last {self.probe_days} days with HEAD requests")
            return self._probe_listing(dt.datetime.now(dt.UTC).date())
        except (*_TRANSPORT_ERRORS, _Invalid) as exc:
            raise DumpSourceError(f"cannot list dumps at {self._base_url}: {exc}") from exc

    def _index_listing(self) -> tuple[dict[str, set[str]], str]:
        """The index page's listing, or an empty one and why (then the caller probes).

        Transport errors propagate: an unreachable host would make probing slow and pointless.
        """
        assert self._base_url is not None
        with contextlib.closing(self._request("GET", self._base_url, stream=True)) as resp:
            if resp.status_code != 200:
                return _empty_listing(), f"HTTP {resp.status_code}"
            raw = bytearray()
            for chunk in resp.iter_content(CHUNK_BYTES):
                raw += chunk
                if len(raw) > INDEX_MAX_BYTES:
                    return _empty_listing(), f"index page larger than {INDEX_MAX_BYTES} bytes"
        listing = parse_index_page(raw.decode("utf-8", errors="replace"), self._base_url)
        return listing, "no dump files listed"

    def _probe_listing(self, today: dt.date) -> dict[str, set[str]]:
        """HEAD today (UTC) and each of the ``probe_days`` days before; a date needs posts+tags."""
        listing = _empty_listing()
        for back in range(self.probe_days + 1):
            date = (today - dt.timedelta(days=back)).isoformat()
            if not all(self._exists(dump_file_name(kind, date)) for kind in REQUIRED_KINDS):
                continue
            for kind in REQUIRED_KINDS:
                listing[kind].add(date)
            if self._exists(dump_file_name("pools", date)):
                listing["pools"].add(date)
        return listing

    def _exists(self, name: str) -> bool:
        assert self._base_url is not None
        with contextlib.closing(self._request("HEAD", self._base_url + name)) as resp:
            return resp.status_code == 200

    # ---- fetching ------------------------------------------------------------------------

    def fetch_newest(self, dest_root: Path, max_fallback: int = 3) -> DumpFiles:
        """Fetch the newest dump with posts and tags; if it cannot be fetched (after retries),
        fall back to the next earlier one, at most ``max_fallback`` times.

        Raises DumpSourceError naming every date tried and why it failed if none works.
        """
        if max_fallback < 0:
            raise DumpSourceError("max_fallback must be >= 0")
        dates = self._complete_dates()
        candidates = dates[: max_fallback + 1]
        failures: list[str] = []
        for i, date in enumerate(candidates):
            try:
                files = self.fetch(date, dest_root)
            except DumpSourceError as exc:
                failures.append(f"{date}: {exc}")
                nxt = (f"falling back to {candidates[i + 1]}" if i + 1 < len(candidates)
                       else "no earlier dump left to try")
                self._progress(f"dump {date} unusable, {nxt}: {exc}")
                continue
            if failures:
                self._progress(f"using dump {date}; newer dump(s) failed: "
                               + ", ".join(f.split(":", 1)[0] for f in failures))
            return files
        skipped = len(dates) - len(candidates)
        more = (f" ({skipped} older dump(s) not tried: max_fallback={max_fallback})"
                if skipped else "")
        raise DumpSourceError(
            f"no usable dump at {self.location}; tried {len(failures)}{more}:\n"
            + "\n".join(f"  {f}" for f in failures))

    def fetch(self, date: str, dest_root: Path) -> DumpFiles:
        """Verified local copies of one dump under ``dest_root/DATE/``, skipping intact files."""
        date = validate_date(date)
        dest = Path(dest_root) / date
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DumpSourceError(f"cannot create dump folder {dest}: {exc}") from exc
        with _dir_lock(dest):
            paths = {kind: self._fetch_one(kind, date, dest) for kind in KINDS}
        posts, tags = paths["posts"], paths["tags"]
        assert posts is not None and tags is not None  # required kinds raise when absent
        return DumpFiles(date=date, posts=posts, tags=tags, pools=paths["pools"])

    def _fetch_one(self, kind: str, date: str, dest: Path) -> Path | None:
        name = dump_file_name(kind, date)
        final = dest / name
        if is_intact(final):
            self._progress(f"{name}: already downloaded and verified, not fetching again")
            return final
        where = f"{self._base_url}{name}" if self._base_url else str(self._dir / name)
        try:
            if self._dir is not None:
                record = self._copy_local(self._dir / name, final, where)
            else:
                record = self._download(self._base_url + name, final, where)
            if record is None:
                if kind in REQUIRED_KINDS:
                    raise _Invalid("not found at the source")
                return None
            _write_sidecar(final, record)
        except (*_TRANSPORT_ERRORS, _Invalid, _Transient, OSError) as exc:
            raise DumpSourceError(
                f"cannot fetch {kind} for dump {date} ({where}): {exc}") from exc
        return final

    @staticmethod
    @contextlib.contextmanager
    def _part(final: Path) -> Iterator[_PartWriter]:
        """A fresh ``.NAME.part`` next to ``final``; it never outlives the block."""
        _sidecar(final).unlink(missing_ok=True)  # a stale record must not vouch for new bytes
        part = final.with_name(f".{final.name}.part")
        writer = _PartWriter(part)
        try:
            yield writer
        finally:
            writer.close()
            part.unlink(missing_ok=True)

    @staticmethod
    def _promote(writer: _PartWriter, final: Path, meter: _Meter,
                 where: str) -> dict[str, object]:
        """Finish the gzip check and move the part file to its final name; the .ok record."""
        sha256 = writer.finish()
        os.replace(writer.path, final)
        _fsync_dir(final.parent)
        meter.done(writer.size)
        return {"name": final.name, "size": writer.size, "sha256": sha256, "source": where,
                "verified_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}

    def _copy_local(self, src: Path, final: Path, where: str) -> dict[str, object] | None:
        if not src.is_file():
            return None
        with open(src, "rb") as fh, self._part(final) as writer:
            size = os.fstat(fh.fileno()).st_size
            meter = _Meter(final.name, size, self._progress)
            for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                writer.write(chunk)
                meter.update(writer.size)
            if writer.size != size:
                raise _Invalid(f"read {writer.size} of {size} bytes (file changed while copying?)")
            return self._promote(writer, final, meter, where)

    def _download(self, url: str, final: Path, where: str) -> dict[str, object] | None:
        """Download ``url`` into ``final`` via its part file, retrying and resuming transient
        failures; None if the server says the file does not exist."""
        state = _Transfer()
        failures = attempts = best = 0
        with contextlib.ExitStack() as stack:
            while True:
                attempts += 1
                try:
                    if not self._attempt(url, final, state, stack):
                        return None
                    break
                except (*_TRANSPORT_ERRORS, _Transient) as exc:
                    if not _retryable(exc):
                        raise
                    why = _describe(exc, self.timeout_s)
                    got = state.writer.size if state.writer is not None else 0
                    if got > best:  # this attempt got further than any before: count afresh
                        best, failures = got, 0
                    failures += 1
                    if failures > self.retries:
                        raise _Transient(f"{why} (gave up after {attempts} attempt(s), "
                                         f"{self.retries} retries without progress)") from exc
                    delay = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
                    if isinstance(exc, _Transient) and exc.retry_after_s is not None:
                        delay = min(max(delay, exc.retry_after_s), self.max_backoff_s)
                    resume = f", resuming at byte {got}" if got else ""
                    self._progress(f"{final.name}: {why}; retry {failures} of {self.retries} "
                                   f"in {delay:.2g} s{resume}")
                    time.sleep(delay)
            assert state.writer is not None and state.meter is not None
            return self._promote(state.writer, final, state.meter, where)

    def _attempt(self, url: str, final: Path, state: _Transfer,
                 stack: contextlib.ExitStack) -> bool:
        """One GET, appending to the part file; False if the file is absent at the source.

        Raises _Transient (or a transport error) for what a retry may fix, _Invalid otherwise.
        """
        offset = state.writer.size if state.writer is not None else 0
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if state.validator:
                headers["If-Range"] = state.validator
        with contextlib.closing(self._request("GET", url, stream=True, headers=headers)) as resp:
            status = resp.status_code
            if status in _ABSENT_STATUSES and state.writer is None:
                return False
            if status == 429 or status >= 500:
                raise _Transient(f"HTTP {status} {resp.reason}", _retry_after(resp))
            if status == 206 and offset:
                assert state.writer is not None
                self._check_resume(resp, offset, state)
            elif status == 200:
                if state.writer is None:
                    state.writer = stack.enter_context(self._part(final))
                elif offset:
                    self._progress(f"{final.name}: the server sent the whole file instead of "
                                   f"resuming at byte {offset}; starting again from byte 0")
                    state.writer.reset()
                state.total = _content_length(resp)
                state.validator = _validator(resp)
                if state.meter is None:
                    state.meter = _Meter(final.name, state.total, self._progress)
                state.meter.total = state.total
            elif status == 416 and offset:
                assert state.writer is not None
                state.writer.reset()
                raise _Transient(f"the server cannot resume at byte {offset} (HTTP 416; has the "
                                 f"file changed?), starting again from byte 0")
            else:
                raise _Invalid(f"HTTP {status} {resp.reason}")
            writer, meter = state.writer, state.meter
            assert writer is not None and meter is not None
            # Raw bytes: a server that adds Content-Encoding: gzip must not get them inflated.
            for chunk in resp.raw.stream(CHUNK_BYTES, decode_content=False):
                if not chunk:
                    continue
                writer.write(chunk)
                if state.total is not None and writer.size > state.total:
                    raise _Invalid(f"received more than the announced {state.total} bytes")
                meter.update(writer.size)
        if state.total is not None and writer.size != state.total:
            raise _Transient(f"received {writer.size} of {state.total} bytes "
                             f"(connection cut short)")
        return True

    def _check_resume(self, resp: requests.Response, offset: int, state: _Transfer) -> None:
        """Accept a 206 only if it continues the same file exactly at ``offset``; otherwise
        discard what was written and have the next attempt start from byte 0."""
        assert state.writer is not None
        match = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
        problem = None
        if match is None:
            problem = f"has no valid Content-Range ({resp.headers.get('Content-Range')!r})"
        else:
            first, last = int(match[1]), int(match[2])
            complete = None if match[3] == "*" else int(match[3])
            length = _content_length(resp)
            etag = resp.headers.get("ETag", "").strip()
            if first != offset or last < first:
                problem = f"covers bytes {first}-{last}, not {offset}-"
            elif state.total is not None and complete != state.total:
                problem = f"is of a file of {match[3]} bytes, not {state.total}"
            elif length is not None and length != last - first + 1:
                problem = f"announces {length} bytes for bytes {first}-{last}"
            elif (etag and state.validator and state.validator.startswith('"')
                  and etag != state.validator):
                problem = f"is of another version of the file (ETag {etag})"
            elif state.total is None:
                state.total = complete
                assert state.meter is not None
                state.meter.total = complete
        if problem is not None:
            state.writer.reset()
            raise _Transient(f"cannot resume at byte {offset}: the partial response {problem}; "
                             f"starting again from byte 0")

    # ---- HTTP ----------------------------------------------------------------------------

    def _http(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.headers.update({"User-Agent": USER_AGENT,
                                          "Accept-Encoding": "identity"})
        return self._session

    def _request(self, method: str, url: str, *, stream: bool = False,
                 headers: dict[str, str] | None = None) -> requests.Response:
        """One request, following at most MAX_REDIRECTS redirects and only to the same host."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._http().request(method, url, stream=stream, timeout=self.timeout_s,
                                        allow_redirects=False, headers=headers)
            if resp.status_code not in _REDIRECT_STATUSES or "location" not in resp.headers:
                return resp
            target = urljoin(url, resp.headers["location"])
            resp.close()
            if not _same_host(url, target):
                raise _Invalid(f"refusing redirect from {url} to another host: {target}")
            url = target
        raise _Invalid(f"more than {MAX_REDIRECTS} redirects, last to {url}")
