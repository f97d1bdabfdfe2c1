"""A tiny real HTTP server for tests: serves one folder like nginx's autoindex on 127.0.0.1.

Real sockets rather than mocks, so redirects, HEAD, Content-Length, Range and streaming behave as
they do against e621. The folder is also served in e621's current layout: ``/db_exports.json``
(the folder's ``db_exports.json`` with ``current_layout.ORIGIN`` replaced by the server's own
address) and the files under ``/data/db_export/``. ``Faults`` makes it misbehave on purpose:
error statuses, connections cut mid-file, truncated files, slow or stalled transfers, Range ignored.
"""

from __future__ import annotations

import html
import http.server
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

_RANGE_RE = re.compile(r"bytes=([0-9]+)-([0-9]*)")
EXPORT_PREFIX = "/data/db_export/"
INDEX_PATH = "/db_exports.json"
INDEX_ORIGIN = "http://e621.invalid"  # current_layout.ORIGIN


@dataclass
class FileFault:
    """How the server misbehaves for one file.

    Everything but ``ignore_range`` applies to the first ``times`` GETs of the file (counted
    from 1, whatever they were answered with), or to every GET where ``times`` is None; HEAD
    gets ``status`` while the fault is still active, nothing else.
    """

    times: int | None = None
    status: int | None = None
    """Answer this status (with a short body) instead of the file."""
    truncate_to: int | None = None
    """Serve only the first N bytes, announced consistently (a file truncated at the source)."""
    drop_after: int | None = None
    """Send N body bytes of the (full-length) response, then close the connection."""
    stall_after: int | None = None
    """Send N body bytes, then go silent for ``stall_s`` with the connection open."""
    stall_s: float = 5.0
    delay_s: float = 0.0
    """Pause between chunks of ``chunk_bytes``: slow, but alive."""
    chunk_bytes: int = 64 << 10
    ignore_range: bool = False
    """Answer Range requests with 200 and the whole file (on every GET, whatever ``times``)."""
    on_drop: Callable[[], None] | None = None
    """Called after a dropped connection (e.g. to replace the file before the resume)."""


@dataclass(frozen=True)
class Seen:
    """One request as the server saw and answered it."""

    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int
    user_agent: str | None = None


@dataclass
class Faults:
    """Misbehaviour per file name, and a record of every request with its answer.

    With a ``Faults`` the server also sends a strong ETag and honours If-Range; without one it
    behaves as it always did (Range is honoured either way).
    """

    files: dict[str, FileFault] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    _gets: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def gets(self, name: str) -> list[Seen]:
        """The GETs of one file, in order."""
        with self._lock:
            return [s for s in self.seen if s.method == "GET" and s.path == "/" + name]

    def _active(self, name: str, method: str) -> FileFault | None:
        """The fault for this request, if one applies (counting it when it is a GET)."""
        with self._lock:
            count = self._gets.get(name, 0)
            if method == "GET":
                count += 1
                self._gets[name] = count
            fault = self.files.get(name)
        if fault is None:
            return None
        if fault.times is None:
            return fault
        # A GET is the count-th; a HEAD comes after count GETs, so the fault is active for it
        # while fewer than `times` GETs have been answered.
        active = count <= fault.times if method == "GET" else count < fault.times
        return fault if active else None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about clients that hang up (they do, on purpose, in the fault tests)."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


