"""The remote e621 export and its local, verified copy."""

import hashlib
import json
import time
import warnings

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.csv_read import read_header
from e6score_dagster.dump_source import DumpFiles
from e6score_dagster.resources import DumpSourceResource, StateDir
from e6score_dagster.store import built_from, lineage_metadata, record_lineage, transaction


def _observe_e621_dump(
    context: dg.AssetExecutionContext, dump_source: DumpSourceResource
) -> dg.DataVersion:
    """Observing an unchanged source yields the same version, so nothing downstream runs."""
    source = dump_source.client()
    date = source.newest_date()
    fingerprint = source.fingerprint(date)
    context.log.info(f"newest dump at {dump_source.location}: {fingerprint}")
    return dg.DataVersion(fingerprint)


# Observable source assets are "beta" in Dagster 1.13 yet the documented way to model an
# external source; the warning would otherwise greet every CLI start.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    e621_dump = dg.observable_source_asset(
        name="e621_dump",
        group_name="ingest",
        description="The newest e621 database export at `E6SCORE_DUMP_SOURCE` (observed, not "
        "stored). Its data version is the dump date plus each file's size and ETag.",
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
    code_version="1",
    pool="duckdb",
    deps=["e621_dump"],
    automation_condition=ON_NEW_DATA_VERSION,
    description="The newest dump present for both posts and tags, downloaded once, verified "
    "(size, gzip integrity, sha256) and kept under `$E6SCORE_HOME/dumps/DATE/`.",
)
def raw_dump(
    context: dg.AssetExecutionContext,
    dump_source: DumpSourceResource,
    state: StateDir,
    duckdb: DuckDBResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    source = dump_source.client(progress=context.log.info)
    files = source.fetch_newest(state.dumps)  # falls back to an earlier dump if need be
    date = files.date
    context.log.info(f"using dump {date} from {dump_source.location}")
    version = content_hash(files)
    key = version[:16]
    info = {
        "key": key,
        "posts": str(files.posts),
        "tags": str(files.tags),
        "pools": str(files.pools) if files.pools else None,
        "sha256": version,
        "source": dump_source.location,
    }
    with duckdb.get_connection() as conn, transaction(conn):
        reused = built_from(conn, "raw_dump", key) is not None
        record_lineage(conn, "raw_dump", date, info)
    sizes = files.sizes()
    return dg.MaterializeResult(
        metadata={
            **lineage_metadata(date, key, {"source": dump_source.location}, reused),
            "source": dump_source.location,
            "content_sha256": version,
            **{f"{k}_bytes": dg.MetadataValue.int(v) for k, v in sizes.items()},
            "path": dg.MetadataValue.path(str(files.posts.parent)),
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(c, "text") for c in read_header(files.posts)]
            ),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        data_version=dg.DataVersion(key),
    )
