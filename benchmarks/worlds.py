"""Judge the pipeline on a family of synthetic worlds, against each world's exact oracle.

    python benchmarks/worlds.py --oracle-only --posts 100000      # no pipeline: oracle per world
    python benchmarks/worlds.py --posts 20000                     # every world, pipeline runs
    python benchmarks/worlds.py --posts 20000 100000 --worlds classic drift

For each world x size: generates the dump once (cached in benchmarks/work/), runs the pipeline
headless from an empty home (`dagster asset materialize -m e6score_dagster --select '*'`, with
E6SCORE_HOME and E6SCORE_DUMP_SOURCE set), then reads `scored_posts` and the fitted params'
metadata and compares with the truth file's oracle columns on the same held-out posts (10% by
the id hash the pipeline uses, live posts only). Writes benchmarks/worlds.json and the worlds
section of benchmarks/QUALITY.md (the held-back world apart).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from e6score_dagster.synthetic import (
    HELD_BACK_WORLD,
    WORLDS,
    generate_dump,
    get_world,
    reference,
)
from e6score_dagster.synthetic.reference import gaussian_nll

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS_JSON = HERE / "worlds.json"
RESULTS_MD = HERE / "QUALITY.md"
DATE = "2026-11-20"
HOLDOUT_FRACTION = 0.1  # the pipeline's default FeatureConfig.holdout_fraction
AGE_BUCKETS = ((0.0, 1.0, "<1d"), (1.0, 7.0, "1-7d"), (7.0, 30.0, "7-30d"), (30.0, 1e9, "older"))
MIN_GROUP = 300  # live posts a rating / file type needs to be reported
BEGIN, END = "<!-- worlds:begin -->", "<!-- worlds:end -->"


def holdout_mask(ids: np.ndarray, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """The pipeline's hold-out rule (features.holdout_sql): Knuth hash of the id."""
    return (ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32) < fraction * 2**32


def gap_split(y: np.ndarray, mean: np.ndarray, scale: np.ndarray, oracle_mean: np.ndarray,
              oracle_sd: np.ndarray) -> dict[str, float]:
    """Where the gap to the oracle lies: the model's mean with the oracle's scale, and the
    oracle's mean with the model's scale, each against the oracle (percent of its NLL)."""
    oracle = gaussian_nll(y, oracle_mean, oracle_sd)
    return {
        "gap_mean_pct": 100.0 * (gaussian_nll(y, mean, oracle_sd) - oracle) / abs(oracle),
        "gap_scale_pct": 100.0 * (gaussian_nll(y, oracle_mean, scale) - oracle) / abs(oracle),
    }


def _name(world: str, posts: int, seed: int, posts_per_tag: float | None) -> str:
    """The dump's and home's folder name; a vocabulary other than the world's own is named."""
    return f"{world}-{posts}-s{seed}" + (f"-ppt{posts_per_tag:g}" if posts_per_tag else "")


def _n_tags(posts: int, posts_per_tag: float | None) -> int | None:
    """The vocabulary's size for `posts_per_tag`; None: the world's own."""
    return int(posts / posts_per_tag) if posts_per_tag else None


def ensure_dump(world: str, posts: int, seed: int, posts_per_tag: float | None = None) -> Path:
    """The world's dump, generated once; `posts_per_tag` sets the vocabulary's size (posts /
    posts_per_tag tags) instead of the world's own."""
    out = WORK / f"world-{_name(world, posts, seed, posts_per_tag)}"
    if not (out / f"truth-{DATE}.parquet").exists():
        shutil.rmtree(out, ignore_errors=True)
        generate_dump(out, posts, DATE, seed, n_tags=_n_tags(posts, posts_per_tag), world=world)
    return out


# ------------------------------------------------------------------------------- oracle only


