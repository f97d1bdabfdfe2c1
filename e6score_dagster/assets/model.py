"""Fitting the E6Score model on the feature matrix; params keyed by what they were built from."""

import time
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from e6score_dagster.model import (
    FeatureLayout,
    ModelConfig,
    ParquetBatches,
    evaluate,
    save_params,
    train,
)
from e6score_dagster.model.params import Fitted
from e6score_dagster.plots import line_plot_md
from e6score_dagster.resources import StateDir
from e6score_dagster.store import read_lineage, record_lineage, transaction

MODEL_CODE_VERSION = "1"
_DEFAULTS = ModelConfig()


class TrainingConfig(dg.Config):
    """Run config for `fitted_params`; the defaults are ModelConfig's."""

    epochs: int = _DEFAULTS.epochs
    batch_size: int = _DEFAULTS.batch_size
    learning_rate: float = _DEFAULTS.learning_rate
    weight_decay: float = _DEFAULTS.weight_decay
    embed_dim: int = _DEFAULTS.embed_dim
    hash_bits: int = _DEFAULTS.hash_bits
    num_probes: int = _DEFAULTS.num_probes
    cross_layers: int = _DEFAULTS.cross_layers
    mlp_widths: list[int] = list(_DEFAULTS.mlp_widths)
    time_frequencies: int = _DEFAULTS.time_frequencies
    grad_clip: float = _DEFAULTS.grad_clip
    seed: int = _DEFAULTS.seed

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_dump())


@dg.asset(
    group_name="model",
    deps=["feature_matrix"],
    kinds={"jax", "msgpack"},
    code_version=MODEL_CODE_VERSION,
    pool="duckdb",
    description="The fitted E6Score model (Flax params, msgpack), trained on every non-deleted "
    "post outside the hold-out set. One file per (feature matrix, code version, config) under "
    "`$E6SCORE_HOME/params/`; earlier files stay loadable.",
)
def fitted_params(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    duckdb: DuckDBResource,
    state: StateDir,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    with duckdb.get_connection() as conn:
        dump_date, features = read_lineage(conn, "feature_matrix")
    fdir = Path(features["dir"])
    layout = FeatureLayout.read(fdir / "layout.json")
    mcfg = config.to_model_config()
    matrix = fdir / "matrix.parquet"
    data = ParquetBatches(matrix, layout, mcfg.batch_size, rows="train", shuffle_seed=mcfg.seed)
    result = train(mcfg, layout, data, log=context.log.info)
    held_out = ParquetBatches(matrix, layout, 8192, rows="holdout")
    metrics = evaluate(mcfg, layout, result.params, held_out)
    context.log.info(f"held-out metrics: {metrics}")
    name = f"{dump_date}-{fdir.name}-code{MODEL_CODE_VERSION}-{mcfg.fingerprint()}.msgpack"
    path = state.params / name
    meta = {
        "dump_date": dump_date,
        "features": fdir.name,
        "code_version": MODEL_CODE_VERSION,
        "metrics": metrics,
    }
    save_params(path, Fitted(result.params, mcfg, layout, meta))
    with duckdb.get_connection() as conn, transaction(conn):
        record_lineage(conn, "fitted_params", dump_date, {"path": str(path), **meta})
    curve = [(h["step"], h["loss"]) for h in result.history]
    return dg.MaterializeResult(
        metadata={
            "dump_date": dump_date,
            "params_path": dg.MetadataValue.path(str(path)),
            "config": dg.MetadataValue.json(mcfg.to_dict()),
            "training_posts": dg.MetadataValue.int(data.num_rows()),
            "holdout_posts": dg.MetadataValue.int(int(metrics.get("n", 0))),
            "holdout_nll": float(metrics.get("nll", float("nan"))),
            "holdout_nll_constant_baseline": float(
                metrics.get("baseline_constant_nll", float("nan"))
            ),
            "steps": dg.MetadataValue.int(result.steps),
            "train_seconds": round(result.seconds, 2),
            "posts_per_second": round(result.posts_per_second, 1),
            "data_wait_share": round(result.data_wait_seconds / max(result.seconds, 1e-9), 4),
            "loss_curve": dg.MetadataValue.md(line_plot_md(curve, "step", "training NLL")),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
