"""The README's commands, run as a newcomer would: no Dagster supersession or beta warnings,
and the headless run ends by saying what it made, where, and what to try next."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from e6score_dagster_tests.conftest import DUMP_DATE, QUICK_TRAINING
from e6score_dagster_tests.dagster_dev import REPO_ROOT, DagsterDev

README = (REPO_ROOT / "README.md").read_text()
NOT_OURS_TO_PRINT = ("SupersessionWarning", "BetaWarning", "DeprecationWarning")
BIN = Path(sys.executable).parent  # where `pip install -e .` put `dg` and `dagster`


def readme_command(pattern: str) -> list[str]:
    """The README's command matching `pattern` (in a ```bash block), env assignments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    for block in blocks:
        for segment in re.split(r"&&|\n", block.replace("\\\n", " ")):
            words = shlex.split(segment, comments=True)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                words.pop(0)
            if re.match(pattern, " ".join(words)):
                return words
    raise AssertionError(f"no README command matches {pattern!r}")


def _env(home: Path, source: Path | str) -> dict[str, str]:
    return {
        **os.environ,
        "E6SCORE_HOME": str(home),
        "E6SCORE_DUMP_SOURCE": str(source),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _run(words: list[str], home: Path, source: Path | str) -> subprocess.CompletedProcess:
    config = json.dumps({"ops": {"fitted_params": {"config": QUICK_TRAINING}}})
    return subprocess.run(
        [*words, "--config-json", config],
        cwd=REPO_ROOT, env=_env(home, source), capture_output=True, text=True, timeout=600,
    )


def _no_foreign_warnings(output: str) -> None:
    found = [line for line in output.splitlines() if any(w in line for w in NOT_OURS_TO_PRINT)]
    assert found == [], "\n".join(found)


@pytest.mark.slow
def test_readme_headless_command_is_clean_and_ends_with_a_summary(tmp_path, generated_dump):
    words = readme_command(r"dg launch ")
    assert words[:2] == ["dg", "launch"] and words[words.index("--job") + 1] == "e6score_job"
    assert (BIN / "dg").exists(), "dg is missing: pip install -e '.[dev]' (dagster-dg-cli)"
    home = tmp_path / "home"
    run = _run(words, home, generated_dump)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    _no_foreign_warnings(output)

    summary = output[output.index("published scored_posts"):]
    assert f"scored 3,000 posts of the dump of {DUMP_DATE}" in summary
    csv_export = home / "exports" / f"score-{DUMP_DATE}.csv.gz"
    parquet_export = home / "exports" / f"score-{DUMP_DATE}.parquet"
    assert f"export {csv_export} and {parquet_export}" in summary
    assert str(home / "e6score.duckdb") in summary
    assert "next: python -m e6score_dagster.top" in summary and "dg dev" in summary
    assert csv_export.exists()

    # The Parquet export: scored_posts itself, with its types.
    table = pq.read_table(parquet_export)
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        cur = conn.execute("SELECT * FROM scored_posts ORDER BY id")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    assert table.num_rows == 3000
    assert table.column_names == names
    types = {f.name: str(f.type) for f in table.schema}
    assert types["id"] == "int64" and types["fav_count"] == "int64"
    assert types["fav_score"] == "double" and types["dump_date"] == "date32[day]"
    assert types["created_at"].startswith("timestamp") and types["is_deleted"] == "bool"
    assert table.to_pylist() == [dict(zip(names, r, strict=True)) for r in rows]

    # The contract's spelling still works (Dagster itself calls it superseded); a second run
    # on the same dump reuses everything and says the same at the end.
    legacy = _run(["dagster", "asset", "materialize", "-m", "e6score_dagster", "--select", "*"],
                  home, generated_dump)
    assert legacy.returncode == 0, (legacy.stdout + legacy.stderr)[-4000:]
    legacy_output = legacy.stdout + legacy.stderr
    assert "BetaWarning" not in legacy_output
    assert f"scored 3,000 posts of the dump of {DUMP_DATE}" in legacy_output


def test_readme_command_with_a_bad_setting_fails_in_one_line_and_creates_nothing(tmp_path):
    """What the terminal shows for a configuration error: the line naming what is wrong and
    the setting to change, then that the run stopped; no stack, no folders (the other
    configuration errors are the same kind of failure: test_current_layout_runs.py)."""
    source, home = tmp_path / "nonexistent", tmp_path / "home"
    run = _run(readme_command(r"dg launch "), home, source)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Traceback" not in output and "Stack Trace" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if " - ERROR - " in line]
    assert len(errors) == 2, "\n".join(errors)
    assert errors[0].endswith(f"raw_dump failed: dump source directory does not exist: {source} "
                              "(set E6SCORE_DUMP_SOURCE to a folder of dumps, or to e621's "
                              "index URL)")
    assert errors[1].endswith("run failed at raw_dump; the last published outputs stay in use")
    assert not home.exists()
    _no_foreign_warnings(output)


@pytest.mark.slow
def test_readme_ui_command_starts_without_warnings(tmp_path, generated_dump):
    words = readme_command(r"dg dev ")
    assert "-h" in words and words[words.index("-h") + 1] == "127.0.0.1"
    words = words[: words.index("-h")]  # DagsterDev adds the host and a free port
    server = DagsterDev(tmp_path, generated_dump, command=[str(BIN / words[0]), *words[1:]])
    try:
        server.wait_ready()
        assert server.gql("{ version }")["version"]
    finally:
        server.stop()
    _no_foreign_warnings(server.log_path.read_text(errors="replace"))
