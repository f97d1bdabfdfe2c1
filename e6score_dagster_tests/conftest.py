"""Shared fixtures: generated dumps, a state folder, and a way to run assets for real."""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

# One JAX compilation cache for the whole suite and the Dagster processes it starts (set before
# anything imports JAX): every fit builds fresh jitted functions, and without the cache each
# one recompiles for seconds. Outside the checkout; JAX bounds its size.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "e6score-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(512 * 1024 * 1024))

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# What running Python and pytest always leaves, and the checkout's own environment.
_BYPRODUCTS = re.compile(r"__pycache__/|\.pytest_cache/|\.ruff_cache/|\.egg-info/|^!! \.venv")


def checkout_state() -> frozenset[str] | None:
    """`git status` of the checkout, ignored files included (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain=v1", "--ignored=matching", "--untracked-files=normal"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return frozenset(line for line in out.stdout.splitlines() if not _BYPRODUCTS.search(line))


# Taken before the project is imported: importing it must not create anything either.
_CHECKOUT_AT_IMPORT = checkout_state()


@pytest.fixture(scope="session")
def checkout_before() -> frozenset[str] | None:
    """The checkout as pytest's own import of this file found it (a test module importing
    conftest gets another, later snapshot: use this fixture)."""
    return _CHECKOUT_AT_IMPORT

import dagster as dg  # noqa: E402

from e6score_dagster.definitions import PIPELINE  # noqa: E402
from e6score_dagster.resources import QualityGates, make_resources  # noqa: E402
from e6score_dagster.schema import POSTS_COLUMNS, TAGS_COLUMNS  # noqa: E402
from e6score_dagster.synthetic import generate_dump  # noqa: E402

DUMP_DATE = "2026-11-20"
# Short fits with every candidate and K = 3 folds, for the tests of what fitted_params
# publishes and reports (test_end_to_end.py). Model quality is measured by
# benchmarks/worlds.py, selection itself tested on the pure package (test_select.py).
FAST_TRAINING = {"epochs": 4, "batch_size": 256, "hash_bits": 12, "mlp_widths": [32],
                 "baseline_min_steps": 100, "folds": 3}
# The orchestration tests (versions, faults, automation, the UI, the CLI) assert nothing about
# which model is published, only that one is: two candidates and two folds keep them quick.
QUICK_TRAINING = {**FAST_TRAINING, "candidates": ["constant", "linear"], "folds": 2}


@pytest.fixture(autouse=True)
def dagster_home(tmp_path_factory, monkeypatch) -> Path:
    """A DAGSTER_HOME under pytest's tmp dir for every test: without one, each `dagster`/`dg`
    CLI run makes a `.tmp_dagster_home_*` folder in its working directory (the checkout) and
    leaves it there when it is killed."""
    home = tmp_path_factory.mktemp("dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def generated_dump(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dump")
    generate_dump(out, posts=3000, date=DUMP_DATE, seed=7)
    return out


def run_config(training: dict | None = None) -> dg.RunConfig:
    return dg.RunConfig(ops={"fitted_params": {"config": training or QUICK_TRAINING}})


def materialize(
    home: Path,
    source: str | Path,
    select: Sequence | None = None,
    training: dict | None = None,
    gates: QualityGates | None = None,
) -> dg.ExecuteInProcessResult:
    """A real Dagster run of the pipeline (or part of it) with real resources.

    The blocking checks run inside their assets' steps, on the staged output; `gates` loosens
    them for tests of a stage's own behaviour on a deliberately broken dump.
    """
    assets = list(select) if select is not None else PIPELINE
    resources = make_resources(home, str(source))
    if gates is not None:
        resources["gates"] = gates
    return dg.materialize(
        assets,
        resources=resources,
        run_config=run_config(training) if any(a.key.path == ["fitted_params"] for a in assets)
        else None,
        raise_on_error=False,
    )


def write_csv_gz(path: Path, header: Iterable[str], rows: Iterable[Sequence]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(header))
    w.writerows(rows)
    path.write_bytes(gzip.compress(buf.getvalue().encode("utf-8")))


def post_row(**overrides) -> list[str]:
    """One posts row in the export's spelling; overrides by column name."""
    base = {
        "id": "1", "uploader_id": "10", "created_at": "2019-03-04 17:22:10.123456",
        "md5": "0123456789abcdef0123456789abcdef", "source": "", "rating": "s",
        "image_width": "800", "image_height": "600", "tag_string": "fox solo",
        "locked_tags": "", "fav_count": "5", "file_ext": "png", "parent_id": "",
        "change_seq": "100", "approver_id": "", "file_size": "12345", "comment_count": "0",
        "description": "", "duration": "", "updated_at": "2019-03-05 10:00:00.000001",
        "is_deleted": "f", "is_pending": "f", "is_flagged": "f", "score": "3",
        "up_score": "4", "down_score": "-1", "is_rating_locked": "f",
        "is_status_locked": "f", "is_note_locked": "f",
    }
    unknown = set(overrides) - set(base)
    assert not unknown, unknown
    base.update(overrides)
    return [base[c] for c in POSTS_COLUMNS]


def write_dump(folder: Path, date: str, posts: list[list[str]], tags: list[list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_csv_gz(folder / f"posts-{date}.csv.gz", POSTS_COLUMNS, posts)
    write_csv_gz(folder / f"tags-{date}.csv.gz", TAGS_COLUMNS, tags)
    return folder
