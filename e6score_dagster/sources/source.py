"""Which export a location holds, and fetching its current dump (falling back only on a 404).

A location is e621's JSON index (a URL ending in ``.json``; a site root finds its
``db_exports.json``), an http(s) folder of dated files, or a local directory holding either
layout. Pure I/O with no Dagster imports.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from e6score_dagster.sources import e621_index
from e6score_dagster.sources.download import (
    TRANSPORT_ERRORS,
    Downloader,
    Invalid,
    Origins,
    dir_lock,
    read_record,
)
from e6score_dagster.sources.dump import (
    REQUIRED_KINDS,
    Dump,
    DumpAbsent,
    DumpFiles,
    DumpSourceError,
    RemoteFile,
    validate_date,
)
from e6score_dagster.sources.listing import HttpListing, Listing, LocalFolder, complete_dates

log = logging.getLogger(__name__)


def is_url(location: str) -> bool:
    """True for http(s) URLs; anything else is treated as a local directory."""
    return urlsplit(location.strip()).scheme.lower() in ("http", "https")


class DumpSource:
    """An e621 export location: a JSON index, a dated folder over http(s), or a local folder."""

    def __init__(self, location: str, *, timeout_s: float = 60.0, probe_days: int = 7,
                 progress=None, retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0) -> None:
        if not isinstance(location, str) or not location.strip():
            raise DumpSourceError("dump source location is empty")
        if probe_days < 0:
            raise DumpSourceError("probe_days must be >= 0")
        self.location = location.strip()
        self.probe_days = int(probe_days)
        self._progress = progress or log.info
        self.http = Downloader(timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                               max_backoff_s=max_backoff_s, progress=self._progress)
        self._dir: Path | None = None
        self._url: str | None = None
        self._layout: object | None = None  # resolved lazily: finding it may need a request
        if is_url(self.location):
            if not urlsplit(self.location).hostname:
                raise DumpSourceError(f"dump source URL has no host: {self.location!r}")
            self._url = self.location
        else:
            self._dir = Path(self.location).expanduser()

    def __repr__(self) -> str:
        return f"DumpSource({self.location!r})"

    # ---- which layout --------------------------------------------------------------------

    def _resolve(self) -> object:
        """The layout behind the location: ``(index_url, index bytes)``, a LocalFolder, a
        folder with ``db_exports.json`` (a Path), or an HttpListing."""
        if self._layout is not None:
            return self._layout
        if self._dir is not None:
            if not self._dir.is_dir():
                raise DumpSourceError(
                    f"dump source directory does not exist: {self._dir} (set "
                    "E6SCORE_DUMP_SOURCE to a folder of dumps, or to e621's index URL)")
            index = self._dir / e621_index.INDEX_NAME
            self._layout = self._dir if index.is_file() else LocalFolder(self._dir)
            return self._layout
        assert self._url is not None
        try:
            if e621_index.is_index_url(self._url):
                self._layout = self._fetch_index(self._url, required=True)
            else:
                folder = self._url if self._url.endswith("/") else self._url + "/"
                if urlsplit(folder).path == "/":  # a site root: its index, if it has one
                    self._layout = self._fetch_index(
                        urljoin(folder, e621_index.INDEX_NAME), required=False)
                if self._layout is None:
                    self._layout = HttpListing(folder, self.http, self.probe_days,
                                               self._progress)
        except DumpSourceError:
            raise
        except (*TRANSPORT_ERRORS, Invalid) as exc:
            raise DumpSourceError(f"cannot list dumps at {self._url}: {exc}") from exc
        return self._layout

    def _fetch_index(self, url: str, required: bool) -> tuple[str, bytes] | None:
        status, raw = self.http.get_small(url, Origins(url), e621_index.INDEX_MAX_BYTES)
        if status == 200:
            return url, raw
        if required or status not in (404, 410):
            raise DumpSourceError(f"cannot read the export index {url}: HTTP {status}")
        return None

    @property
    def layout(self) -> str:
        return "dated" if isinstance(self._resolve(), (LocalFolder, HttpListing)) else "current"

    # ---- listing -------------------------------------------------------------------------

    def _current(self) -> tuple[Dump, Origins | None]:
        layout = self._resolve()
        if isinstance(layout, Path):
            return e621_index.local_dump(layout), None
        assert isinstance(layout, tuple)
        url, raw = layout
        return e621_index.remote_dump(raw, url)

    def available_dates(self) -> Listing:
        """Dates present per kind ("posts", "tags", "pools") of a dated layout."""
        layout = self._resolve()
        if isinstance(layout, (LocalFolder, HttpListing)):
            try:
                return layout.listing()
            except (*TRANSPORT_ERRORS, Invalid) as exc:
                raise DumpSourceError(f"cannot list dumps at {self.location}: {exc}") from exc
        dump, _ = self._current()
        return {kind: {dump.date} if kind in dump.files else set()
                for kind in ("posts", "tags", "pools")}

    def _dates(self) -> list[str]:
        return complete_dates(self.available_dates(), self.location)

    def newest_date(self) -> str:
        """The current dump's date (for a dated layout, from the listing alone)."""
        if isinstance(self._resolve(), (LocalFolder, HttpListing)):
            return self._dates()[0]
        return self._current()[0].date

    def newest(self) -> Dump:
        """The current dump with its identity, without downloading it."""
        layout = self._resolve()
        if not isinstance(layout, (LocalFolder, HttpListing)):
            return self._current()[0]
        date = self._dates()[0]
        try:
            return layout.dump(date)
        except (*TRANSPORT_ERRORS, Invalid) as exc:
            raise DumpSourceError(f"cannot inspect dump {date} at {self.location}: {exc}") from exc

    # ---- fetching ------------------------------------------------------------------------

    def fetch(self, date: str, dest_root: Path) -> DumpFiles:
        """Verified local copies of one dated dump under ``dest_root/DATE/``."""
        date = validate_date(date)
        layout = self._resolve()
        if isinstance(layout, LocalFolder):
            return self._fetch_dump(layout.dump(date), None, dest_root)
        if isinstance(layout, HttpListing):
            return self._fetch_dump(layout.dump(date, versioned=False), layout.origins, dest_root)
        dump, origins = self._current()
        if dump.date != date:
            raise DumpSourceError(f"{self.location} holds the dump of {dump.date}, not {date}")
        return self._fetch_dump(dump, origins, dest_root)

    def fetch_newest(self, dest_root: Path, max_fallback: int = 3) -> DumpFiles:
        """Fetch the current dump. Where one of its required files is genuinely absent at the
        source (HTTP 404/410, no such file), fall back to the next earlier dump, at most
        ``max_fallback`` times; any other failure is raised as it is. The result's
        ``fallback`` says why an older dump was used."""
        if max_fallback < 0:
            raise DumpSourceError("max_fallback must be >= 0")
        layout = self._resolve()
        if not isinstance(layout, (LocalFolder, HttpListing)):
            dump, origins = self._current()
            return self._fetch_dump(dump, origins, dest_root)
        dates = self._dates()
        candidates = dates[: max_fallback + 1]
        absent: list[str] = []
        for i, date in enumerate(candidates):
            try:
                files = self.fetch(date, dest_root)
            except DumpAbsent as exc:
                absent.append(f"{date}: {exc}")
                nxt = (f"falling back to {candidates[i + 1]}" if i + 1 < len(candidates)
                       else "no earlier dump left to try")
                self._progress(f"dump {date} is incomplete at the source, {nxt}: {exc}")
                continue
            if absent:
                why = "; ".join(absent)
                self._progress(f"using dump {date}; newer dump(s) absent at the source: {why}")
                files = replace(files, fallback=why)
            return files
        skipped = len(dates) - len(candidates)
        more = (f" ({skipped} older dump(s) not tried: max_fallback={max_fallback})"
                if skipped else "")
        raise DumpSourceError(f"no complete dump at {self.location}; tried {len(absent)}{more}: "
                              + "; ".join(absent))

    def _fetch_dump(self, dump: Dump, origins: Origins | None, dest_root: Path) -> DumpFiles:
        dest = Path(dest_root) / validate_date(dump.date)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DumpSourceError(
                f"cannot create dump folder {dest}: {exc.strerror} (set E6SCORE_HOME to a "
                "writable folder)"
            ) from exc
        paths: dict[str, Path] = {}
        versions: dict[str, RemoteFile] = {}
        with dir_lock(dest):
            for kind, remote in dump.files.items():
                label = f"{kind} for dump {dump.date}"
                try:
                    paths[kind] = self.http.fetch(remote, dest / remote.name, origins, label)
                except DumpAbsent:
                    if kind in REQUIRED_KINDS:
                        raise
                    continue
                record = read_record(paths[kind]) or {}
                versions[kind] = replace(remote, version=record.get("source_version"))
        others = {k: p for k, p in paths.items() if k not in ("posts", "tags", "pools")}
        fetched = Dump(date=dump.date, files=versions, layout=dump.layout)
        return DumpFiles(date=dump.date, posts=paths["posts"], tags=paths["tags"],
                         pools=paths.get("pools"), identity=fetched.identity,
                         layout=dump.layout, others=others)
