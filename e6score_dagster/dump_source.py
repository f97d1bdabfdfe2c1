"""Find and fetch e621 database exports from an HTTP index or a local directory.

Pure I/O with no Dagster imports, so it can be tested against a plain HTTP server and wrapped
by a resource elsewhere. Every byte that reaches its final name has been gzip-verified (CRC,
length, complete stream) and hashed; a sidecar ``NAME.ok`` records that, so a later fetch of the
same dump can skip files it already holds without re-reading several GB.
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
from collections.abc import Callable, Iterable, Iterator
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

Progress = Callable[[str], None]


class DumpSourceError(RuntimeError):
    """A dump could not be listed or fetched; the message is meant for the person running it."""


class _Invalid(Exception):
    """Internal: a verification or protocol failure, wrapped into DumpSourceError with context."""


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
        self._label, self._total, self._sink, self._interval_s = label, total, sink, interval_s
        self._start = self._last = time.monotonic()

    def _rate(self, done: int, now: float) -> float:
        return done / 1e6 / max(now - self._start, 1e-9)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return
        self._last = now
        of = ""
        if self._total:
            of = f" of {self._total / 1e6:.1f} MB ({100 * done / self._total:.0f}%)"
        self._sink(f"{self._label}: {done / 1e6:.1f} MB{of}, {self._rate(done, now):.1f} MB/s")

    def done(self, done: int) -> None:
        now = time.monotonic()
        self._sink(f"{self._label}: done, {done / 1e6:.1f} MB in {now - self._start:.1f} s "
                   f"({self._rate(done, now):.1f} MB/s), gzip verified")


@dataclass
class _Body:
    chunks: Iterable[bytes]
    size: int | None


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


def _write_verified(body: _Body, part: Path, meter: _Meter) -> tuple[int, str]:
    """Stream ``body`` into ``part``, hashing and gzip-verifying on the way; (size, sha256)."""
    sha, gz, done = hashlib.sha256(), _GzipVerifier(), 0
    with open(part, "wb") as fh:
        for chunk in body.chunks:
            if not chunk:
                continue
            fh.write(chunk)
            sha.update(chunk)
            gz.feed(chunk)
            done += len(chunk)
            if body.size is not None and done > body.size:
                raise _Invalid(f"received more than the announced {body.size} bytes")
            meter.update(done)
        if body.size is not None and done != body.size:
            raise _Invalid(f"received {done} of {body.size} bytes (connection cut short?)")
        gz.finish()
        fh.flush()
        os.fsync(fh.fileno())
    meter.done(done)
    return done, sha.hexdigest()


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


class DumpSource:
    """An e621 ``db_export`` location: an http(s) base URL or a local directory."""

    def __init__(self, location: str, *, timeout_s: float = 60.0, probe_days: int = 7,
                 progress: Progress | None = None) -> None:
        if not isinstance(location, str) or not location.strip():
            raise DumpSourceError("dump source location is empty")
        if timeout_s <= 0 or probe_days < 0:
            raise DumpSourceError("timeout_s must be > 0 and probe_days >= 0")
        self.location = location.strip()
        self.timeout_s = float(timeout_s)
        self.probe_days = int(probe_days)
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
        dates = self.available_dates()
        common = dates["posts"] & dates["tags"]
        if not common:
            raise DumpSourceError(
                f"no dump at {self.location} has both a posts and a tags file "
                f"(posts dates: {sorted(dates['posts'])[-5:]}, "
                f"tags dates: {sorted(dates['tags'])[-5:]})")
        return max(common)

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
            with self._open(name) as body:
                if body is None:
                    if kind in REQUIRED_KINDS:
                        raise _Invalid("not found at the source")
                    return None
                record = self._download(body, final, where)
            _write_sidecar(final, record)
        except (*_TRANSPORT_ERRORS, _Invalid, OSError) as exc:
            raise DumpSourceError(
                f"cannot fetch {kind} for dump {date} ({where}): {exc}") from exc
        return final

    def _download(self, body: _Body, final: Path, where: str) -> dict[str, object]:
        """Verify into ``.NAME.part`` and promote it; the part file never outlives a failure."""
        _sidecar(final).unlink(missing_ok=True)  # a stale record must not vouch for new bytes
        part = final.with_name(f".{final.name}.part")
        try:
            size, sha256 = _write_verified(body, part, _Meter(final.name, body.size,
                                                               self._progress))
            os.replace(part, final)
        finally:
            part.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return {"name": final.name, "size": size, "sha256": sha256, "source": where,
                "verified_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[_Body | None]:
        """The source's bytes for ``name`` (with the size when known), or None if absent."""
        if self._dir is not None:
            src = self._dir / name
            if not src.is_file():
                yield None
                return
            with open(src, "rb") as fh:
                yield _Body(iter(lambda: fh.read(CHUNK_BYTES), b""), os.fstat(fh.fileno()).st_size)
            return
        assert self._base_url is not None
        with contextlib.closing(self._request("GET", self._base_url + name, stream=True)) as resp:
            if resp.status_code in _ABSENT_STATUSES:
                yield None
                return
            if resp.status_code != 200:
                raise _Invalid(f"HTTP {resp.status_code} {resp.reason}")
            # Raw bytes: a server that adds Content-Encoding: gzip must not get them inflated.
            yield _Body(resp.raw.stream(CHUNK_BYTES, decode_content=False), _content_length(resp))

    # ---- HTTP ----------------------------------------------------------------------------

    def _http(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.headers.update({"User-Agent": USER_AGENT,
                                          "Accept-Encoding": "identity"})
        return self._session

    def _request(self, method: str, url: str, *, stream: bool = False) -> requests.Response:
        """One request, following at most MAX_REDIRECTS redirects and only to the same host."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._http().request(method, url, stream=stream, timeout=self.timeout_s,
                                        allow_redirects=False)
            if resp.status_code not in _REDIRECT_STATUSES or "location" not in resp.headers:
                return resp
            target = urljoin(url, resp.headers["location"])
            resp.close()
            if not _same_host(url, target):
                raise _Invalid(f"refusing redirect from {url} to another host: {target}")
            url = target
        raise _Invalid(f"more than {MAX_REDIRECTS} redirects, last to {url}")
