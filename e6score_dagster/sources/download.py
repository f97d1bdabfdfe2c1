"""Get these bytes here, exactly: resumable, verified, atomic downloads and local copies.

Knows nothing of e621's layouts. Every byte that reaches its final name has been gzip-verified
(CRC, length, complete stream), hashed, and checked against the size and SHA-256 the source
announced where it announced them; a sidecar ``NAME.ok`` records that together with the
source's version of the file, so an unchanged file is never fetched twice and a changed one
always is.

Retries and backoff are urllib3's ``Retry``: mounted on the requests adapter for connection
errors and 429/5xx answers (honouring Retry-After), and used as the policy for a transfer cut
mid-body, which is resumed with ``Range: bytes=N-`` (tied to the same file by ``If-Range``).
The hash and the gzip check carry on across the resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from isal import isal_zlib
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from e6score_dagster.sources.dump import (
    DumpAbsent,
    DumpSourceError,
    RemoteFile,
    SourceRefused,
    SourceUnreachable,
)

try:  # POSIX only; elsewhere concurrent fetches of one folder are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PROJECT_URL = "https://github.com/e6score/e6score-dagster"
DEFAULT_USER_AGENT = f"e6score-dagster/0.1 (+{PROJECT_URL})"
USER_AGENT_ENV = "E6SCORE_USER_AGENT"
CHUNK_BYTES = 1 << 20
MAX_REDIRECTS = 5
PROGRESS_INTERVAL_S = 5.0
# Gzip only (not zlib auto-detection): a .csv.gz must be readable by every gzip reader.
GZIP_WBITS = 16 + isal_zlib.MAX_WBITS
# Bounds memory per decompress call, so a gzip bomb cannot expand a 1 MiB chunk into GBs at once.
MAX_INFLATE_BYTES = 8 << 20
CONNECT_RETRIES = 2
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_ABSENT_STATUSES = frozenset({404, 410})
_REFUSED_STATUSES = frozenset({401, 403})
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")

Progress = Callable[[str], None]


def user_agent() -> str:
    """`$E6SCORE_USER_AGENT`, else the project's name, version and URL (e621 refuses anonymous
    clients; its guidelines ask for a project name and a contact)."""
    return os.environ.get(USER_AGENT_ENV, "").strip() or DEFAULT_USER_AGENT


class Invalid(Exception):
    """A verification or protocol failure; the caller adds which file it was."""


class _Transient(Exception):
    """A failure worth retrying (transfer cut short, cannot resume)."""


class Origins:
    """The scheme://host:port places a download may be served from (redirects included)."""

    def __init__(self, *urls: str, https_hosts: tuple[str, ...] = ()) -> None:
        self._allowed = {self.origin(u) for u in urls}
        self._allowed |= {("https", h.lower(), 443) for h in https_hosts}

    @staticmethod
    def origin(url: str) -> tuple[str, str, int]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https"
                                                                      else 80)

    def allows(self, url: str) -> bool:
        scheme, host, port = self.origin(url)
        if not host:
            return False
        if (scheme, host, port) in self._allowed:
            return True
        # An http -> https upgrade on an allowed host name.
        return scheme == "https" and any(h == host for _, h, _ in self._allowed)


class _GzipVerifier:
    """Inflates and discards, so a truncated or corrupt gzip is caught before it is promoted.

    Concatenated gzip members are valid gzip and accepted; anything after the last member that
    is not itself a complete gzip member (trailing garbage) is an error. ISA-L's inflate (the
    zlib module's interface) checks the same stream three times as fast: at 1M posts the
    check was most of `raw_dump`'s time.
    """

    def __init__(self) -> None:
        self._inflater = isal_zlib.decompressobj(GZIP_WBITS)
        self._member_started = False
        self.members = 0

    def feed(self, data: bytes) -> None:
        while data:
            self._member_started = True
            try:
                self._inflater.decompress(data, MAX_INFLATE_BYTES)
            except isal_zlib.error as exc:
                where = " after the end of the gzip stream" if self.members else ""
                raise Invalid(f"corrupt gzip data{where} ({exc})") from exc
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                self.members += 1
                data = self._inflater.unused_data + data
                self._inflater = isal_zlib.decompressobj(GZIP_WBITS)
                self._member_started = False

    def finish(self) -> None:
        if self._member_started and self.members:
            raise Invalid("unexpected data after the end of the gzip stream")
        if self._member_started:
            raise Invalid("truncated gzip stream (it ends before its final block and checksum)")
        if not self.members:
            raise Invalid("empty file, not a gzip stream")


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
                   f"({self._rate(done, now):.1f} MB/s), verified")


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".ok")


