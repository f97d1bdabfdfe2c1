"""e621's current export layout: ``db_exports.json``, undated files overwritten daily.

The index is a JSON array of ``{name, file_name, file_size, checksum, updated_at, url}``
(e621ng's ``DbExportBlueprint``). The dump's date is the UTC date of the posts entry's
``updated_at``; each file's version is its checksum, or its size plus ``updated_at`` where the
checksum is null (an export recorded before checksums existed).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from e6score_dagster.schema import CURRENT_FILE_RE
from e6score_dagster.sources.download import Origins
from e6score_dagster.sources.dump import KINDS, REQUIRED_KINDS, Dump, DumpSourceError, RemoteFile

INDEX_NAME = "db_exports.json"
INDEX_MAX_BYTES = 1 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_index_url(location: str) -> bool:
    return urlsplit(location).path.endswith(".json")


def _entry(raw: object, where: str) -> dict:
    if not isinstance(raw, dict):
        raise DumpSourceError(f"{where}: an entry is not an object: {str(raw)[:80]!r}")
    name = raw.get("name")
    file_name = raw.get("file_name")
    size = raw.get("file_size")
    checksum = raw.get("checksum")
    if not isinstance(name, str) or not isinstance(file_name, str):
        raise DumpSourceError(f"{where}: an entry lacks name or file_name: {str(raw)[:120]!r}")
    if not CURRENT_FILE_RE.fullmatch(file_name):
        raise DumpSourceError(f"{where}: entry {name!r} has an unusable file_name {file_name!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DumpSourceError(f"{where}: entry {name!r} has no valid file_size ({size!r})")
    if checksum is not None:
        checksum = str(checksum).lower()
        if not _SHA256_RE.fullmatch(checksum):
            raise DumpSourceError(f"{where}: entry {name!r} has a checksum that is not a "
                                  f"SHA-256 ({raw.get('checksum')!r})")
    try:
        updated = dt.datetime.fromisoformat(str(raw.get("updated_at")))
    except ValueError:
        raise DumpSourceError(f"{where}: entry {name!r} has no ISO 8601 updated_at "
                              f"({raw.get('updated_at')!r})") from None
    if updated.tzinfo is None:
        raise DumpSourceError(f"{where}: entry {name!r} updated_at has no zone offset "
                              f"({raw.get('updated_at')!r})")
    return {"name": name, "file_name": file_name, "size": size, "checksum": checksum,
            "updated_at": updated.astimezone(dt.UTC), "url": raw.get("url")}


def parse_index(raw: bytes, where: str) -> dict[str, dict]:
    """The usable entries of an index, by name; raises naming what is wrong with it."""
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise DumpSourceError(f"{where} is not JSON ({exc})") from None
    if not isinstance(entries, list):
        raise DumpSourceError(f"{where} is not a JSON array of exports")
    parsed = [_entry(e, where) for e in entries]
    by_name = {e["name"]: e for e in parsed if e["name"] in KINDS}
    missing = [k for k in REQUIRED_KINDS if k not in by_name]
    if missing:
        listed = ", ".join(sorted(e["name"] for e in parsed)) or "nothing"
        raise DumpSourceError(f"{where} lists no {' and no '.join(missing)} export "
                              f"(it lists: {listed})")
    return by_name


def _version(entry: dict) -> str:
    if entry["checksum"] is not None:
        return f"sha256:{entry['checksum']}"
    return f"size:{entry['size']}:updated:{entry['updated_at'].isoformat()}"


def _dump(entries: dict[str, dict], locate) -> Dump:
    files = {
        kind: RemoteFile(kind=kind, name=e["file_name"], location=locate(e), version=_version(e),
                         size=e["size"], sha256=e["checksum"])
        for kind, e in entries.items()
    }
    date = entries["posts"]["updated_at"].date().isoformat()
    return Dump(date=date, files=files, layout="current")


def origins_for(index_url: str, entries: dict[str, dict]) -> Origins:
    """The index's own origin, plus every host its entries name over https.

    An entry's url on another host over plain http is refused outright.
    """
    https_hosts = []
    for e in entries.values():
        url = e["url"]
        if not isinstance(url, str) or urlsplit(url).scheme.lower() not in ("http", "https") \
                or not urlsplit(url).hostname:
            raise DumpSourceError(f"{index_url}: entry {e['name']!r} has no absolute url "
                                  f"({url!r})")
        if urlsplit(url).scheme.lower() == "https":
            https_hosts.append(urlsplit(url).hostname or "")
    origins = Origins(index_url, https_hosts=tuple(https_hosts))
    for e in entries.values():
        if not origins.allows(e["url"]):
            raise DumpSourceError(
                f"{index_url}: refusing {e['name']} at {e['url']}: another host than the "
                "index's, over plain http (only https is accepted for other hosts)")
    return origins


def remote_dump(raw: bytes, index_url: str) -> tuple[Dump, Origins]:
    entries = parse_index(raw, index_url)
    origins = origins_for(index_url, entries)
    return _dump(entries, lambda e: e["url"]), origins


def local_dump(folder: Path) -> Dump:
    """A folder holding undated files with their ``db_exports.json`` beside them."""
    index = folder / INDEX_NAME
    try:
        raw = index.read_bytes()
    except OSError as exc:
        raise DumpSourceError(f"cannot read {index}: {exc.strerror}") from None
    entries = parse_index(raw, str(index))
    return _dump(entries, lambda e: str(folder / e["file_name"]))
