"""The old dated layout: ``posts-YYYY-MM-DD.csv.gz`` and friends in one folder.

Still how mirrors and archives keep e621's exports. A folder is an HTML listing over HTTP
(nginx autoindex; when there is none, today and the days before are probed with HEAD) or a
local directory. The current dump is the newest date present for both posts and tags.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from e6score_dagster.schema import DUMP_FILE_RE, dump_file_name
from e6score_dagster.sources.download import Downloader, Origins, http_version, local_version
from e6score_dagster.sources.dump import (
    REQUIRED_KINDS,
    Dump,
    DumpAbsent,
    DumpSourceError,
    RemoteFile,
    validate_date,
)

DATED_KINDS: tuple[str, ...] = ("posts", "tags", "pools")
LISTING_MAX_BYTES = 16 << 20

Listing = dict[str, set[str]]


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


def empty_listing() -> Listing:
    return {kind: set() for kind in DATED_KINDS}


def parse_index_page(html: str, base_url: str) -> Listing:
    """Dump dates per kind from an autoindex page.

    Only links that resolve to a file directly inside ``base_url`` count, so a link elsewhere
    (another host, a parent folder, ``../``) can never steer where files are fetched from.
    """
    parser = _HrefParser()
    parser.feed(html)
    parser.close()
    base = urlsplit(base_url)
    listing = empty_listing()
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


def complete_dates(listing: Listing, where: str) -> list[str]:
    """Dates with both posts and tags, newest first; raises if there are none."""
    common = listing["posts"] & listing["tags"]
    if not common:
        raise DumpSourceError(
            f"no dump at {where} has both a posts and a tags file "
            f"(posts dates: {sorted(listing['posts'])[-5:]}, "
            f"tags dates: {sorted(listing['tags'])[-5:]})")
    return sorted(common, reverse=True)


class LocalFolder:
    """Dated files in a local directory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def listing(self) -> Listing:
        listing = empty_listing()
        for entry in self.folder.iterdir():
            parsed = parse_dump_name(entry.name)
            if parsed is not None and entry.is_file():
                listing[parsed[0]].add(parsed[1])
        return listing

    def dump(self, date: str) -> Dump:
        files = {}
        for kind in DATED_KINDS:
            path = self.folder / dump_file_name(kind, date)
            if path.is_file():
                files[kind] = RemoteFile(kind, path.name, str(path), local_version(path))
            elif kind in REQUIRED_KINDS:
                raise DumpAbsent(f"{kind} for dump {date} ({path}): not found at the source")
        return Dump(date=date, files=files, layout="dated")


class HttpListing:
    """Dated files behind an http(s) folder URL (ending in ``/``)."""

    def __init__(self, base_url: str, downloader: Downloader, probe_days: int,
                 progress: Callable[[str], None]) -> None:
        self.base_url = base_url
        self.origins = Origins(base_url)
        self._http = downloader
        self.probe_days = probe_days
        self._progress = progress

    def listing(self) -> Listing:
        status, raw = self._http.get_small(self.base_url, self.origins, LISTING_MAX_BYTES)
        listing = (parse_index_page(raw.decode("utf-8", errors="replace"), self.base_url)
                   if status == 200 else empty_listing())
        if any(listing.values()):
            return listing
        problem = f"HTTP {status}" if status != 200 else "no dump files listed"
        self._progress(f"dump index {self.base_url} unusable ({problem}); probing the last "
                       f"{self.probe_days} days with HEAD requests")
        return self._probe(dt.datetime.now(dt.UTC).date())

    def _probe(self, today: dt.date) -> Listing:
        """HEAD today (UTC) and each of the ``probe_days`` days before; a date needs posts+tags."""
        listing = empty_listing()
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
        return self._http.head(self.base_url + name, self.origins).status_code == 200

    def dump(self, date: str, versioned: bool = True) -> Dump:
        """The dump of ``date``, each file versioned by its size, ETag and Last-Modified.

        Unversioned (no requests), the versions are learnt while downloading: a file held
        locally is checked with one HEAD, a missing one is fetched straight away.
        """
        if not versioned:
            return Dump(date=date, layout="dated", files={
                kind: RemoteFile(kind, dump_file_name(kind, date),
                                 self.base_url + dump_file_name(kind, date), None)
                for kind in DATED_KINDS})
        files = {}
        for kind in DATED_KINDS:
            name = dump_file_name(kind, date)
            url = self.base_url + name
            with contextlib.closing(self._http.head(url, self.origins)) as resp:
                status = resp.status_code
                version = http_version(resp)
            if status == 200:
                files[kind] = RemoteFile(kind, name, url, version)
            elif status in (404, 410):
                if kind in REQUIRED_KINDS:
                    raise DumpAbsent(f"{kind} for dump {date} ({url}): not found at the source "
                                     f"(HTTP {status})")
            elif kind in REQUIRED_KINDS or status >= 500:
                raise DumpSourceError(f"cannot inspect {url}: HTTP {status} {resp.reason}")
        return Dump(date=date, files=files, layout="dated")
