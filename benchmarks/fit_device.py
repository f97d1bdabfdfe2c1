"""The whole `fitted_params` fit (every candidate, every cross-fitting fold) on the model
package alone, on whatever device JAX finds: seconds per candidate and fold, the deep stage's
posts/s, validation and hold-out NLL, at one or more batch sizes (the batch-size rule in
`model/train.py` scales the learning rate and step budgets), plus the loop's per-step host
overhead (a near-empty model, one step per dispatch against CHUNK_STEPS).

    python benchmarks/fit_device.py FEATURE_DIR [--batch-sizes 2048 8192] [--json out.json]

FEATURE_DIR holds `matrix.parquet` and `layout.json` (`$E6SCORE_HOME/features/features-*/`
after materialising `feature_matrix`). Neither Dagster nor DuckDB is imported, so the same
command runs on a GPU machine that has only JAX, Flax, Optax, SciPy and PyArrow, on a feature
matrix made elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path

import jax
from train_loop import step_overhead

from e6score_dagster.model import FeatureLayout, ModelConfig, use_compilation_cache
from e6score_dagster.model.select import select_and_crossfit
from e6score_dagster.model.train import CHUNK_STEPS


def device_memory_peak() -> int | None:
    """Bytes the accelerator held at most (None on a CPU, where JAX keeps no such count)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def fit_once(layout: FeatureLayout, matrix: Path, batch_size: int) -> dict:
    """One `select_and_crossfit` at `batch_size`, with its log's timestamps."""
    cfg = dataclasses.replace(ModelConfig(), batch_size=batch_size)
    t0 = time.perf_counter()
    log_lines = []

    def log(message: str) -> None:
        at = time.perf_counter() - t0
        log_lines.append(f"{at:7.1f} s  {message}")
        print(log_lines[-1], flush=True)

    sel = select_and_crossfit(cfg, layout, matrix, log)
    return {
        "batch_size": batch_size,
        "device": sel.device,
        "seconds": round(sel.seconds, 2),
        "chosen": sel.chosen,
        "holdout_nll": round(sel.holdout["nll"], 5),
        "fold_seconds": [round(s, 2) for s in sel.fold_seconds],
        "training_posts": sel.training_posts,
        "candidates": {
            name: {"seconds": round(c.seconds, 2), "steps": c.steps,
                   "posts_per_second": round(c.posts_per_second),
                   "validation_nll": round(c.validation.get("nll", float("nan")), 5),
                   "holdout_nll": round(c.holdout.get("nll", float("nan")), 5)}
            for name, c in sel.candidates.items()
        },
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "device_peak_mb": (lambda b: b and b // 2**20)(device_memory_peak()),
        "log": log_lines,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("features", type=Path)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[ModelConfig().batch_size])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-overhead", action="store_true", help="skip the per-step overhead")
    args = ap.parse_args()
    matrix = args.features / "matrix.parquet"
    layout = FeatureLayout.read(args.features / "layout.json")
    # A fresh cache, as on a first run of the pipeline: compilation is counted.
    use_compilation_cache(Path(tempfile.mkdtemp(prefix="e6score-jax-cache-")))
    out: dict = {"device": str(jax.devices()[0].device_kind), "fits": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")

    for batch_size in args.batch_sizes:
        out["fits"].append(fit_once(layout, matrix, batch_size))
        save()
    if not args.no_overhead:
        out["near_empty_step_ms"] = {
            str(c): round(step_overhead(layout, matrix, c) * 1e3, 3) for c in (1, CHUNK_STEPS)
        }
        save()
    print(json.dumps({k: v for k, v in out.items() if k != "fits"}, indent=1))
    for fit in out["fits"]:
        print(json.dumps({k: v for k, v in fit.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
