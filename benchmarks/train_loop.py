"""Training-loop throughput on a feature matrix made by the pipeline: every fit of the model
(linear baseline, additive stage, deep stage) with its posts/s, held-out NLL and seconds, plus
the per-step host overhead of the loop (a near-empty model, one step per dispatch against
CHUNK_STEPS per dispatch): the CPU proxy for how well the loop would keep an accelerator busy.

    python benchmarks/train_loop.py FEATURE_DIR [--batch-size 2048] [--json out.json]

FEATURE_DIR is `$E6SCORE_HOME/features/features-*/` after materialising `feature_matrix`.
The model package runs here without Dagster, so the same command runs on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
from pathlib import Path

import jax

from e6score_dagster.model import FeatureLayout, ModelConfig, ParquetBatches, predict
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.train import baseline_config, fit_with_baseline

# The module, not the function the package exports under the same name.
train_mod = importlib.import_module("e6score_dagster.model.train")


def step_overhead(layout: FeatureLayout, matrix: Path, chunk: int, steps: int = 400) -> float:
    """Seconds per step of a near-empty model (tiny additive fit, batch 64), `chunk` steps
    per dispatch: what the loop costs besides the model's own arithmetic."""
    cfg = ModelConfig(architecture="linear", batch_size=64, hash_bits=4, min_steps=steps,
                      epochs=1, evals_per_epoch=1, patience=10**6)
    data = ParquetBatches(matrix, layout, cfg.batch_size, rows="train", shuffle_seed=0)
    old = train_mod.CHUNK_STEPS
    train_mod.CHUNK_STEPS = chunk
    try:
        train_mod.train(cfg, layout, data, log=lambda _: None)  # compile
        result = train_mod.train(cfg, layout, data, log=lambda _: None)
    finally:
        train_mod.CHUNK_STEPS = old
    return result.seconds / result.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("features", type=Path)
    ap.add_argument("--batch-size", type=int, default=ModelConfig().batch_size)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    matrix = args.features / "matrix.parquet"
    layout = FeatureLayout.read(args.features / "layout.json")
    cfg = dataclasses.replace(ModelConfig(), batch_size=args.batch_size)
    split = {"validation_fraction": cfg.validation_fraction}
    data = ParquetBatches(matrix, layout, cfg.batch_size, rows="train", shuffle_seed=0, **split)
    val = ParquetBatches(matrix, layout, 8192, rows="validation", **split)
    held = ParquetBatches(matrix, layout, 8192, rows="holdout")
    t0 = time.perf_counter()
    fits = fit_with_baseline(cfg, layout, data, val, log=print)
    fit_s = time.perf_counter() - t0
    out = {"device": jax.devices()[0].device_kind, "batch_size": cfg.batch_size,
           "training_posts": data.num_rows(), "fit_seconds": round(fit_s, 2), "stages": {}}
    for name, stage_cfg, fit in (
        ("linear", baseline_config(cfg), fits.linear),
        ("additive", baseline_config(cfg, "additive"), fits.additive),
        ("deep", cfg, fits.model),
    ):
        y, mu, sigma = predict(stage_cfg, layout, fit.params, held)
        out["stages"][name] = {
            "steps": fit.steps, "seconds": round(fit.seconds, 2),
            "posts_per_second": round(fit.posts_per_second),
            "holdout_nll": round(predictive_metrics(y, mu, sigma)["nll"], 5),
        }
    if hasattr(train_mod, "CHUNK_STEPS"):  # absent before the fused loop
        per_step = {c: step_overhead(layout, matrix, c) for c in (1, train_mod.CHUNK_STEPS)}
        out["near_empty_step_ms"] = {str(c): round(s * 1e3, 3) for c, s in per_step.items()}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
