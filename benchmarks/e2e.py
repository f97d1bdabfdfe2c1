"""End-to-end benchmark: the headless command users run, timed with /usr/bin/time -v.

    python benchmarks/e2e.py --posts 1000000            # generates the dump once, then reuses it
    python benchmarks/e2e.py --source data/sample --label sample

Appends one record per run to benchmarks/e2e.json and rewrites benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS_JSON = HERE / "e2e.json"
RESULTS_MD = HERE / "RESULTS.md"
DATE = "2026-11-20"
STEP_RE = re.compile(
    r" - (\w+) - STEP_SUCCESS - Finished execution of step \"\w+\" in ([\dhms.]+)\."
)
UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Dagster's step durations: '153ms', '5.51s', '3m50s', '1h2m3s'."""
    return sum(float(n) * UNITS[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))


def ensure_dump(posts: int, seed: int) -> Path:
    out = WORK / f"dump-{posts}-s{seed}"
    if not (out / f"posts-{DATE}.csv.gz").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "e6score_dagster.synthetic",
                "--posts",
                str(posts),
                "--date",
                DATE,
                "--out",
                str(out),
                "--seed",
                str(seed),
            ],
            check=True,
        )
    return out


def time_v(cmd: list[str], env: dict, log: Path) -> dict:
    with log.open("w") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"run failed (rc {proc.returncode}); see {log}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", text).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    steps = {name: parse_duration(d) for name, d in STEP_RE.findall(text)}
    return {"wall_s": round(seconds, 1), "peak_rss_mb": round(rss_kb / 1024), "steps_s": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int)
    ap.add_argument("--source", help="an existing dump folder instead of a generated one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label")
    args = ap.parse_args()
    source = Path(args.source) if args.source else ensure_dump(args.posts, args.seed)
    label = args.label or f"{args.posts:,} posts"
    slug = re.sub(r"\W+", "_", label).strip("_")
    WORK.mkdir(parents=True, exist_ok=True)
    home = WORK / f"home-{slug}"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "E6SCORE_HOME": str(home), "E6SCORE_DUMP_SOURCE": str(source)}
    cmd = ["dagster", "asset", "materialize", "-m", "e6score_dagster", "--select", "*"]
    record = {
        "label": label,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(cmd),
        "source": str(source),
    }
    record.update(time_v(cmd, env, WORK / f"{slug}.log"))
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        info = json.loads(
            conn.execute(
                "SELECT info FROM e6score_lineage WHERE asset = 'fitted_params'"
            ).fetchone()[0]
        )
        record["posts_scored"] = conn.execute("SELECT count(*) FROM scored_posts").fetchone()[0]
    record["holdout"] = info["metrics"]
    record["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    runs = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    runs = [r for r in runs if r["label"] != label] + [record]
    RESULTS_JSON.write_text(json.dumps(runs, indent=1) + "\n")
    write_md(runs)
    print(json.dumps(record, indent=1))


def write_md(runs: list[dict]) -> None:
    lines = [
        "# End-to-end results",
        "",
        "Recorded by `python benchmarks/e2e.py` (see its docstring): the headless command",
        "`dagster asset materialize -m e6score_dagster --select '*'` under `/usr/bin/time -v`,",
        "from an empty `E6SCORE_HOME` (download from a local folder included, dump generation",
        "excluded). Peak RSS is the largest process of the run (all steps run in one process).",
        "",
        "| run | posts scored | wall | peak RSS | held-out NLL | constant log-normal NLL "
        "| linear baseline NLL | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        h = r["holdout"]
        constant = h.get("constant_nll", h.get("baseline_constant_nll"))
        linear = f"{h['linear_nll']:.4f}" if "linear_nll" in h else "not measured"
        lines.append(
            f"| {r['label']} | {r['posts_scored']:,} | {r['wall_s']:.0f} s "
            f"| {r['peak_rss_mb']:,} MB | {h['nll']:.4f} | {constant:.4f} | {linear} "
            f"| {r['machine']} |"
        )
    lines += ["", "Per-step seconds:", ""]
    for r in runs:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps_s"].items())
        lines.append(f"- {r['label']}: {steps}")
    RESULTS_MD.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
