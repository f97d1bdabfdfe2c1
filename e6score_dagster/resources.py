"""Dagster resources: where state lives, where dumps come from, and the DuckDB store."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster.local_state import DB_FILE, default_home  # noqa: F401  (re-exported)
from e6score_dagster.sources import DumpSource

DEFAULT_SOURCE = "https://e621.net/db_exports.json"
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def default_source() -> str:
    return os.environ.get("E6SCORE_DUMP_SOURCE") or DEFAULT_SOURCE


class StateDir(dg.ConfigurableResource):
    """The folder for runtime state (`$E6SCORE_HOME`): dumps, features, params, exports."""

    home: str
    keep_dumps: int = 3
    """Retention (env E6SCORE_KEEP_DUMPS): each stage keeps the files of its last N published
    builds (dumps, params, exports) plus the one in use; older ones go when a newer one is
    published."""

    @property
    def root(self) -> Path:
        return Path(self.home)

    def sub(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def dumps(self) -> Path:
        return self.sub("dumps")

    @property
    def features(self) -> Path:
        return self.sub("features")

    @property
    def params(self) -> Path:
        return self.sub("params")

    @property
    def exports(self) -> Path:
        return self.sub("exports")

    def sweep(self, folder: Path) -> list[str]:
        """Remove the `.NAME.part` files and folders a killed run left in `folder`.

        Called by a stage while it holds its lock, so no live build of it is writing there.
        """
        swept = []
        for p in folder.glob(".*.part"):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            swept.append(p.name)
        return swept

    def prune(
        self, folder: Path, keep: set[Path], protect: Callable[[Path], bool] | None = None
    ) -> list[str]:
        """Retention: remove every entry of `folder` that holds none of `keep` (nor is protected).

        `keep` is the files of the builds retention keeps (the last `keep_dumps` published ones
        and the one in use), so orphans of killed or rejected builds go too.
        """
        keep = {p.resolve() for p in keep}
        removed = []
        for entry in sorted(folder.iterdir()):
            held = entry.resolve()
            if any(k == held or held in k.parents for k in keep):
                continue
            if protect is not None and protect(entry):
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry.name)
        return removed


class DumpSourceResource(dg.ConfigurableResource):
    """The e621 export (its JSON index, a mirror of either layout, or a local folder) that
    `raw_dump` reads from. The User-Agent comes from `$E6SCORE_USER_AGENT`."""

    location: str = DEFAULT_SOURCE
    probe_days: int = 7
    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 1.0

    def client(self, progress=None) -> DumpSource:
        location = self.location
        if "://" not in location:
            location = str(Path(location).expanduser().resolve())
        return DumpSource(
            location,
            timeout_s=self.timeout_s,
            probe_days=self.probe_days,
            retries=self.retries,
            backoff_s=self.backoff_s,
            progress=progress,
        )


class LockedDuckDBResource(DuckDBResource):
    """DuckDB, one process at a time: a file lock next to the database.

    DuckDB lets only one process open a file for writing, and the stock resource gives up after
    ~100 s of retries, while one of our steps may hold the database for minutes. Two runs
    started at once (CLI and UI, or two schedules) therefore queue here instead of failing,
    whatever the Dagster instance's pool limits are.
    """

    @contextmanager
    def get_connection(self) -> Iterator:
        lock_path = Path(self.database).with_name(Path(self.database).name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        spill = (self.connection_config or {}).get("temp_directory")
        if spill:  # created here, by the first step that uses DuckDB, not at definition load
            Path(spill).mkdir(parents=True, exist_ok=True)
        with lock_path.open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                t0 = time.monotonic()
                logging.getLogger("e6score").warning(
                    "another run is using %s; waiting for it", self.database
                )
                fcntl.flock(fh, fcntl.LOCK_EX)
                logging.getLogger("e6score").warning(
                    "got %s after %.0f s", self.database, time.monotonic() - t0
                )
            try:
                with super().get_connection() as conn:
                    try:
                        yield conn
                    finally:  # the stock resource closes only when the block succeeds
                        conn.close()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class QualityGates(dg.ConfigurableResource):
    """Thresholds of the blocking checks that stop a bad dump before it reaches the scores."""

    max_rejected_share: float = 0.01
    max_post_count_drop: float = 0.2


def duckdb_resource(home: Path, memory_limit: str = "2GB") -> DuckDBResource:
    """Bounded memory and a spill folder, so DuckDB stays out of core on full-size dumps."""
    tmp = home / "tmp" / "duckdb"  # created by get_connection
    return LockedDuckDBResource(
        database=str(home / DB_FILE),
        connection_config={
            "memory_limit": memory_limit,
            "threads": os.cpu_count() or 2,
            "temp_directory": str(tmp),
            "preserve_insertion_order": False,
        },
    )


def make_resources(home: Path | None = None, source: str | None = None) -> dict:
    home = Path(home) if home is not None else default_home()
    keep = int(os.environ.get("E6SCORE_KEEP_DUMPS", "3"))
    return {
        "state": StateDir(home=str(home), keep_dumps=keep),
        "dump_source": DumpSourceResource(location=source or default_source()),
        "duckdb": duckdb_resource(home),
        "gates": QualityGates(
            max_rejected_share=float(os.environ.get("E6SCORE_MAX_REJECTED_SHARE", "0.01")),
            max_post_count_drop=float(os.environ.get("E6SCORE_MAX_POST_COUNT_DROP", "0.2")),
        ),
    }
