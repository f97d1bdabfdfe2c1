"""Trial: do tag embeddings initialised from co-occurrence (PPMI + truncated SVD, as in e6graph)
improve the model? Fits the additive stage once, then the deep stage twice on top of it, from
the default random embeddings and from PPMI-SVD ones, and compares held-out NLL and Spearman.

    python benchmarks/tag_embeddings_trial.py benchmarks/work/quality-1000000-s0

The argument is an E6SCORE_HOME whose feature matrix is built (e.g. by benchmarks/quality.py).
Appends the result to benchmarks/tag_embeddings_trial.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from e6score_dagster.model import FeatureLayout, ModelConfig, ParquetBatches, predict
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.network import WARM_FROZEN, probe_buckets, warm_start
from e6score_dagster.model.train import baseline_config, init_params, train
from e6score_dagster.store import read_lineage

HERE = Path(__file__).resolve().parent
MIN_COUNT = 5


def ppmi_embeddings(matrix: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(tag codes, embeddings) for tags used at least MIN_COUNT times by training posts."""
    t = pq.read_table(matrix, columns=["tags", "holdout", "trainable"])
    keep = pc.and_(pc.invert(t.column("holdout")), t.column("trainable"))
    t = t.filter(keep)
    n = t.num_rows
    tags = pc.list_flatten(t.column("tags")).to_numpy().reshape(n, -1)
    rows, cols = np.nonzero(tags)
    codes, idx = np.unique(tags[rows, cols], return_inverse=True)
    x = sp.csr_matrix((np.ones(idx.size, np.float32), (rows, idx)), shape=(n, codes.size))
    counts = np.asarray(x.sum(axis=0)).ravel()
    frequent = counts >= MIN_COUNT
    x = x[:, frequent]
    codes, counts = codes[frequent], counts[frequent]
    c = (x.T @ x).tocoo()
    off = c.row != c.col
    i, j, v = c.row[off], c.col[off], c.data[off]
    total = v.sum()
    marg = np.bincount(i, weights=v, minlength=codes.size)
    ctx = marg**0.75  # context smoothing, as in word2vec-style PPMI
    pmi = np.log(v * ctx.sum() / (marg[i] * ctx[j]))
    pos = pmi > 0
    ppmi = sp.csr_matrix((pmi[pos], (i[pos], j[pos])), shape=(codes.size, codes.size))
    u, s, _ = svds(ppmi, k=dim)
    emb = u * np.sqrt(s)
    print(f"PPMI: {codes.size:,} tags, {ppmi.nnz:,} positive pairs of {total:,.0f}", flush=True)
    return codes, emb.astype(np.float32)


def with_embeddings(params: dict, codes: np.ndarray, emb: np.ndarray, cfg: ModelConfig) -> dict:
    """Every probe row of a tag gets its PPMI vector, scaled to the random init's spread and
    halved because the probes' rows are summed."""
    table = np.array(params["tags"]["embedding"])
    rows = np.asarray(probe_buckets(np.asarray(codes), cfg.hash_bits, cfg.num_probes))
    scaled = emb * (0.05 / (emb.std() + 1e-12)) / cfg.num_probes
    for p in range(cfg.num_probes):
        table[rows[:, p]] = scaled
    params["tags"]["embedding"] = table
    return params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("home", type=Path)
    args = ap.parse_args()
    with duckdb.connect(str(args.home / "e6score.duckdb"), read_only=True) as conn:
        _, features = read_lineage(conn, "feature_matrix")
    fdir = Path(features["dir"])
    layout = FeatureLayout.read(fdir / "layout.json")
    matrix = fdir / "matrix.parquet"
    cfg = ModelConfig()
    split = {"validation_fraction": cfg.validation_fraction}
    data = ParquetBatches(matrix, layout, cfg.batch_size, rows="train", shuffle_seed=0, **split)
    val = ParquetBatches(matrix, layout, 8192, rows="validation", **split)
    held = ParquetBatches(matrix, layout, 8192, rows="holdout")
    quiet = lambda _: None  # noqa: E731
    additive = train(baseline_config(cfg, "additive"), layout, data, quiet, validation=val)
    t0 = time.perf_counter()
    codes, emb = ppmi_embeddings(matrix, cfg.embed_dim)
    ppmi_s = time.perf_counter() - t0
    result = {"home": str(args.home), "posts": layout_posts(matrix), "ppmi_seconds": ppmi_s}
    for name in ("random", "ppmi"):
        init = warm_start(init_params(cfg, layout), additive.params)
        if name == "ppmi":
            init = with_embeddings(init, codes, emb, cfg)
        fit = train(cfg, layout, data, quiet, validation=val, init=init, frozen=WARM_FROZEN)
        m = predictive_metrics(*predict(cfg, layout, fit.params, held))
        result[name] = {"nll": m["nll"], "spearman": m["spearman"], "best_step": fit.best_step}
        print(name, result[name], flush=True)
    result["nll_gain_from_ppmi"] = result["random"]["nll"] - result["ppmi"]["nll"]
    out = HERE / "tag_embeddings_trial.json"
    runs = json.loads(out.read_text()) if out.exists() else []
    runs = [r for r in runs if r["posts"] != result["posts"]] + [result]
    out.write_text(json.dumps(runs, indent=1) + "\n")
    json.dump(result, sys.stdout, indent=1)


def layout_posts(matrix: Path) -> int:
    return pq.ParquetFile(matrix).metadata.num_rows


if __name__ == "__main__":
    main()
