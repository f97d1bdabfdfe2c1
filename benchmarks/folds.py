"""Choosing the number of cross-fitting folds: quality of the out-of-fold scores against cost.

    python benchmarks/folds.py HOME [--folds 2 3 5] [--candidates linear] [--truth TRUTH.parquet]

HOME is a pipeline home that has built `feature_matrix` (e.g. one left by benchmarks/worlds.py
under benchmarks/work/). For each K the chosen candidates are fitted and cross-fitted with
`model.select.select_and_crossfit`; reported: hold-out NLL of the published (out-of-fold)
predictions, Spearman of every post's out-of-fold fav_score with the hidden quality (with
a truth file), and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import duckdb
import pandas as pd
from scipy.stats import spearmanr

from e6score_dagster.model import FeatureLayout, ModelConfig, ParquetBatches, score_batches
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.select import select_and_crossfit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("--folds", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--candidates", nargs="+", default=["linear"])
    ap.add_argument("--truth", type=Path)
    args = ap.parse_args()
    with duckdb.connect(str(args.home / "e6score.duckdb"), read_only=True) as conn:
        info = conn.execute(
            "SELECT info FROM e6score_lineage WHERE asset = 'feature_matrix'"
        ).fetchone()
    fdir = Path(json.loads(info[0])["dir"])
    layout = FeatureLayout.read(fdir / "layout.json")
    matrix = fdir / "matrix.parquet"
    truth = pd.read_parquet(args.truth).set_index("id")["quality"] if args.truth else None
    for k in args.folds:
        cfg = dataclasses.replace(ModelConfig(), candidates=tuple(args.candidates), folds=k)
        t0 = time.perf_counter()
        sel = select_and_crossfit(cfg, layout, matrix, log=lambda _: None)
        seconds = time.perf_counter() - t0
        row = {
            "folds": k,
            "chosen": sel.chosen,
            "holdout_nll": round(sel.holdout["nll"], 4),
            "seconds": round(seconds, 1),
        }
        if truth is not None:
            fitted = Fitted(sel.params, sel.config, layout, fold_params=sel.fold_params)
            parts = [
                pd.DataFrame({"id": s["id"], "fav_score": s["fav_score"]})
                for s in score_batches(fitted, ParquetBatches(matrix, layout, 8192))
            ]
            scores = pd.concat(parts).set_index("id")["fav_score"]
            common = scores.index.intersection(truth.index)
            row["spearman_quality"] = round(
                float(spearmanr(scores[common], truth[common]).statistic), 4
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
