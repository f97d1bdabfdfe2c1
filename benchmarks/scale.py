"""Scale benchmark: every asset of the chain at N posts, one Dagster CLI process per step,
then the whole job in one process as the README runs it.

    python benchmarks/scale.py --posts 6000000        # generates the dump once, then reuses it
    python benchmarks/scale.py --posts 100000 --posts 1000000 --posts 6000000

Each step runs as `dagster asset materialize -m e6score_dagster --select <asset>` under
`/usr/bin/time -v`, in the order of the chain, so its wall time and peak RSS are those of the
process that did the work. Also measured in the same run: DuckDB alone scanning the posts file
(`SELECT count(*) FROM read_csv(...)`), the training step's FLOPs and the machine's matmul
throughput. Writes benchmarks/scale.json (raw) and benchmarks/SCALE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DATE, HERE, WORK, ensure_dump, time_v  # noqa: E402

from e6score_dagster.csv_read import read_csv_sql, read_header  # noqa: E402
from e6score_dagster.definitions import PIPELINE  # noqa: E402
from e6score_dagster.resources import duckdb_resource  # noqa: E402
from e6score_dagster.stage import REUSED  # noqa: E402

RESULTS_JSON = HERE / "scale.json"
RESULTS_MD = HERE / "SCALE.md"
# Issue 14's targets on 2 CPU cores: (chain seconds, largest step's peak RSS in MB) by size.
CHAIN_TARGETS = {1_000_000: (100, 2560), 6_000_000: (12 * 60, 3072)}
CLEAN_VS_SCAN = 2.0
DEEP_POSTS_PER_S = 60_000


def bare_scan_seconds(posts_csv: Path, tmp: Path) -> float:
    """DuckDB alone counting the rows of the posts file, with the settings the pipeline uses."""
    cfg = duckdb_resource(tmp).connection_config
    with duckdb.connect(str(tmp / "scan.duckdb"), config=cfg) as conn:
        sql = read_csv_sql(posts_csv, read_header(posts_csv), "scan_rejects")
        t0 = time.perf_counter()
        conn.execute(f"SELECT count(*) FROM {sql}").fetchone()
        return time.perf_counter() - t0


def matmul_gflops() -> float:
    """Dense float32 matmul throughput of this machine under JAX (best of 5)."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(home: Path) -> dict:
    from e6score_dagster.model import FeatureLayout, load_params
    from e6score_dagster.model.train import train_step_flops
    from e6score_dagster.store import read_lineage

    with duckdb.connect(str(home / "e6score.duckdb"), read_only=True) as conn:
        _, params = read_lineage(conn, "fitted_params")
    fitted = load_params(Path(params["path"]))
    layout: FeatureLayout = fitted.layout
    return {
        "flops_per_step": train_step_flops(fitted.config, layout),
        "batch_size": fitted.config.batch_size,
    }