def oracle_only(world: str, posts: int, seed: int) -> dict:
    """The oracle's held-out NLL and Spearman with quality, straight from the generator, and
    the learner told the priors on the same posts."""
    t0 = time.perf_counter()
    p = reference.posts_of(get_world(world), posts, DATE, seed)
    live = ~p.deleted
    held = live & holdout_mask(p.ids)
    return {
        "world": world,
        "posts": posts,
        "seed": seed,
        "holdout_posts": int(held.sum()),
        "oracle_nll": gaussian_nll(p.y[held], p.oracle[held, 0], p.oracle[held, 1]),
        "oracle_spearman": float(spearmanr(p.oracle[live, 2], p.quality[live]).statistic),
        "fav_count_spearman": float(spearmanr(p.count[live], p.quality[live]).statistic),
        "seconds": round(time.perf_counter() - t0, 1),
        **reference.evaluate(p, get_world(world), holdout_mask),
    }


# ---------------------------------------------------------------------------- pipeline runs


def run_pipeline(source: Path, home: Path) -> tuple[bool, float, Path]:
    env = {**os.environ, "E6SCORE_HOME": str(home), "E6SCORE_DUMP_SOURCE": str(source)}
    cmd = ["dagster", "asset", "materialize", "-m", "e6score_dagster", "--select", "*"]
    log = home.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc == 0, time.perf_counter() - t0, log