def _make_handler(root: Path, index: bool, log: list[tuple[str, str]] | None,
                  redirects: Mapping[str, str],
                  faults: Faults | None) -> type[http.server.BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real server would

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: tests read the request log, not stderr."""

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            if log is not None:
                with lock:
                    log.append((self.command, path))
            if path in redirects:
                self._send(302, b"", extra={"Location": redirects[path]}, body=body)
            elif path == "/":
                self._index(body)
            elif path == INDEX_PATH and (root / INDEX_PATH[1:]).is_file():
                self._export_index(body)
            elif path.startswith(EXPORT_PREFIX):
                self._file(unquote(path[len(EXPORT_PREFIX):]), body)
            else:
                self._file(unquote(path[1:]), body)

        def _record(self, status: int) -> None:
            if faults is not None:
                path = urlsplit(self.path).path
                if path.startswith(EXPORT_PREFIX):
                    path = "/" + path[len(EXPORT_PREFIX):]
                faults._record(Seen(self.command, path, self.headers.get("Range"),
                                    self.headers.get("If-Range"), status,
                                    self.headers.get("User-Agent")))

        def _index(self, body: bool) -> None:
            if not index:
                self._send(404, b"not found\n", body=body)
                return
            names = sorted(p.name for p in root.iterdir() if p.is_file())
            links = "".join(f'<a href="{quote(n)}">{html.escape(n)}</a>\n' for n in names)
            page = f"<html><body><h1>Index of /</h1><hr><pre>\n{links}</pre></body></html>\n"
            self._send(200, page.encode(), content_type="text/html", body=body)

        def _export_index(self, body: bool) -> None:
            fault = faults._active(INDEX_PATH[1:], self.command) if faults is not None else None
            if fault is not None and fault.status is not None:
                self._send(fault.status, f"HTTP {fault.status}\n".encode(), body=body)
                return
            host, port = self.server.server_address[:2]
            text = (root / INDEX_PATH[1:]).read_text().replace(INDEX_ORIGIN,
                                                                f"http://{host}:{port}")
            self._send(200, text.encode(), content_type="application/json; charset=utf-8",
                       body=body)

        def _file(self, name: str, body: bool) -> None:
            target = root / name
            fault = faults._active(name, self.command) if faults is not None else None
            no_ranges = faults is not None and faults.files.get(name, FileFault()).ignore_range
            if "/" in name or name.startswith(".") or not target.is_file():
                self._send(404, b"not found\n", body=body)
                return
            if fault is not None and fault.status is not None:
                self._send(fault.status, f"HTTP {fault.status}\n".encode(), body=body)
                return
            st = target.stat()
            size = st.st_size
            if fault is not None and fault.truncate_to is not None:
                size = min(size, fault.truncate_to)
            etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
            start, end = 0, size - 1
            status, extra = 200, {}
            if faults is not None:
                extra["ETag"] = etag
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            ranged = (wanted is not None and not no_ranges
                      and (faults is None or if_range is None or if_range == etag))
            if ranged:
                match = _RANGE_RE.fullmatch(wanted.strip())
                if match is not None:
                    first = int(match[1])
                    last = min(int(match[2]), end) if match[2] else end
                    if first > end or last < first:
                        self._send(416, b"", extra={"Content-Range": f"bytes */{size}"},
                                   body=body)
                        return
                    start, end, status = first, last, 206
                    extra["Content-Range"] = f"bytes {first}-{last}/{size}"
            length = end - start + 1
            self.send_response(status)
            self._record(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if not body:
                return
            with open(target, "rb") as fh:
                fh.seek(start)
                if fault is None:  # streamed, so big files cost no memory
                    while length > 0 and (chunk := fh.read(min(length, 1 << 16))):
                        self.wfile.write(chunk)
                        length -= len(chunk)
                else:
                    self._misbehave(fh.read(length), fault)

        def _misbehave(self, payload: bytes, fault: FileFault) -> None:
            stop = faults._stop if faults is not None else threading.Event()
            limit = len(payload)
            if fault.drop_after is not None:
                limit = min(limit, fault.drop_after)
            sent, stalled = 0, fault.stall_after is None
            while sent < limit and not stop.is_set():  # bounded: each pass sends or stalls once
                if not stalled and sent >= fault.stall_after:
                    stalled = True
                    stop.wait(fault.stall_s)
                    continue
                upto = min(sent + max(fault.chunk_bytes, 1), limit)
                if not stalled:
                    upto = min(upto, fault.stall_after)
                self.wfile.write(payload[sent:upto])
                sent = upto
                if fault.delay_s and sent < limit:
                    stop.wait(fault.delay_s)
            if sent < len(payload):  # cut short: hang up instead of finishing the response
                self.close_connection = True
                if fault.on_drop is not None and fault.drop_after is not None:
                    fault.on_drop()

        def _send(self, status: int, payload: bytes, *, content_type: str = "text/plain",
                  extra: Mapping[str, str] | None = None, body: bool = True) -> None:
            self.send_response(status)
            self._record(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler


@contextmanager
def serve_directory(path: Path | str, *, index: bool = True,
                    log: list[tuple[str, str]] | None = None,
                    redirects: Mapping[str, str] | None = None,
                    faults: Faults | None = None) -> Iterator[str]:
    """Serve the files directly inside ``path``; yields the base URL (ending in ``/``).

    ``index=False`` makes ``GET /`` answer 404 (to exercise probing). ``log`` receives
    ``(method, path)`` for every request, so tests can count downloads. ``redirects`` maps a
    request path to a ``Location`` answered with 302. ``faults`` makes chosen files misbehave
    and records requests with their Range headers and statuses.
    """
    handler = _make_handler(Path(path), index, log, dict(redirects or {}), faults)
    server = _Server(("127.0.0.1", 0), handler)
    # A short poll interval keeps shutdown (which waits for one poll) from costing 0.5 s a test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name="test-http-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        if faults is not None:
            faults._stop.set()  # wake stalled or slow handlers so they finish promptly
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
