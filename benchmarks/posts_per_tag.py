"""How much of the gap to the oracle is the data's: the same world, more posts per tag.

    python benchmarks/posts_per_tag.py                      # classic, heavy_tails; 100k posts
    python benchmarks/posts_per_tag.py --worlds uploaders --posts 100000 --ratios 5 50 500

In the worlds of `e6score_dagster.synthetic` the vocabulary grows with the dump (posts /
posts_per_tag tags, as on e621), so a tag has about as many posts at 1M as at 100k and a model
estimates most tags' effects from a handful of posts, while the oracle knows them. Here each
world's dump is generated again at the same size with a smaller vocabulary (more posts per
tag), the pipeline runs on it headless from an empty home as in `worlds.py`, and the gap to
that dump's own oracle is measured the same way. If the gap is the data's, it shrinks as the
tags get more posts; if it is the model's (a wrong form, a bad fit), it stays. Writes
benchmarks/posts_per_tag.json and its section of benchmarks/QUALITY.md. Never run on the
held-back world.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import worlds

from e6score_dagster.synthetic import HELD_BACK_WORLD, WORLDS
from e6score_dagster.synthetic.worlds import get_world

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "posts_per_tag.json"
BEGIN, END = "<!-- posts-per-tag:begin -->", "<!-- posts-per-tag:end -->"
TUNING_WORLDS = [w for w in WORLDS if w != HELD_BACK_WORLD]


def uploader_split(world: str, posts: int, seed: int, ratio: float | None) -> dict[str, float]:
    """The held-out gap to the oracle among posts whose uploader has one post in the dump and
    among the others: a one-off uploader's hidden effect is known to the oracle and to no
    learner."""
    name = worlds._name(world, posts, seed, ratio)
    truth = pd.read_parquet(worlds.WORK / f"world-{name}" / f"truth-{worlds.DATE}.parquet")
    db = worlds.WORK / f"worlds-home-{name}" / "e6score.duckdb"
    with duckdb.connect(str(db), read_only=True) as conn:
        df = conn.execute(
            "SELECT s.id, s.fav_count, s.pred_log_mean, s.pred_log_scale, s.is_deleted, "
            "p.uploader_id FROM scored_posts s JOIN cleaned_posts p USING (id)"
        ).df()
    df = df.merge(truth, on="id")
    df["one_off"] = df.groupby("uploader_id")["id"].transform("count") == 1
    live = df[~df["is_deleted"].astype(bool)]
    held = live[worlds.holdout_mask(live["id"].to_numpy())]
    out = {"one_off_share": float(held["one_off"].mean())}
    for key, part in (("one_off", held[held["one_off"]]), ("regular", held[~held["one_off"]])):
        y = np.log1p(part["fav_count"].to_numpy())
        model = worlds.gaussian_nll(
            y, part["pred_log_mean"].to_numpy(), part["pred_log_scale"].to_numpy()
        )
        oracle = worlds.gaussian_nll(
            y, part["oracle_mean"].to_numpy(), part["oracle_sd"].to_numpy()
        )
        out[f"gap_{key}_pct"] = 100.0 * (model - oracle) / abs(oracle)
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        BEGIN,
        "",
        "| world | posts | posts per tag | held-out NLL, model | oracle | gap (mean, scale) "
        "| Spearman ratio to the oracle | gap: posts of one-off uploaders (their share) / the "
        "others' | learner told the priors: gap / hold-out rank ratio (model's) "
        "| chosen | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["world"], r["posts"], r["posts_per_tag"])):
        own_ratio = get_world(r["world"]).posts_per_tag
        own = " (the world's own)" if r["posts_per_tag"] == own_ratio else ""
        if "model_nll" not in r:
            lines.append(
                f"| {r['world']} | {r['posts']:,} | {r['posts_per_tag']:g}{own} "
                f"| no scores: {r.get('failure', '')[:80]} | | | | | | | {r['seconds']:.0f} |"
            )
            continue
        lines.append(
            f"| {r['world']} | {r['posts']:,} | {r['posts_per_tag']:g}{own} "
            f"| {r['model_nll']:.4f} | {r['oracle_nll']:.4f} "
            f"| {r['nll_gap_pct']:+.1f}% ({r['gap_mean_pct']:+.1f}, {r['gap_scale_pct']:+.1f}) "
            f"| {r['spearman_ratio']:.3f} "
            f"| {r['gap_one_off_pct']:+.1f}% / {r['gap_regular_pct']:+.1f}% "
            f"({r['one_off_share']:.0%}) "
            f"| {worlds._learner(r)} "
            f"| {r.get('chosen_candidate') or 'n/a'} "
            f"| {r['seconds']:.0f} |"
        )
    when = sorted(r["when"] for r in rows)
    lines += ["", f"Recorded {when[0]} to {when[-1]}, seed {rows[0]['seed']}.", "", END]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict]) -> None:
    RESULTS_JSON.write_text(json.dumps(rows, indent=1) + "\n")
    text = worlds.RESULTS_MD.read_text()
    section = markdown(rows)
    if BEGIN not in text:  # the first run: the section gets its title
        section = f"## Posts per tag: the same world, a smaller vocabulary\n\n{section}"
    worlds.RESULTS_MD.write_text(worlds.replace_section(text, section, BEGIN, END))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--worlds", nargs="+", choices=TUNING_WORLDS, default=["classic", "heavy_tails"]
    )
    ap.add_argument("--posts", type=int, default=100_000)
    ap.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[50.0, 500.0],
        help="posts per tag (the world's own is always measured too)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reread", action="store_true", help="re-read the last runs' homes instead of running"
    )
    args = ap.parse_args()
    rows = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    for world in args.worlds:
        own = get_world(world).posts_per_tag
        for ratio in sorted({own, *args.ratios}):
            own_or_ratio = None if ratio == own else ratio
            record = worlds.measure(
                world, args.posts, args.seed, rerun=not args.reread, posts_per_tag=own_or_ratio
            )
            record["posts_per_tag"] = ratio
            if "model_nll" in record:
                record |= uploader_split(world, args.posts, args.seed, own_or_ratio)
            record.pop("calibration", None)
            same = (world, args.posts, args.seed, ratio)
            rows = [
                r for r in rows if (r["world"], r["posts"], r["seed"], r["posts_per_tag"]) != same
            ]
            rows.append(record)
            write_results(rows)
            print(
                json.dumps(
                    {
                        k: record.get(k)
                        for k in (
                            "world",
                            "posts",
                            "posts_per_tag",
                            "model_nll",
                            "oracle_nll",
                            "nll_gap_pct",
                            "gap_mean_pct",
                            "spearman_ratio",
                            "gap_one_off_pct",
                            "gap_regular_pct",
                            "chosen_candidate",
                            "seconds",
                        )
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