def _params_meta(conn: duckdb.DuckDBPyConnection, home: Path) -> dict:
    """The published fit's metadata (lineage of fitted_params), else the newest params file's."""
    try:
        row = conn.execute(
            "SELECT info FROM e6score_lineage WHERE asset = 'fitted_params'"
        ).fetchone()
    except duckdb.Error:
        row = None
    if row:
        return json.loads(row[0])
    files = sorted((home / "params").glob("*.msgpack"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    from e6score_dagster.model import load_params

    return {**load_params(files[-1]).meta, "published": False}


def _candidates(meta: dict) -> dict[str, float]:
    """Held-out NLL per candidate, from the comparison table `fitted_params` records."""
    out = {name: float(row["nll"]) for name, row in (meta.get("table") or {}).items()
           if isinstance(row, dict) and isinstance(row.get("nll"), int | float)}
    constant = (meta.get("metrics") or {}).get("constant_nll")
    if "constant" not in out and isinstance(constant, int | float):
        out["constant"] = float(constant)
    return out


def _calibration(live: pd.DataFrame) -> dict:
    age = live["age_days"]
    out: dict[str, dict] = {"age": {}, "rating": {}, "file_ext": {}}
    for lo, hi, name in AGE_BUCKETS:
        sel = live.loc[(age >= lo) & (age < hi), "fav_score"]
        out["age"][name] = {"n": int(sel.size), "mean": float(sel.mean()) if sel.size else None}
    for col in ("rating", "file_ext"):
        for value, sel in live.groupby(col)["fav_score"]:
            if sel.size >= MIN_GROUP:
                out[col][str(value)] = {"n": int(sel.size), "mean": float(sel.mean())}
    return out


def measure(
    world: str, posts: int, seed: int, rerun: bool = True, posts_per_tag: float | None = None
) -> dict:
    """Run the pipeline on the world's dump (or, with rerun=False, re-read the last run)."""
    source = ensure_dump(world, posts, seed, posts_per_tag)
    home = WORK / f"worlds-home-{_name(world, posts, seed, posts_per_tag)}"
    run_file = home.with_suffix(".run.json")
    if rerun or not run_file.exists():
        shutil.rmtree(home, ignore_errors=True)
        ok, seconds, log = run_pipeline(source, home)
        run_file.write_text(json.dumps({"ok": ok, "seconds": seconds, "when": time.time()}))
    run = json.loads(run_file.read_text())
    ok, log = run["ok"], home.with_suffix(".log")
    record: dict = {
        "world": world,
        "posts": posts,
        "seed": seed,
        "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(run["when"])),
        "pipeline_ok": ok,
        "seconds": round(run["seconds"], 1),
    }
    if not ok:
        text = log.read_text()
        checks = sorted(set(re.findall(r"Asset check '(\w+)' on '(\w+)' did not pass", text)))
        tail = text.strip().splitlines()[-2:]
        record["failure"] = (
            "blocking check failed: " + ", ".join(f"{a}.{c}" for c, a in checks)
            if checks
            else " | ".join(re.sub(r"\s+", " ", t)[:200] for t in tail)
        )
    truth = pd.read_parquet(source / f"truth-{DATE}.parquet")
    db = home / "e6score.duckdb"
    if not db.exists():
        return record
    with duckdb.connect(str(db), read_only=True) as conn:
        meta = _params_meta(conn, home)
        try:
            cleaned = conn.execute("SELECT id, fav_count, is_deleted FROM cleaned_posts").df()
        except duckdb.Error:
            cleaned = pd.DataFrame()
        try:
            scored = conn.execute(
                "SELECT id, fav_count, fav_score, pred_log_mean, pred_log_scale, rating, "
                f"file_ext, is_deleted, date_diff('second', created_at, TIMESTAMP '{DATE}') "
                "/ 86400.0 AS age_days FROM scored_posts"
            ).df()
        except duckdb.Error:
            scored = pd.DataFrame()
    record["chosen_candidate"] = meta.get("chosen_candidate")
    record["published"] = meta.get("published", True) and bool(meta)
    record["reported_holdout_nll"] = meta.get("metrics", {}).get("nll")
    record["scored_fraction"] = len(scored) / len(truth)
    record["candidates_nll"] = _candidates(meta)
    if not cleaned.empty:  # the oracle on the pipeline's hold-out posts, scored or not
        held = cleaned[~cleaned["is_deleted"].astype(bool)].merge(truth, on="id")
        held = held[holdout_mask(held["id"].to_numpy())]
        y = np.log1p(held["fav_count"].to_numpy())
        record["holdout_posts"] = int(len(held))
        record["oracle_nll"] = gaussian_nll(
            y, held["oracle_mean"].to_numpy(), held["oracle_sd"].to_numpy()
        )
    if scored.empty:
        return record
    df = scored.merge(truth, on="id")
    live = df[~df["is_deleted"].astype(bool)]
    held = live[holdout_mask(live["id"].to_numpy())]
    y = np.log1p(held["fav_count"].to_numpy())
    model_nll = gaussian_nll(y, held["pred_log_mean"].to_numpy(), held["pred_log_scale"].to_numpy())
    oracle_nll = gaussian_nll(y, held["oracle_mean"].to_numpy(), held["oracle_sd"].to_numpy())
    sp_model = float(spearmanr(live["fav_score"], live["quality"]).statistic)
    sp_oracle = float(spearmanr(live["oracle_score"], live["quality"]).statistic)
    deciles = np.histogram(df["fav_score"], bins=10, range=(0.0, 1.0))[0] / len(df)
    live_deciles = np.histogram(live["fav_score"], bins=10, range=(0.0, 1.0))[0] / len(live)
    learner = reference.evaluate(
        reference.posts_of(get_world(world), posts, DATE, seed, _n_tags(posts, posts_per_tag)),
        get_world(world),
        holdout_mask,
    )
    sp_held = float(spearmanr(held["fav_score"], held["quality"]).statistic)
    record |= {
        "holdout_posts": int(len(held)),
        "model_nll": model_nll,
        "oracle_nll": oracle_nll,
        "nll_gap_pct": 100.0 * (model_nll - oracle_nll) / abs(oracle_nll),
        **gap_split(y, held["pred_log_mean"].to_numpy(), held["pred_log_scale"].to_numpy(),
                    held["oracle_mean"].to_numpy(), held["oracle_sd"].to_numpy()),
        "spearman_model": sp_model,
        "spearman_oracle": sp_oracle,
        "spearman_ratio": sp_model / sp_oracle,
        **learner,
        "gap_to_reference_pct": 100.0 * (model_nll - learner["reference_nll"]) / abs(oracle_nll),
        "spearman_ratio_holdout": sp_held / learner["holdout_spearman_oracle"],
        "fav_zscore_sd_live": float(
            ((np.log1p(live["fav_count"]) - live["pred_log_mean"]) / live["pred_log_scale"]).std()
        ),
        "calibration": _calibration(live),
        "decile_shares": [round(float(d), 4) for d in deciles],
        "decile_shares_live": [round(float(d), 4) for d in live_deciles],
    }
    return record


# ---------------------------------------------------------------------------------- report


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _gaps(r: dict) -> str:
    if "oracle_nll" not in r:
        return ""
    return ", ".join(
        f"{name} {100 * (nll - r['oracle_nll']) / abs(r['oracle_nll']):+.1f}%"
        for name, nll in r.get("candidates_nll", {}).items()
    )


def _learner(r: dict) -> str:
    """The learner told the priors: its gap to the oracle and hold-out rank ratio, and the
    model's hold-out rank ratio in brackets where the model scored."""
    if "reference_nll" not in r:
        return "not run"
    model = f" ({r['spearman_ratio_holdout']:.3f})" if "spearman_ratio_holdout" in r else ""
    return f"{r['reference_gap_pct']:+.1f}% / {r['reference_spearman_ratio']:.3f}{model}"


def _run_row(r: dict) -> str:
    if "model_nll" not in r:
        why = r.get("failure", "no scores")
        fit = r.get("reported_holdout_nll")
        unpublished = ""
        if fit is not None and "oracle_nll" in r:
            gap = 100 * (fit - r["oracle_nll"]) / abs(r["oracle_nll"])
            unpublished = f"{fit:.4f} (unpublished) | {r['oracle_nll']:.4f} | {gap:+.1f}%"
        else:
            unpublished = "no fit | | "
        return (
            f"| {r['world']} | {r['posts']:,} | {_f(r.get('scored_fraction'), '{:.0%}')} "
            f"| {unpublished} | no scores: {why[:90]} | | | | | "
            f"{r.get('chosen_candidate') or 'n/a'} | {r['seconds']:.0f} | {_gaps(r)} |"
        )
    cal = r["calibration"]
    ages = " / ".join(_f(cal["age"][name]["mean"], "{:.2f}") for _, _, name in AGE_BUCKETS)
    groups = [v["mean"] for col in ("rating", "file_ext") for v in cal[col].values()]
    worst_group = max((abs(m - 0.5) for m in groups), default=0.0)
    worst_decile = max(abs(d - 0.1) for d in r["decile_shares"])
    worst_live = max((abs(d - 0.1) for d in r.get("decile_shares_live", [])), default=math.nan)
    gaps = _gaps(r)
    split = (f" (mean {r['gap_mean_pct']:+.1f}, scale {r['gap_scale_pct']:+.1f})"
             if "gap_mean_pct" in r else "")
    return (
        f"| {r['world']} | {r['posts']:,} | {r['scored_fraction']:.0%} "
        f"| {r['model_nll']:.4f} | {r['oracle_nll']:.4f} | {r['nll_gap_pct']:+.1f}%{split} "
        f"| {r['spearman_model']:.3f} / {r['spearman_oracle']:.3f} = {r['spearman_ratio']:.3f} "
        f"| {_learner(r)} | {ages} | {worst_group:.3f} "
        f"| {100 * worst_decile:.1f} / {100 * worst_live:.1f} pp "
        f"| {r.get('chosen_candidate') or 'n/a'} | {r['seconds']:.0f} | {gaps} |"
    )


RUN_HEADER = (
    "| world | posts | scored | held-out NLL, model | oracle | gap | Spearman with quality, "
    "model / oracle = ratio | learner told the priors: gap / hold-out rank ratio (model's) "
    "| mean fav_score by age <1d / 1-7d / 7-30d / older "
    "| worst rating / file type: distance of mean from 0.5 "
    "| worst decile: distance from 10%, all / live posts "
    "| chosen | seconds "
    "| other candidates' gap |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
)


def _label(world: str) -> str:
    return f"**{world}** (held back)" if world == HELD_BACK_WORLD else world


def _oracle_table(rows: list[dict]) -> list[str]:
    lines = [
        "| world | posts | held-out live posts | oracle NLL | oracle Spearman with quality "
        "| raw fav_count Spearman | learner told the priors: gap / hold-out rank ratio "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_label(r['world'])} | {r['posts']:,} | {r['holdout_posts']:,} "
            f"| {r['oracle_nll']:.4f} "
            f"| {r['oracle_spearman']:.3f} | {r['fav_count_spearman']:.3f} | {_learner(r)} "
            f"| {r['seconds']:.0f} |"
        )
    return lines


def worlds_markdown(results: dict) -> str:
    def order(r: dict) -> tuple:
        return (r["world"] == HELD_BACK_WORLD, list(WORLDS).index(r["world"]), r["posts"])

    oracle = sorted(results.get("oracle_only", []), key=order)
    runs = sorted(results.get("runs", []), key=order)
    lines = [
        BEGIN,
        "## Worlds: the model against each world's oracle",
        "",
        "`python benchmarks/worlds.py --posts 20000` (add `--oracle-only` for the oracle alone)",
        "generates one dump per world of `e6score_dagster.synthetic` (`--world NAME`; worlds",
        "differ in the tails of tag effects, interactions, uploader effects, heteroscedastic",
        "noise, audience growth, recency and vocabulary size: see `synthetic/worlds.py`), runs",
        "the pipeline headless from an empty home and compares with the truth file's oracle:",
        "the exact predictive mean and sd of log1p(fav_count) given all visible metadata (the",
        "hidden quality and the count noise integrated out). NLL: Gaussian in log1p space on",
        "the held-out live posts (10% by the pipeline's id hash); the model's is computed from",
        "`scored_posts` (pred_log_mean, pred_log_scale) on the same posts as the oracle's.",
        "In brackets after the gap, where it lies: the model's mean with the oracle's scale,",
        "and the oracle's mean with the model's scale, each against the oracle.",
        "Spearman: fav_score (model) and the oracle's predictive CDF of the observed count",
        "against the hidden quality, over live scored posts. Calibration: mean fav_score by",
        "upload age, the worst rating / file type (>= 300 live posts) and the worst fav_score",
        "decile (target: within 0.06 and 1.5 pp), the deciles over all scored posts and over",
        "live ones: deleted posts are scored but never trained on, and in these worlds get",
        "fewer favourites than their metadata predicts, so they crowd the lowest decile.",
        "'other candidates' gap' is each reported candidate's held-out NLL against the oracle's.",
        "'learner told the priors' (`synthetic/reference.py`) knows all the oracle knows but the",
        "hidden effects themselves (tags', interactions', uploaders'): it is told their priors and",
        "infers them from the same training posts, so its gap is what the posts leave open to any",
        "learner; its rank ratio and the model's in brackets are over the hold-out posts alone.",
        "",
        f"The held-back world `{HELD_BACK_WORLD}` was chosen before any tuning: never tune on",
        "it; it is listed apart below.",
        "",
        *(f"- `{w.name}`: {w.summary}" for w in WORLDS.values()),
        "",
    ]
    if oracle:
        lines += ["### Oracle only (no pipeline run)", ""]
        lines += [
            "`python benchmarks/worlds.py --oracle-only --posts 100000`. The ceiling a model",
            "can reach from metadata alone in each world.",
            "",
            *_oracle_table(oracle),
            "",
        ]
    for title, sel in (
        ("### Tuning worlds", [r for r in runs if r["world"] != HELD_BACK_WORLD]),
        (
            f"### Held-back world: `{HELD_BACK_WORLD}`",
            [r for r in runs if r["world"] == HELD_BACK_WORLD],
        ),
    ):
        if sel:
            lines += [title, "", *RUN_HEADER, *(_run_row(r) for r in sel), ""]
            when = sorted({r["when"] for r in sel})
            lines += [f"Recorded {when[0]} to {when[-1]}, seed {sel[0]['seed']}.", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    """QUALITY.md with the section between `begin` and `end` (the worlds section unless told)
    replaced, or appended."""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section.rstrip("\n") + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


def write_results(results: dict) -> None:
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Model quality\n"
    RESULTS_MD.write_text(replace_section(text, worlds_markdown(results)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", nargs="+", choices=list(WORLDS), default=list(WORLDS))
    ap.add_argument("--posts", type=int, nargs="+", default=[20_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle-only", action="store_true", help="no pipeline runs")
    ap.add_argument(
        "--reread", action="store_true", help="re-read the last runs' homes instead of running"
    )
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    key = "oracle_only" if args.oracle_only else "runs"
    for posts in args.posts:
        for world in args.worlds:
            if args.oracle_only:
                record = oracle_only(world, posts, args.seed)
            else:
                record = measure(world, posts, args.seed, rerun=not args.reread)
            same = (world, posts, args.seed)
            rows = [r for r in results.get(key, []) if (r["world"], r["posts"], r["seed"]) != same]
            results[key] = [*rows, record]
            write_results(results)
            print(json.dumps({k: v for k, v in record.items() if k != "calibration"}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
