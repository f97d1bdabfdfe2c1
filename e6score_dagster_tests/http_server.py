"""A tiny real HTTP server for tests: serves one folder like nginx's autoindex on 127.0.0.1.

Real sockets rather than mocks, so redirects, HEAD, Content-Length and streaming behave as they
do against e621's ``db_export``.
"""

from __future__ import annotations

import html
import http.server
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit


def _make_handler(root: Path, index: bool, log: list[tuple[str, str]] | None,
                  redirects: Mapping[str, str]) -> type[http.server.BaseHTTPRequestHandler]:
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
            else:
                self._file(unquote(path[1:]), body)

        def _index(self, body: bool) -> None:
            if not index:
                self._send(404, b"not found\n", body=body)
                return
            names = sorted(p.name for p in root.iterdir() if p.is_file())
            links = "".join(f'<a href="{quote(n)}">{html.escape(n)}</a>\n' for n in names)
            page = f"<html><body><h1>Index of /</h1><hr><pre>\n{links}</pre></body></html>\n"
            self._send(200, page.encode(), content_type="text/html", body=body)

        def _file(self, name: str, body: bool) -> None:
            target = root / name
            if "/" in name or name.startswith(".") or not target.is_file():
                self._send(404, b"not found\n", body=body)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(target.stat().st_size))
            self.end_headers()
            if body:
                with open(target, "rb") as fh:
                    shutil.copyfileobj(fh, self.wfile)

        def _send(self, status: int, payload: bytes, *, content_type: str = "text/plain",
                  extra: Mapping[str, str] | None = None, body: bool = True) -> None:
            self.send_response(status)
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
                    redirects: Mapping[str, str] | None = None) -> Iterator[str]:
    """Serve the files directly inside ``path``; yields the base URL (ending in ``/``).

    ``index=False`` makes ``GET /`` answer 404 (to exercise probing). ``log`` receives
    ``(method, path)`` for every request, so tests can count downloads. ``redirects`` maps a
    request path to a ``Location`` answered with 302.
    """
    handler = _make_handler(Path(path), index, log, dict(redirects or {}))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    # A short poll interval keeps shutdown (which waits for one poll) from costing 0.5 s a test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name="test-http-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
