"""The remote e621 export and its local, verified copy."""

import hashlib
import json
import time
import warnings
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster import stage
from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.code_versions import code_version
from e6score_dagster.csv_read import read_header
from e6score_dagster.resources import DATE_RE, DumpSourceResource, StateDir
from e6score_dagster.sources import DumpFiles, DumpSourceError


def _failure(exc: DumpSourceError) -> dg.Failure:
    """One line for the person running it: what is wrong with the source and what to do."""
    return dg.Failure(description=" ".join(str(exc).split()))


def _observe_e621_dump(
    context: dg.AssetExecutionContext, dump_source: DumpSourceResource
) -> dg.DataVersion:
    """The dump's identity (its checksums): an unchanged, re-listed export yields the same
    version, so nothing downstream runs; a new export under the same names does."""
    try:
        dump = dump_source.client().newest()
    except DumpSourceError as exc:
        raise _failure(exc) from None
    context.log.info(
        f"current dump at {dump_source.location}: {dump.date} ({dump.layout} layout), "
        f"identity {dump.identity}"
    )
    return dg.DataVersion(dump.identity)


# Observable source assets are "beta" in Dagster 1.13 yet the documented way to model an
# external source; the warning would otherwise greet every CLI start.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    e621_dump = dg.observable_source_asset(
        name="e621_dump",
        group_name="ingest",
        description="The current e621 database export at `E6SCORE_DUMP_SOURCE` (observed, not "
        "stored). Its data version is the dump's identity: the posts and tags checksums from "
        "the export index (size and date where a checksum is missing; size, ETag and "
        "Last-Modified for the old dated layout).",
    )(_observe_e621_dump)


def content_hash(files: DumpFiles) -> str:
    """A digest of the verified files' sha256 sidecars: the dump's data version."""
    h = hashlib.sha256()
    for path in (files.posts, files.tags, files.pools):
        if path is None:
            continue
        record = json.loads(path.with_name(path.name + ".ok").read_text())
        h.update(f"{path.name}:{record['sha256']}\n".encode())
    return h.hexdigest()


@dg.asset(
    group_name="ingest",
    kinds={"http", "gzip"},
    code_version=code_version(__name__),
    pool="duckdb",
    deps=["e621_dump"],
    automation_condition=ON_NEW_DATA_VERSION,
    description="The current dump (posts and tags required; pools, tag aliases and "
    "implications when present), downloaded once, verified (size and SHA-256 against the "
    "export index, gzip integrity) and kept under `$E6SCORE_HOME/dumps/DATE/`.",
)
def raw_dump(
    context: dg.AssetExecutionContext,
    dump_source: DumpSourceResource,
    state: StateDir,
    duckdb: DuckDBResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    source = dump_source.client(progress=context.log.info)
    try:
        # Resolving the source first: a wrong, unreachable or refusing source fails here,
        # before any folder is created.
        source.newest_date()
        files = source.fetch_newest(state.root / "dumps")  # older dump only on a 404
    except DumpSourceError as exc:
        raise _failure(exc) from None
    context.log.info(f"using dump {files.date} from {dump_source.location}")
    if files.fallback:
        context.log.warning(f"fell back to the older dump {files.date}: {files.fallback}")
    sha256 = content_hash(files)
    # The dump's version is its content: the files are its output, verified in place.
    with stage.begin(
        context, duckdb, state, version=sha256[:16], dump_date=files.date,
        folder=state.dumps, protect=_keep_newer_downloads(files.date),
    ) as st:
        meta = {
            **_dump_metadata(files, dump_source.location, sha256),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if st.reuse:
            return st.reused_result(**meta)
        st.adopt(*files.paths().values())
        info = {
            **{kind: str(path) for kind, path in files.paths().items()},
            "pools": str(files.pools) if files.pools else None,
            "sha256": sha256,
            "identity": files.identity,
            "layout": files.layout,
            "source": dump_source.location,
        }
        return st.finish(info, metadata=meta)


def _keep_newer_downloads(current_date: str):
    """Retention spares dump folders newer than the one in use: resumable downloads."""

    def protect(entry: Path) -> bool:
        return bool(DATE_RE.fullmatch(entry.name)) and entry.name > current_date

    return protect


def _dump_metadata(files: DumpFiles, location: str, sha256: str) -> dict:
    return {
        "source": location,
        "layout": files.layout,
        "identity": files.identity,
        "fell_back": files.fallback is not None,
        "fallback_reason": files.fallback or "",
        "content_sha256": sha256,
        **{f"{k}_bytes": dg.MetadataValue.int(v) for k, v in files.sizes().items()},
        "path": dg.MetadataValue.path(str(files.posts.parent)),
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(c, "text") for c in read_header(files.posts)]
        ),
    }