def _fsync_dir(directory: Path) -> None:
    """Make renames durable; best effort where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_record(path: Path) -> dict | None:
    """The .ok record of a verified file whose size still matches it, else None.

    Size, not a fresh sha256, because re-hashing GBs on every run would defeat the skip.
    """
    try:
        record = json.loads(sidecar(path).read_text(encoding="utf-8"))
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if (isinstance(record, dict) and record.get("name") == path.name
            and record.get("size") == size and isinstance(record.get("sha256"), str)):
        return record
    return None


def is_current(path: Path, remote: RemoteFile) -> bool:
    """True if ``path`` holds a verified copy of exactly this version of ``remote``."""
    record = read_record(path)
    if record is None or record.get("source_version") != remote.version:
        return False
    if remote.sha256 is not None and record["sha256"] != remote.sha256:
        return False
    return remote.size is None or record["size"] == remote.size


def _write_sidecar(path: Path, record: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.ok.part")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, sidecar(path))
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Serialise fetches into one folder across processes (e.g. two Dagster runs at once)."""
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
    version: str | None = None  # size, ETag and Last-Modified of the 200 response


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise Invalid(f"invalid Content-Length header {value!r}")
    return int(value)


TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
# Worth resuming: the transfer was cut or stalled after it had started.
_RESUMABLE_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.SSLError,
)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return f"timed out: the server sent nothing for {timeout_s:g} s"
    if isinstance(exc, (urllib3.exceptions.ProtocolError,
                        requests.exceptions.ChunkedEncodingError)):
        return f"connection broken ({exc})"
    return str(exc)