def latest_metadata(dagster_home: Path, asset: str, key: str = "posts_per_second") -> dict:
    """The newest materialisation's metadata that has `key` (a build, not a reuse), as plain
    values."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(dagster_home.resolve())
    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=50).records
    for record in records:  # newest first
        meta = record.asset_materialization.metadata if record.asset_materialization else {}
        if key in meta:
            return {k: getattr(v, "value", v) for k, v in meta.items()}
    return {}


def run_env(home: Path, source: Path) -> dict[str, str]:
    return {
        **os.environ,
        "E6SCORE_HOME": str(home),
        "E6SCORE_DUMP_SOURCE": str(source),
        "DAGSTER_HOME": str(home / "dagster_home"),
    }


def scan_seconds(source: Path) -> float:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        return bare_scan_seconds(source / f"posts-{DATE}.csv.gz", Path(tmp))


def run_step(name: str, env: dict[str, str], home: Path) -> dict:
    """One asset in its own `dagster asset materialize` process, under /usr/bin/time -v."""
    cmd = ["dagster", "asset", "materialize", "-m", "e6score_dagster", "--select", name]
    run = time_v(cmd, env, home / f"{name}.log")
    return {
        "process_wall_s": run["wall_s"],
        "step_s": run["steps_s"].get(name, float("nan")),
        "peak_rss_mb": run["peak_rss_mb"],
    }


def run_job(posts: int, seed: int, source: Path) -> dict:
    """The whole chain as a user runs it: the README's command (`dg launch ... --job
    e6score_job`, every step in one process) from an empty home, under /usr/bin/time -v."""
    home = WORK / f"scale-job-{posts}-s{seed}"
    shutil.rmtree(home, ignore_errors=True)
    (home / "dagster_home").mkdir(parents=True)
    cmd = ["dg", "launch", "-m", "e6score_dagster", "--job", "e6score_job"]
    run = time_v(cmd, run_env(home, source), home.with_suffix(".log"))
    shutil.rmtree(home, ignore_errors=True)
    return {"wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"], "steps_s": run["steps_s"],
            "when": time.strftime("%Y-%m-%d %H:%M")}


def chain_totals(steps: dict[str, dict]) -> dict:
    return {
        "chain_step_s": round(sum(s["step_s"] for s in steps.values()), 1),
        "chain_process_s": round(sum(s["process_wall_s"] for s in steps.values()), 1),
        "max_step_rss_mb": max(s["peak_rss_mb"] for s in steps.values()),
    }


def measure(posts: int, seed: int) -> dict:
    source = ensure_dump(posts, seed)
    label = f"{posts:,} posts"
    home = WORK / f"scale-{posts}-s{seed}"
    shutil.rmtree(home, ignore_errors=True)
    (home / "dagster_home").mkdir(parents=True)
    env = run_env(home, source)
    scan_s = scan_seconds(source)
    steps = {}
    for asset in PIPELINE:
        name = asset.key.to_user_string()
        steps[name] = run_step(name, env, home)
        print(f"{label}: {name} {steps[name]}", flush=True)
    job = run_job(posts, seed, source)
    print(f"{label}: one job process {job}", flush=True)
    return {
        "job": job,
        "label": label,
        "posts": posts,
        "seed": seed,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "source": str(source),
        "dump_bytes": sum(f.stat().st_size for f in source.glob(f"*-{DATE}.csv.gz")),
        "bare_scan_s": round(scan_s, 2),
        "steps": steps,
        **chain_totals(steps),
        **model_figures(home),
        "machine": machine(),
    }


def model_figures(home: Path) -> dict:
    """Training and scoring figures of the run's newest fitted_params and scored_posts."""
    dagster_home = home / "dagster_home"
    train_meta = latest_metadata(dagster_home, "fitted_params")
    score_meta = latest_metadata(dagster_home, "scored_posts")
    flops = step_flops(home)
    step_s = flops["batch_size"] / train_meta["posts_per_second"]
    return {
        "training": {
            "posts_per_second": train_meta["posts_per_second"],
            "train_seconds": train_meta["train_seconds"],
            "device": train_meta.get("device"),
            "folds": train_meta.get("folds"),
            "fold_seconds": train_meta.get("fold_seconds"),
            "chosen": train_meta.get("chosen_candidate"),
            "stages": train_meta.get("stage_fits", {}),
            "flops_per_step": flops["flops_per_step"],
            "batch_size": flops["batch_size"],
            "achieved_gflops": round(flops["flops_per_step"] / step_s / 1e9, 2),
            "matmul_gflops": round(matmul_gflops(), 1),
            "holdout_nll": train_meta.get("holdout_nll"),
            "holdout_linear_nll": train_meta.get("candidate_metrics", {})
            .get("linear", {})
            .get("nll"),
        },
        "scoring": {
            "posts_per_second": score_meta["posts_per_second"],
            "score_seconds": score_meta.get("score_seconds"),
            "export_seconds": score_meta.get("export_seconds"),
        },
    }


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM, Python {platform.python_version()}"


FINDINGS_HEADING = "## What the measurements show"


def findings() -> str:
    """The findings section of SCALE.md as it stands: people write it beside the tables, which
    every run regenerates."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    if FINDINGS_HEADING in text:
        return text[text.index(FINDINGS_HEADING) :].rstrip("\n")
    return FINDINGS_HEADING + "\n\n(not written yet)"


def write_md(runs: list[dict]) -> None:
    runs = sorted(runs, key=lambda r: r["posts"])
    names = list(runs[0]["steps"])
    lines = [
        "# Scale results",
        "",
        "Recorded by `python benchmarks/scale.py --posts N` (see its docstring). Each step is one",
        "`dagster asset materialize -m e6score_dagster --select <asset>` process under",
        "`/usr/bin/time -v`, in chain order, from an empty `E6SCORE_HOME`; the dump comes from a",
        "local folder (download and dump generation excluded). *Step* is Dagster's step time;",
        "*process* adds the CLI's start-up (about 4 s of imports). Peak RSS is per process.",
        "Steps changed after a full run were re-measured in it with `--steps NAME ...` (same",
        "dump, same home): at 1M, `cleaned_posts` to `scored_posts` after the cleaning change.",
        "FLOPs per step are those of the published model's architecture.",
        "",
        f"Machine: {runs[-1]['machine']}.",
        "",
        "## Per step: step seconds (process seconds) / peak RSS",
        "",
        "| step | " + " | ".join(r["label"] for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for n in names:
        cells = [
            f"{r['steps'][n]['step_s']:.1f} s ({r['steps'][n]['process_wall_s']:.0f} s) / "
            f"{r['steps'][n]['peak_rss_mb']:,} MB"
            for r in runs
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(
        "| **chain** | "
        + " | ".join(
            f"**{r['chain_step_s']:.0f} s** ({r['chain_process_s']:.0f} s) / "
            f"max {r['max_step_rss_mb']:,} MB"
            for r in runs
        )
        + " |"
    )
    lines += [
        "",
        "## Against the targets",
        "",
        "| measure | target | " + " | ".join(r["label"] for r in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]

    def row(name: str, target: str, fmt) -> None:
        lines.append(f"| {name} | {target} | " + " | ".join(fmt(r) for r in runs) + " |")

    def chain_target(r: dict) -> str:
        target = CHAIN_TARGETS.get(r["posts"])
        return f"{r['chain_process_s']:.0f} s" + (f" (≤ {target[0]} s)" if target else "")

    def job_target(r: dict) -> str:
        if "job" not in r:
            return "n/a"
        target = CHAIN_TARGETS.get(r["posts"])
        return (f"{r['job']['wall_s']:.0f} s / {r['job']['peak_rss_mb']:,} MB"
                + (f" (≤ {target[0]} s / {target[1]:,} MB)" if target else ""))

    def rss_target(r: dict) -> str:
        target = CHAIN_TARGETS.get(r["posts"])
        return f"{r['max_step_rss_mb']:,} MB" + (f" (≤ {target[1]:,})" if target else "")

    def stage(r: dict, name: str) -> str:
        fit = r["training"].get("stages", {}).get(name)
        if not fit:
            return "n/a"
        if fit.get("solver") == "ridge":
            return f"exact solve, {fit['seconds']:.0f} s ({fit['best_step']} evidence rounds)"
        return f"{fit['posts_per_second']:,.0f} posts/s, {fit['seconds']:.0f} s"

    row("whole chain, one `dg launch` process (the README's command): wall / peak RSS",
        "1M: ≤ 100 s; 6M: ≤ 720 s", job_target)
    row("whole chain, one process per step (sum of the process times)", "", chain_target)
    row("largest step peak RSS", "1M: ≤ 2,560 MB; 6M: ≤ 3,072 MB", rss_target)
    row("bare DuckDB scan (`count(*)`)", "", lambda r: f"{r['bare_scan_s']:.1f} s")
    row(
        "cleaned_posts / bare scan",
        f"≤ {CLEAN_VS_SCAN}",
        lambda r: f"{r['steps']['cleaned_posts']['step_s'] / r['bare_scan_s']:.2f}",
    )
    row("training posts/s, all fits", "", lambda r: f"{r['training']['posts_per_second']:,.0f}")
    for name in ("linear", "additive", "deep"):
        target = f"≥ {DEEP_POSTS_PER_S:,} posts/s" if name == "deep" else ""
        row(f"{name} stage", target, lambda r, n=name: stage(r, n))
    row(
        "folds (seconds: selection, then each fold's refit)",
        "",
        lambda r: (
            f"{r['training']['folds']} "
            f"({', '.join(f'{s:.0f}' for s in r['training']['fold_seconds'])})"
            if r["training"].get("fold_seconds") else "n/a (before cross-fitting)"
        ),
    )
    row("chosen candidate / device", "", lambda r: (
        f"{r['training'].get('chosen', 'n/a')} / {r['training'].get('device', 'n/a')}"))
    row(
        "FLOPs per step / achieved GFLOP/s / matmul GFLOP/s",
        "",
        lambda r: (
            f"{r['training']['flops_per_step'] / 1e9:.2f} G / "
            f"{r['training']['achieved_gflops']:.1f} / {r['training']['matmul_gflops']:.0f}"
        ),
    )
    row(
        "scoring posts/s",
        "",
        lambda r: f"{r['scoring']['posts_per_second']:,.0f}",
    )
    row(
        "CSV export",
        "",
        lambda r: (
            f"{r['scoring']['export_seconds']} s"
            if r["scoring"].get("export_seconds") is not None
            else "n/a"
        ),
    )
    row(
        "held-out NLL: model / linear",
        "",
        lambda r: (f"{r['training']['holdout_nll']:.4f} / "
                   f"{r['training']['holdout_linear_nll'] or 0:.4f}"),
    )
    lines += [
        "",
        "Commands: "
        + ", ".join(f"`python benchmarks/scale.py --posts {r['posts']}`" for r in runs),
        "",
        findings(),
    ]
    RESULTS_MD.write_text("\n".join(lines) + "\n")


def remeasure(record: dict, names: list[str]) -> dict:
    """Re-runs `names` (after a change to their code) in the finished run of `record`, with
    the bare scan again, and updates the record's figures; stops, recording nothing, where a
    step reused its output (nothing was rebuilt to time)."""
    home = WORK / f"scale-{record['posts']}-s{record['seed']}"
    source = Path(record["source"])
    env = run_env(home, source)
    record["bare_scan_s"] = round(scan_seconds(source), 2)
    for name in names:
        step = run_step(name, env, home)
        if REUSED in (home / f"{name}.log").read_text(errors="replace"):
            raise SystemExit(f"{name} was reused, not rebuilt: its code and inputs are "
                             "unchanged, so there is nothing to re-measure (results left as they "
                             "were)")
        record["steps"][name] = {**step, "remeasured": time.strftime("%Y-%m-%d %H:%M")}
        print(f"{record['label']}: {name} {record['steps'][name]}", flush=True)
    record.update(chain_totals(record["steps"]))
    if {"fitted_params", "scored_posts"} & set(names):
        record.update(model_figures(home))
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, action="append", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--steps",
        nargs="+",
        help="only re-measure these steps (and the bare scan) in the finished run",
    )
    ap.add_argument("--job-only", action="store_true",
                    help="only re-measure the whole job in one process (the README's command)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    runs = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    for posts in args.posts:
        if args.job_only:
            record = next(r for r in runs if r["posts"] == posts and r["seed"] == args.seed)
            record["job"] = run_job(posts, args.seed, Path(record["source"]))
        elif args.steps:
            old = next(r for r in runs if r["posts"] == posts and r["seed"] == args.seed)
            record = remeasure(old, args.steps)
        else:
            record = measure(posts, args.seed)
        runs = [r for r in runs if r["posts"] != posts] + [record]
        RESULTS_JSON.write_text(json.dumps(runs, indent=1) + "\n")
        write_md(runs)
        print(json.dumps(record, indent=1), flush=True)


if __name__ == "__main__":
    main()
