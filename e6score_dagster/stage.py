"""One way to build, reuse and publish a stage, shared by every asset.

A stage's version is a digest of its inputs' *published* versions, its code version (derived
from source) and its config. `begin` takes the stage's lock, sweeps what killed runs left,
checks that the inputs agree with each other, and decides whether that exact version is
already published with all its files. If not, the asset's body writes under staging names
(`<table>__staged`, `.<file>.part`), the stage's blocking checks judge the staged output, and
`finish` publishes (table swap, file rename, lineage pointer) only when they pass. A rejected
or failed build leaves the published output untouched.

Lineage is history: every build is a row of `e6score_builds` (asset, version, inputs, outcome,
reason, times); `e6score_current` points at the published build of each asset and only
publishing moves it. The view `e6score_lineage` shows the current build of each asset.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from e6score_dagster.memory import release_memory
from e6score_dagster.resources import StateDir
from e6score_dagster.store import (
    Build,
    column_schema,
    current,
    disk_bytes,
    ensure_lineage,
    fingerprint,
    history,
    now,
    table_exists,
    table_metadata,
    transaction,
    version_key,
)

STAGED_SUFFIX = "__staged"
REUSED = "is published and intact: reused"  # the log line's end when a step reuses its output


def staged_table(table: str) -> str:
    return table + STAGED_SUFFIX


def staged_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.part")


@contextmanager
def _stage_lock(state: StateDir, asset: str) -> Iterator[None]:
    """One build of an asset at a time: a second run waits, then finds the first's result."""
    path = state.sub("locks") / f"{asset}.lock"
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Stage:
    """One build of one asset between `begin` and `finish`."""

    context: dg.AssetExecutionContext
    duckdb: DuckDBResource
    state: StateDir
    asset: str
    version: str
    code_version: str
    config: dict[str, Any] | None
    inputs: dict[str, Build]
    dump_date: str | None
    tables: tuple[str, ...]
    folder: Path | None
    keep: int
    published: Build | None
    """The build in use before this one (the last accepted build)."""
    reuse: Build | None = None
    """Set when this exact version is published with all its files: nothing to build."""
    build_id: int | None = None
    staged: dict[Path, Path] = field(default_factory=dict)
    adopted: list[Path] = field(default_factory=list)
    protect: Callable[[Path], bool] | None = None

    # ------------------------------------------------------------------ for the body

    @property
    def input_versions(self) -> dict[str, str]:
        return {name: b.version for name, b in self.inputs.items()}

    def table(self, name: str) -> str:
        """The staging name under which the body writes table `name`."""
        if name not in self.tables:
            raise ValueError(f"{self.asset} does not own table {name}; declare it in begin()")
        return staged_table(name)

    def path(self, final: Path) -> Path:
        """The staging path under which the body writes `final` (a file or a folder)."""
        part = staged_path(final)
        self.staged[final] = part
        return part

    def adopt(self, *finals: Path) -> None:
        """Files already written in place and verified by the body (raw_dump's downloads)."""
        self.adopted.extend(finals)

    @property
    def tmp(self) -> Path:
        """A scratch folder of this stage, emptied at the start of every build."""
        return self.state.sub("tmp") / self.asset

    # ------------------------------------------------------------------ results

    def lineage_metadata(
        self, build: Build | None, *, reused: bool, published: bool
    ) -> dict[str, Any]:
        """What every materialisation says about the build in use and where it came from."""
        return {
            "dump_date": (build.dump_date if build else None) or "",
            "data_version": build.version if build else "none",
            "built_from": dg.MetadataValue.json(build.inputs if build else {}),
            "code_version": self.code_version,
            "reused": reused,
            "published": published,
            "disk_bytes": dg.MetadataValue.int(self.disk_bytes()),
        }

    def reused_result(self, **metadata: Any) -> dg.MaterializeResult:
        """Nothing to build: report the published build (its tables' shapes and lineage)."""
        assert self.reuse is not None
        self.context.log.info(f"{self.asset} {self.version} {REUSED}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(self.reuse.version),
            metadata={
                **metadata,  # the asset's own entries lead on its page
                **self._tables_metadata(self.tables),
                **self.lineage_metadata(self.reuse, reused=True, published=True),
            },
            # The checks judged this build before it was published; their verdicts stand.
            check_results=[
                dg.AssetCheckResult(
                    check_name=name,
                    passed=bool(r["passed"]),
                    metadata={**r["metadata"], "judged_version": self.reuse.version},
                )
                for name, r in self.reuse.info.get("checks", {}).items()
            ],
        )

    def finish(
        self,
        info: Mapping[str, Any],
        checks: Sequence[dg.AssetCheckResult] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> dg.MaterializeResult:
        """Publish the staged output if every blocking check passed; otherwise reject it."""
        failed = [c for c in checks if not c.passed]
        metadata = dict(metadata or {})
        info = {**info, "checks": {str(c.check_name): _verdict(c) for c in checks}}
        if failed:
            reason = "blocked by " + ", ".join(str(c.check_name) for c in failed)
            self._reject(reason, info)
            in_use = self._current()
            self.context.log.warning(
                f"{self.asset} {self.version} rejected ({reason}); "
                f"{'the published ' + in_use.version if in_use else 'nothing'} stays in use"
            )
            kept = {k: v for k, v in metadata.items() if not k.startswith("dagster/")}
            return dg.MaterializeResult(
                data_version=dg.DataVersion(in_use.version if in_use else "none"),
                metadata={
                    **kept,
                    **self.lineage_metadata(in_use, reused=False, published=False),
                    "rejected_version": self.version,
                    "rejected_reason": reason,
                },
                check_results=list(checks),
            )
        build = self._publish(info)
        removed = self._prune()
        if removed:
            self.context.log.info(f"retention removed {removed}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(build.version),
            metadata={
                **metadata,  # the asset's own entries lead on its page
                **self._tables_metadata(self.tables),
                **self.lineage_metadata(build, reused=False, published=True),
            },
            check_results=list(checks),
        )

    # ------------------------------------------------------------------ internals

    def _current(self) -> Build | None:
        with self.duckdb.get_connection() as conn:
            return current(conn, self.asset)

    def _tables_metadata(self, tables: Sequence[str]) -> dict[str, Any]:
        """The asset's own table as Dagster's row count and column schema; any further table
        it writes (`rejected_rows`) as `<table>_columns`, so the UI describes it too."""
        meta: dict[str, Any] = {}
        with self.duckdb.get_connection() as conn:
            for table in (t for t in tables if table_exists(conn, t)):
                if table == tables[0]:
                    meta.update(table_metadata(conn, table))
                else:
                    meta[f"{table}_columns"] = column_schema(conn, table)
        return meta

    def disk_bytes(self) -> int:
        """What this stage keeps on disk: its folder, or an estimate of its tables' blocks."""
        if self.folder is not None:
            return disk_bytes(self.folder)
        with self.duckdb.get_connection() as conn:
            size = conn.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
            blocks = 0
            for t in self.tables:
                if table_exists(conn, t):
                    blocks += conn.execute(
                        f"SELECT count(DISTINCT block_id) FROM pragma_storage_info('{t}') "
                        "WHERE block_id >= 0"
                    ).fetchone()[0]
        return int(blocks * size)

    def _record(
        self,
        conn: duckdb.DuckDBPyConnection,
        outcome: str,
        reason: str | None,
        info: Mapping[str, Any],
        files: Mapping[str, Any],
    ) -> None:
        conn.execute(
            "UPDATE e6score_builds SET outcome = ?, reason = ?, finished_at = ?, info = ?, "
            "files = ?, dump_date = ? WHERE id = ?",
            [
                outcome,
                reason,
                now(),
                json.dumps(dict(info), default=str),
                json.dumps(dict(files)),
                self.dump_date,
                self.build_id,
            ],
        )

    def _publish(self, info: Mapping[str, Any]) -> Build:
        for final, part in self.staged.items():
            if not part.exists():
                raise RuntimeError(f"{self.asset}: the body did not write {part}")
            _remove(final)
            part.replace(final)
        files = {str(final): fingerprint(final) for final in [*self.staged, *self.adopted]}
        with self.duckdb.get_connection() as conn, transaction(conn):
            for t in self.tables:
                conn.execute(f'DROP TABLE IF EXISTS "{t}"')
                conn.execute(f'ALTER TABLE "{staged_table(t)}" RENAME TO "{t}"')
            self._record(conn, "published", None, info, files)
            conn.execute(
                "INSERT OR REPLACE INTO e6score_current VALUES (?, ?, ?)",
                [self.asset, self.build_id, now()],
            )
            build = current(conn, self.asset)
        assert build is not None
        self.context.log.info(f"published {self.asset} {self.version}")
        return build

    def _reject(self, reason: str, info: Mapping[str, Any]) -> None:
        self._discard_staged()
        with self.duckdb.get_connection() as conn:
            self._record(conn, "rejected", reason, info, {})

    def _discard_staged(self) -> None:
        for part in self.staged.values():
            _remove(part)
        with self.duckdb.get_connection() as conn:
            for t in self.tables:
                conn.execute(f'DROP TABLE IF EXISTS "{staged_table(t)}"')

    def _prune(self) -> list[str]:
        """Retention: keep the files of the last `keep` published builds and of the one in use."""
        if self.folder is None:
            return []
        with self.duckdb.get_connection() as conn:
            rows = conn.execute(
                "SELECT files FROM e6score_builds WHERE asset = ? AND outcome = 'published' "
                "ORDER BY finished_at DESC LIMIT ?",
                [self.asset, max(self.keep, 1)],
            ).fetchall()
            in_use = current(conn, self.asset)
        keep = {Path(p) for (files,) in rows for p in json.loads(files or "{}")}
        keep |= {Path(p) for p in (in_use.files if in_use else {})}
        return self.state.prune(self.folder, keep, protect=self.protect)


def _verdict(check: dg.AssetCheckResult) -> dict[str, Any]:
    """A check result as plain JSON, to report again when its build is reused."""
    meta = {k: getattr(v, "value", v) for k, v in (check.metadata or {}).items()}
    return {"passed": bool(check.passed), "metadata": meta}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_inputs(asset: str, inputs: Mapping[str, Build]) -> None:
    """Inputs must agree: what one input was built from must be what is published now."""
    for name, build in inputs.items():
        for dep, version in build.inputs.items():
            if dep in inputs and inputs[dep].version != version:
                raise dg.Failure(
                    description=f"{asset}: the published {name} {build.version} was built from "
                    f"{dep} {version}, but the published {dep} is {inputs[dep].version}; "
                    f"materialise {name} first (or select its upstream assets too)"
                )


@contextmanager
def begin(
    context: dg.AssetExecutionContext,
    duckdb: DuckDBResource,
    state: StateDir,
    *,
    inputs: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    tables: Sequence[str] = (),
    folder: Path | None = None,
    keep: int | None = None,
    version: str | None = None,
    dump_date: str | None = None,
    protect: Callable[[Path], bool] | None = None,
) -> Iterator[Stage]:
    """Open a build of the asset being materialised: lock, sweep, check inputs, version, reuse.

    `inputs` are the assets whose published outputs the body reads; `tables` and `folder` are
    what the stage owns (`folder` is swept of `.part` leftovers and pruned to the last `keep`
    published builds, default `E6SCORE_KEEP_DUMPS`). `version` overrides the derived version
    (raw_dump: the content digest of the files). Inside, either return `stage.reused_result()`
    when `stage.reuse` is set, or write under `stage.table()`/`stage.path()` and return
    `stage.finish(...)`. An exception discards the staged output and records the failure.
    """
    asset = context.asset_key.to_user_string()
    code = context.assets_def.code_versions_by_key[context.asset_key] or "0"
    release_memory()  # what earlier steps of this process freed
    with _stage_lock(state, asset):
        tmp = state.sub("tmp") / asset
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        swept = state.sweep(folder) if folder is not None else []
        with duckdb.get_connection() as conn:
            ensure_lineage(conn)
            for t in tables:
                conn.execute(f'DROP TABLE IF EXISTS "{staged_table(t)}"')
            conn.execute(
                "UPDATE e6score_builds SET outcome = 'abandoned', reason = 'the run was killed "
                "or lost before it finished' WHERE asset = ? AND outcome = 'building'",
                [asset],
            )
            published = {}
            for name in inputs:
                build = current(conn, name)
                if build is None:
                    raise dg.Failure(f"{asset}: `{name}` has not been published yet")
                published[name] = build
            check_inputs(asset, published)
            versions = {n: b.version for n, b in published.items()}
            if version is None:
                version = version_key(asset, versions, code, dict(config or {}))
            if dump_date is None:
                dump_date = next((b.dump_date for b in published.values() if b.dump_date), None)
            in_use = current(conn, asset)
            stage = Stage(
                context=context,
                duckdb=duckdb,
                state=state,
                asset=asset,
                version=version,
                code_version=code,
                config=dict(config) if config else None,
                inputs=published,
                dump_date=dump_date,
                tables=tuple(tables),
                folder=folder,
                keep=keep if keep is not None else state.keep_dumps,
                published=in_use,
                protect=protect,
            )
            stage.reuse = _reusable(conn, stage)
            if stage.reuse is None:
                stage.build_id = conn.execute(
                    "INSERT INTO e6score_builds (asset, version, dump_date, code_version, inputs, "
                    "config, outcome, started_at) VALUES (?, ?, ?, ?, ?, ?, 'building', ?) "
                    "RETURNING id",
                    [
                        asset,
                        version,
                        dump_date,
                        code,
                        json.dumps(versions),
                        json.dumps(stage.config, default=str),
                        now(),
                    ],
                ).fetchone()[0]
        if swept:
            context.log.info(f"swept what a killed run left: {swept}")
        if stage.reuse is not None:
            yield stage
            return
        try:
            yield stage
        except BaseException as exc:
            stage._discard_staged()
            with duckdb.get_connection() as conn:
                reason = str(getattr(exc, "description", None) or exc) or type(exc).__name__
                stage._record(conn, "failed", reason.splitlines()[0][:500], {}, {})
            raise


def _reusable(conn: duckdb.DuckDBPyConnection, stage: Stage) -> Build | None:
    """The published build of exactly this version, if all its outputs are there.

    A build that was published before but is not the one in use (a config switched back) is
    published again by moving the pointer, if it owns no table (tables hold one version).
    """
    in_use = stage.published
    if in_use is not None and in_use.version == stage.version:
        tables_ok = all(table_exists(conn, t) for t in stage.tables)
        return in_use if tables_ok and in_use.files_intact() else None
    if stage.tables:
        return None
    for build in history(conn, stage.asset):
        if build.version == stage.version and build.outcome == "published":
            if build.files and build.files_intact():
                conn.execute(
                    "INSERT OR REPLACE INTO e6score_current VALUES (?, ?, ?)",
                    [stage.asset, build.id, now()],
                )
                stage.published = build
                return build
            return None
    return None
