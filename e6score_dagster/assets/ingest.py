"""The remote e621 export and its local, verified copy."""

import hashlib
import json
import time
import warnings

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.csv_read import read_header
from e6score_dagster.resources import DumpSourceResource, StateDir
from e6score_dagster.sources import DumpFiles, DumpSourceError
from e6score_dagster.store import built_from, lineage_metadata, record_lineage, transaction


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
    code_version="2",
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
    date = files.date
    context.log.info(f"using dump {date} from {dump_source.location}")
    if files.fallback:
        context.log.warning(f"fell back to the older dump {date}: {files.fallback}")
    version = content_hash(files)
    key = version[:16]
    info = {
        "key": key,
        **{kind: str(path) for kind, path in files.paths().items()},
        "pools": str(files.pools) if files.pools else None,
        "sha256": version,
        "identity": files.identity,
        "layout": files.layout,
        "source": dump_source.location,
    }
    with duckdb.get_connection() as conn, transaction(conn):
        reused = built_from(conn, "raw_dump", key) is not None
        record_lineage(conn, "raw_dump", date, info)
    return dg.MaterializeResult(
        metadata={
            **lineage_metadata(date, key, {"source": dump_source.location}, reused),
            "source": dump_source.location,
            "layout": files.layout,
            "identity": files.identity,
            "fell_back": files.fallback is not None,
            "fallback_reason": files.fallback or "",
            "content_sha256": version,
            **{f"{k}_bytes": dg.MetadataValue.int(v) for k, v in files.sizes().items()},
            "path": dg.MetadataValue.path(str(files.posts.parent)),
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(c, "text") for c in read_header(files.posts)]
            ),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        data_version=dg.DataVersion(key),
    )
