"""What a dump is, independent of where it comes from: its files, date and identity."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_KINDS: tuple[str, ...] = ("posts", "tags")
OPTIONAL_KINDS: tuple[str, ...] = ("pools", "tag_aliases", "tag_implications")
KINDS: tuple[str, ...] = REQUIRED_KINDS + OPTIONAL_KINDS

_ISO_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class DumpSourceError(RuntimeError):
    """A dump could not be listed or fetched; the message is meant for the person running it."""


class SourceRefused(DumpSourceError):
    """The source answered 401 or 403: a setting (usually the User-Agent) must change."""


class SourceUnreachable(DumpSourceError):
    """No connection to the source at all (name, connection refused, timeout)."""


class DumpAbsent(DumpSourceError):
    """The source says a file of this dump does not exist (HTTP 404/410, or no such file)."""


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


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dump at its source, with what is known about it before downloading.

    ``version`` changes whenever the bytes at the source may have changed (checksum, or size
    plus ETag / Last-Modified / updated_at / mtime): the local cache is keyed by it. Files not
    in ``REQUIRED_KINDS`` may be absent at the source; they are then skipped.
    """

    kind: str
    name: str
    location: str
    version: str | None  # None: not known before downloading (learnt from the response)
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Dump:
    """The files that make one dump, its date and its identity."""

    date: str
    files: dict[str, RemoteFile]
    layout: str  # "current" (JSON index, undated names) or "dated" (posts-DATE.csv.gz)

    @property
    def identity(self) -> str:
        """Changes exactly when posts or tags change at the source."""
        parts = [f"{k}:{self.files[k].version}" for k in REQUIRED_KINDS]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DumpFiles:
    """The verified local files of one dump; optional kinds are None where the source has none.

    ``fallback`` says why an older dump was used, when it was.
    """

    date: str
    posts: Path
    tags: Path
    pools: Path | None
    identity: str = ""
    layout: str = "dated"
    others: dict[str, Path] = field(default_factory=dict)
    fallback: str | None = None

    def paths(self) -> dict[str, Path]:
        found = {"posts": self.posts, "tags": self.tags, "pools": self.pools, **self.others}
        return {kind: path for kind, path in found.items() if path is not None}

    def sizes(self) -> dict[str, int]:
        return {kind: path.stat().st_size for kind, path in self.paths().items()}
