"""Day-over-day stability of fav_score: two consecutive dumps through the same home.

    python benchmarks/stability.py --world classic --posts 20000

Generates a dump of one world (cached in benchmarks/work/), derives the next day's dump from it
(the dump date one day later; every post gains the favourites a day brings, most for young
posts; a few new uploads), runs the pipeline headless on the first dump and then on the next
one in the same home (the second fit faces the gate against the first's params), and reports
the rank correlation of fav_score for the posts present in both (`model.stability`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from e6score_dagster.model.stability import rank_stability
from e6score_dagster.synthetic import generate_dump

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "stability.json"  # one record per world and size, the newest run's
DATE = "2026-11-20"


def next_day(src: Path, dst: Path, date: str, seed: int = 0) -> str:
    """The dump a day later: favourites grow by a share that falls with age; 0.1% new posts."""
    new_date = (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()
    dst.mkdir(parents=True, exist_ok=True)
    posts = pd.read_csv(src / f"posts-{date}.csv.gz", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    created = pd.to_datetime(posts["created_at"], format="mixed")
    age = (pd.Timestamp(date) - created).dt.total_seconds().to_numpy() / 86400
    fav = posts["fav_count"].astype(np.int64).to_numpy()
    growth = 0.5 / (1.0 + np.maximum(age, 0))
    posts["fav_count"] = (fav + rng.poisson(fav * growth + 0.05)).astype(str)
    fresh = posts.sample(frac=0.001, random_state=seed).copy()
    fresh["id"] = (posts["id"].astype(np.int64).max() + 1 + np.arange(len(fresh))).astype(str)
    fresh["created_at"] = f"{new_date} 00:00:00.000000"
    fresh["fav_count"] = "0"
    posts = pd.concat([posts, fresh], ignore_index=True)
    with gzip.open(dst / f"posts-{new_date}.csv.gz", "wt", encoding="utf-8", newline="") as f:
        posts.to_csv(f, index=False)
    shutil.copy(src / f"tags-{date}.csv.gz", dst / f"tags-{new_date}.csv.gz")
    return new_date


def run(source: Path, home: Path) -> float:
    env = {**os.environ, "E6SCORE_HOME": str(home), "E6SCORE_DUMP_SOURCE": str(source)}
    t0 = time.perf_counter()
    subprocess.run(
        ["dagster", "asset", "materialize", "-m", "e6score_dagster", "--select", "*"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def scores(home: Path) -> pd.DataFrame:
    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        return conn.execute("SELECT id, fav_score FROM scored_posts").df()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="classic")
    ap.add_argument("--posts", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = WORK / f"stability-{args.world}-{args.posts}-s{args.seed}"
    shutil.rmtree(base, ignore_errors=True)
    day1, day2, home = base / "day1", base / "day2", base / "home"
    generate_dump(day1, args.posts, DATE, args.seed, world=args.world)
    next_day(day1, day2, DATE, args.seed)
    s1 = run(day1, home)
    first = scores(home)
    s2 = run(day2, home)
    second = scores(home)
    result = {
        "world": args.world,
        "posts": args.posts,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": [round(s1, 1), round(s2, 1)],
        **rank_stability(
            first["id"].to_numpy(),
            first["fav_score"].to_numpy(),
            second["id"].to_numpy(),
            second["fav_score"].to_numpy(),
        ),
    }
    print(json.dumps(result))
    records = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    records = [r for r in records if (r["world"], r["posts"]) != (args.world, args.posts)]
    RESULTS.write_text(json.dumps([*records, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