def _root_cause(exc: BaseException) -> str:
    """The innermost OS-level reason of a connection error, in a few words."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror.rstrip(".")
        if isinstance(cur, urllib3.exceptions.NameResolutionError):
            return "host name not found"
        if isinstance(cur, urllib3.exceptions.NewConnectionError):
            found = re.search(r"\[Errno -?[0-9]+\] ([^'\"]+)", str(cur))
            return found[1].rstrip(".") if found else "no connection"
        if isinstance(cur, (requests.Timeout, urllib3.exceptions.TimeoutError)):
            return "timed out"
        todo.extend(a for a in (*cur.args, cur.__cause__, cur.__context__)
                    if isinstance(a, BaseException))
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    return type(exc).__name__


def refused_message(status: int, url: str) -> str:
    return (f"e621 refused the request (HTTP {status}) for {url}: set {USER_AGENT_ENV} to a "
            f"descriptive User-Agent with your contact (now {user_agent()!r}), or check the "
            "source's access rules")


def _validator(resp: requests.Response) -> str | None:
    """What If-Range can use to make sure a resume continues the same file, if anything."""
    etag = resp.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        return etag
    return resp.headers.get("Last-Modified", "").strip() or None


def _attempts(resp: requests.Response) -> int:
    retries = getattr(resp.raw, "retries", None)
    return 1 + len(retries.history) if retries is not None else 1


class Downloader:
    """HTTP with a descriptive User-Agent, bounded retries and redirects only to allowed hosts.

    ``timeout_s`` bounds each wait for data (connect, headers, every read), not a whole transfer,
    so a slow but live server is fine and a stalled one fails and is retried. A transfer cut
    mid-body is retried up to ``retries`` times in a row without new bytes arriving (an attempt
    that gets further than any before starts the count afresh).
    """

    def __init__(self, *, timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, progress: Progress | None = None) -> None:
        if timeout_s <= 0:
            raise DumpSourceError("timeout_s must be > 0")
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise DumpSourceError("retries, backoff_s and max_backoff_s must be >= 0")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._progress: Progress = progress or log.info
        self._session: requests.Session | None = None

    def retry_policy(self) -> Retry:
        return Retry(
            # Few connection retries: a wrong or unreachable host should fail in seconds.
            total=self.retries, connect=min(self.retries, CONNECT_RETRIES), read=self.retries,
            status=self.retries, other=self.retries, redirect=0,
            backoff_factor=self.backoff_s, backoff_max=self.max_backoff_s,
            status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "HEAD"}),
            respect_retry_after_header=True, raise_on_status=False, raise_on_redirect=False,
        )

    def session(self) -> requests.Session:
        if self._session is None:
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=self.retry_policy())
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers.update({"User-Agent": user_agent(), "Accept-Encoding": "identity"})
            self._session = session
        return self._session

    def request(self, method: str, url: str, origins: Origins, *, stream: bool = False,
                headers: dict[str, str] | None = None) -> requests.Response:
        """One request (retried by the adapter), following at most MAX_REDIRECTS redirects and
        only to allowed origins. Raises SourceRefused on 401/403 and SourceUnreachable when
        no connection can be made."""
        for _ in range(MAX_REDIRECTS + 1):
            if not origins.allows(url):
                raise Invalid(f"refusing to fetch from {url}: not a host the source named")
            try:
                resp = self.session().request(method, url, stream=stream, timeout=self.timeout_s,
                                              allow_redirects=False, headers=headers)
            except requests.ConnectionError as exc:
                if isinstance(exc, requests.exceptions.SSLError) or not _is_connect_error(exc):
                    raise
                raise SourceUnreachable(
                    f"cannot reach {url} ({_root_cause(exc)}): check E6SCORE_DUMP_SOURCE and "
                    "the network (a proxy? offline?)") from None
            if resp.status_code in _REFUSED_STATUSES:
                resp.close()
                raise SourceRefused(refused_message(resp.status_code, url))
            if resp.status_code not in _REDIRECT_STATUSES or "location" not in resp.headers:
                return resp
            target = urljoin(url, resp.headers["location"])
            resp.close()
            if not origins.allows(target):
                raise Invalid(f"refusing redirect from {url} to another host: {target}")
            url = target
        raise Invalid(f"more than {MAX_REDIRECTS} redirects, last to {url}")

    def get_small(self, url: str, origins: Origins, max_bytes: int) -> tuple[int, bytes]:
        """Status and body of a small document (an index), at most ``max_bytes``."""
        with contextlib.closing(self.request("GET", url, origins, stream=True)) as resp:
            if resp.status_code != 200:
                return resp.status_code, b""
            raw = bytearray()
            for chunk in resp.iter_content(CHUNK_BYTES):
                raw += chunk
                if len(raw) > max_bytes:
                    raise Invalid(f"{url} is larger than {max_bytes} bytes")
            return 200, bytes(raw)

    def head(self, url: str, origins: Origins) -> requests.Response:
        with contextlib.closing(self.request("HEAD", url, origins)) as resp:
            return resp

    # ---- fetching ------------------------------------------------------------------------

    def fetch(self, remote: RemoteFile, final: Path, origins: Origins | None,
              label: str | None = None) -> Path:
        """A verified copy of ``remote`` at ``final`` (skipped when already current).

        ``origins`` None means ``remote.location`` is a local path. Raises DumpAbsent when the
        source says the file does not exist, DumpSourceError for anything else; messages
        name the file as ``label`` (default: its kind).
        """
        label = label or remote.kind
        if origins is not None and remote.version is None and read_record(final) is not None:
            with contextlib.closing(self.head(remote.location, origins)) as resp:
                if resp.status_code == 200:
                    remote = dataclasses.replace(remote, version=http_version(resp))
        if is_current(final, remote):
            self._progress(f"{final.name}: already downloaded and verified, not fetching again")
            return final
        try:
            if origins is None:
                src = Path(remote.location)
                record = self._copy(src, final, remote) if src.is_file() else None
            else:
                record = self._download(remote.location, final, origins, remote)
        except DumpSourceError:
            raise
        except (*TRANSPORT_ERRORS, Invalid, _Transient, OSError) as exc:
            raise DumpSourceError(f"cannot fetch {label} ({remote.location}): {exc}") from exc
        if record is None:
            raise DumpAbsent(f"{label} ({remote.location}): not found at the source")
        return final

    @staticmethod
    @contextlib.contextmanager
    def _part(final: Path) -> Iterator[_PartWriter]:
        """A fresh ``.NAME.part`` next to ``final``; it never outlives the block."""
        part = final.with_name(f".{final.name}.part")
        writer = _PartWriter(part)
        try:
            yield writer
        finally:
            writer.close()
            part.unlink(missing_ok=True)

    @staticmethod
    def _promote(writer: _PartWriter, final: Path, meter: _Meter,
                 remote: RemoteFile) -> dict[str, object]:
        """Check the bytes against what the source announced; only then move them into place.

        A mismatch leaves ``final`` (and its record) as they were: the last good copy stays.
        """
        sha256 = writer.finish()
        wrong = [what for what, bad in (
            ("size", remote.size is not None and writer.size != remote.size),
            ("checksum", remote.sha256 is not None and sha256 != remote.sha256)) if bad]
        if wrong:
            raise DumpSourceError(
                f"{final.name}: {' and '.join(wrong)} mismatch: the source announced "
                f"{_or_unknown(remote.size)} bytes, sha256 {_or_unknown(remote.sha256)}; "
                f"received {writer.size} bytes, sha256 {sha256}; not used")
        sidecar(final).unlink(missing_ok=True)  # a stale record must not vouch for new bytes
        os.replace(writer.path, final)
        _fsync_dir(final.parent)
        meter.done(writer.size)
        record = {"name": final.name, "size": writer.size, "sha256": sha256,
                  "source": remote.location, "source_version": remote.version,
                  "verified_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        _write_sidecar(final, record)
        return record

    def _copy(self, src: Path, final: Path, remote: RemoteFile) -> dict[str, object]:
        with open(src, "rb") as fh, self._part(final) as writer:
            size = os.fstat(fh.fileno()).st_size
            meter = _Meter(final.name, size, self._progress)
            for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                writer.write(chunk)
                meter.update(writer.size)
            if writer.size != size:
                raise Invalid(f"read {writer.size} of {size} bytes (file changed while copying?)")
            return self._promote(writer, final, meter, remote)

    def _download(self, url: str, final: Path, origins: Origins,
                  remote: RemoteFile) -> dict[str, object] | None:
        """Download ``url`` into ``final`` via its part file, resuming a transfer cut short;
        None if the server says the file does not exist."""
        state = _Transfer()
        policy = self.retry_policy()
        attempts = best = 0
        with contextlib.ExitStack() as stack:
            while True:
                attempts += 1
                try:
                    if not self._attempt(url, final, state, stack, origins):
                        return None
                    break
                except (*_RESUMABLE_ERRORS, _Transient) as exc:
                    if isinstance(exc, requests.exceptions.SSLError):
                        raise
                    why = _describe(exc, self.timeout_s)
                    got = state.writer.size if state.writer is not None else 0
                    if got > best:  # this attempt got further than any before: count afresh
                        best, policy = got, self.retry_policy()
                    try:
                        policy = policy.increment(method="GET", url=url, error=exc)
                    except urllib3.exceptions.MaxRetryError:
                        raise _Transient(f"{why} (gave up after {attempts} attempt(s), "
                                         f"{self.retries} retries without progress)") from exc
                    resume = f", resuming at byte {got}" if got else ""
                    self._progress(f"{final.name}: {why}; retry{resume}")
                    policy.sleep()
            assert state.writer is not None and state.meter is not None
            if remote.version is None:
                remote = dataclasses.replace(remote, version=state.version)
            return self._promote(state.writer, final, state.meter, remote)

    def _attempt(self, url: str, final: Path, state: _Transfer,
                 stack: contextlib.ExitStack, origins: Origins) -> bool:
        """One GET, appending to the part file; False if the file is absent at the source.

        Raises _Transient (or a transport error) for what a resume may fix, Invalid otherwise.
        """
        offset = state.writer.size if state.writer is not None else 0
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if state.validator:
                headers["If-Range"] = state.validator
        resp = self.request("GET", url, origins, stream=True, headers=headers)
        with contextlib.closing(resp):
            status = resp.status_code
            if status in _ABSENT_STATUSES and state.writer is None:
                return False
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
                state.version = http_version(resp)
                if state.meter is None:
                    state.meter = _Meter(final.name, state.total, self._progress)
                state.meter.total = state.total
            elif status == 416 and offset:
                assert state.writer is not None
                state.writer.reset()
                raise _Transient(f"the server cannot resume at byte {offset} (HTTP 416; has the "
                                 f"file changed?), starting again from byte 0")
            else:
                attempts = _attempts(resp)
                tried = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
                raise Invalid(f"HTTP {status} {resp.reason}{tried}")
            writer, meter = state.writer, state.meter
            assert writer is not None and meter is not None
            # Raw bytes: a server that adds Content-Encoding: gzip must not get them inflated.
            for chunk in resp.raw.stream(CHUNK_BYTES, decode_content=False):
                if not chunk:
                    continue
                writer.write(chunk)
                if state.total is not None and writer.size > state.total:
                    raise Invalid(f"received more than the announced {state.total} bytes")
                meter.update(writer.size)
        if state.total is not None and writer.size != state.total:
            raise _Transient(f"received {writer.size} of {state.total} bytes "
                             f"(connection cut short)")
        return True

    @staticmethod
    def _check_resume(resp: requests.Response, offset: int, state: _Transfer) -> None:
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


def _or_unknown(value: object) -> str:
    return "unknown" if value is None else str(value)


def _is_connect_error(exc: requests.ConnectionError) -> bool:
    """True when no connection was made at all (as opposed to one cut mid-transfer)."""
    seen: list[BaseException] = [exc]
    while seen:
        cur = seen.pop()
        if isinstance(cur, (urllib3.exceptions.NewConnectionError,
                            urllib3.exceptions.ConnectTimeoutError,
                            urllib3.exceptions.NameResolutionError)):
            return True
        seen.extend(a for a in (*cur.args, cur.__cause__, getattr(cur, "reason", None))
                    if isinstance(a, BaseException))
    return False


def local_version(path: Path) -> str:
    """What identifies a local file's content without reading it: size and mtime."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def http_version(resp: requests.Response) -> str:
    """What identifies a remote file's content without downloading it."""
    h = resp.headers
    return f"{h.get('content-length', '')}:{h.get('etag', '')}:{h.get('last-modified', '')}"
