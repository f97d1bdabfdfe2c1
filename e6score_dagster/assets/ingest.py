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
from e6score_dagster.dump_source import DumpFiles
from e6score_dagster.resources import DATE_RE, DumpSourceResource, StateDir


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


def _keep_newer_downloads(current_date: str):
    """Retention spares dump folders newer than the one in use: resumable downloads."""

    def protect(entry: Path) -> bool:
        return bool(DATE_RE.fullmatch(entry.name)) and entry.name > current_date

    return protect


def _dump_metadata(files: DumpFiles, location: str, sha256: str) -> dict:
    return {
        "source": location,
        "content_sha256": sha256,
        **{f"{k}_bytes": dg.MetadataValue.int(v) for k, v in files.sizes().items()},
        "path": dg.MetadataValue.path(str(files.posts.parent)),
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(c, "text") for c in read_header(files.posts)]
        ),
    }


@dg.asset(
    group_name="ingest",
    kinds={"http", "gzip"},
    code_version=code_version(__name__),
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
    context.log.info(f"using dump {files.date} from {dump_source.location}")
    sha256 = content_hash(files)
    # The dump's version is its content: the files are its output, verified in place.
    with stage.begin(
        context, duckdb, state, version=sha256[:16], dump_date=files.date,
        folder=state.dumps, protect=_keep_newer_downloads(files.date),
    ) as st:
        meta = {**_dump_metadata(files, dump_source.location, sha256),
                "seconds": round(time.perf_counter() - t0, 2)}
        if st.reuse:
            return st.reused_result(**meta)
        paths = [p for p in (files.posts, files.tags, files.pools) if p is not None]
        st.adopt(*paths)
        info = {
            "posts": str(files.posts),
            "tags": str(files.tags),
            "pools": str(files.pools) if files.pools else None,
            "sha256": sha256,
            "source": dump_source.location,
        }
        return st.finish(info, metadata=meta)
