"""Fitting the E6Score model on the feature matrix; params keyed by what they were built from."""

import time
from pathlib import Path

import dagster as dg
import numpy as np
from dagster_duckdb import DuckDBResource
from scipy.stats import norm

from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.model import FeatureLayout, ModelConfig, load_params, save_params
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.select import (
    CURRENT_TOLERANCE,
    MIN_GAIN_OVER_CONSTANT,
    GateDecision,
    Selection,
    current_holdout_nll,
    gate,
    out_of_fold_predictions,
    select_and_crossfit,
)
from e6score_dagster.plots import calibration_md, line_plot_md, scatter_md
from e6score_dagster.resources import StateDir
from e6score_dagster.store import (
    code_version,
    last_build,
    lineage_metadata,
    read_lineage,
    record_lineage,
    transaction,
    version_key,
)

_DEFAULTS = ModelConfig()
CHECK = "fit_is_publishable"


class TrainingConfig(dg.Config):
    """Run config for `fitted_params`; the defaults are ModelConfig's."""

    epochs: int = _DEFAULTS.epochs
    min_steps: int = _DEFAULTS.min_steps
    batch_size: int = _DEFAULTS.batch_size
    learning_rate: float = _DEFAULTS.learning_rate
    weight_decay: float = _DEFAULTS.weight_decay
    embed_dim: int = _DEFAULTS.embed_dim
    hash_bits: int = _DEFAULTS.hash_bits
    num_probes: int = _DEFAULTS.num_probes
    cross_layers: int = _DEFAULTS.cross_layers
    mlp_widths: list[int] = list(_DEFAULTS.mlp_widths)
    time_frequencies: int = _DEFAULTS.time_frequencies
    tag_dropout: float = _DEFAULTS.tag_dropout
    grad_clip: float = _DEFAULTS.grad_clip
    seed: int = _DEFAULTS.seed
    baseline_epochs: int = _DEFAULTS.baseline_epochs
    baseline_min_steps: int = _DEFAULTS.baseline_min_steps
    warm_start: bool = _DEFAULTS.warm_start
    validation_fraction: float = _DEFAULTS.validation_fraction
    min_validation_posts: int = _DEFAULTS.min_validation_posts
    evals_per_epoch: int = _DEFAULTS.evals_per_epoch
    patience: int = _DEFAULTS.patience
    candidates: list[str] = list(_DEFAULTS.candidates)
    """Fitted and compared on validation NLL; the best is published."""
    folds: int = _DEFAULTS.folds
    """Cross-fitting folds: each post is scored by a model fitted without its fold."""

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_dump())


@dg.asset(
    group_name="model",
    deps=["feature_matrix"],
    kinds={"jax", "msgpack"},
    code_version="3",
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    check_specs=[
        dg.AssetCheckSpec(
            CHECK,
            asset="fitted_params",
            blocking=True,
            description="The published model (the candidate with the best validation NLL) "
            f"beats a constant log-normal on hold-out NLL by at least {MIN_GAIN_OVER_CONSTANT} "
            "(less means broken data or training), and is not worse than the params in use, "
            f"on the same hold-out, by more than {CURRENT_TOLERANCE}. A fit that fails is kept "
            "for inspection but not used: the previous params stay in use.",
        )
    ],
    description="The fitted E6Score model (Flax params, msgpack): the candidate (constant, "
    "linear, additive, deep) with the best validation NLL, refitted without each "
    "cross-fitting fold so every post is scored out of fold. One file per (feature matrix, "
    "code version, config) under `$E6SCORE_HOME/params/`: the same inputs never train twice, "
    "and earlier files stay loadable.",
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
        current = last_build(conn, "fitted_params")
    mcfg = config.to_model_config()
    inputs = {"feature_matrix": features["key"]}
    key = version_key(inputs, code_version(context), mcfg.to_dict())
    path = state.params / f"{dump_date}-{key}.msgpack"
    if path.exists():
        context.log.info(f"params for these inputs, code and config exist: reusing {path.name}")
        meta = load_params(path).meta
        decision = GateDecision(**meta["gate"])
        if decision.passed:
            _publish(duckdb, dump_date, key, path, meta)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(key),
            metadata={
                **lineage_metadata(dump_date, key, inputs, reused=True),
                "params_path": dg.MetadataValue.path(str(path)),
                "chosen_candidate": meta.get("chosen_candidate", ""),
                **_metric_metadata(meta.get("metrics", {})),
            },
            check_results=[_check(decision)],
        )
    fdir = Path(features["dir"])
    layout = FeatureLayout.read(fdir / "layout.json")
    matrix = fdir / "matrix.parquet"
    selection = select_and_crossfit(mcfg, layout, matrix, log=context.log.info)
    current_nll = None
    if current is not None and Path(current[1]["path"]).exists():
        current_nll = current_holdout_nll(load_params(Path(current[1]["path"])), layout, matrix)
    decision = gate(selection, current_nll)
    metrics = selection.holdout
    context.log.info(f"chosen {selection.chosen}; held-out metrics: {metrics}")
    meta = {
        "dump_date": dump_date,
        "inputs": inputs,
        "code_version": code_version(context),
        "chosen_candidate": selection.chosen,
        "metrics": metrics,
        "candidates": selection.candidate_table(),
        "gate": {
            "passed": decision.passed,
            "reason": decision.reason,
            "metadata": decision.metadata,
        },
    }
    fitted = Fitted(selection.params, selection.config, layout, meta, selection.fold_params)
    save_params(path, fitted)
    if decision.passed:
        _publish(duckdb, dump_date, key, path, meta)
    else:
        context.log.warning(
            f"{decision.reason}: kept {path.name} for inspection, the previous params stay in use"
        )
    y, mu, sigma = out_of_fold_predictions(selection.config, layout, selection.fold_params, matrix)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key),
        metadata={
            **lineage_metadata(dump_date, key, inputs, reused=False),
            "params_path": dg.MetadataValue.path(str(path)),
            "config": dg.MetadataValue.json(mcfg.to_dict()),
            **_selection_metadata(selection),
            **_metric_metadata(metrics),
            **_plots(y, mu, sigma),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        check_results=[_check(decision)],
    )


def _publish(duckdb: DuckDBResource, dump_date: str, key: str, path: Path, meta: dict) -> None:
    with duckdb.get_connection() as conn, transaction(conn):
        record_lineage(conn, "fitted_params", dump_date, {"key": key, "path": str(path), **meta})


def _check(decision: GateDecision) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=CHECK,
        passed=decision.passed,
        metadata={**decision.metadata, "reason": decision.reason},
    )


def _selection_metadata(selection: Selection) -> dict:
    """The comparison of candidates and the stage curves, as the UI shows them."""
    chosen = selection.candidates[selection.chosen]
    curves = selection.curves()
    return {
        "chosen_candidate": selection.chosen,
        "candidates": dg.MetadataValue.json(selection.candidate_table()),
        **{
            f"candidate_{name}_{split}_nll": float(getattr(c, split).get("nll", float("nan")))
            for name, c in selection.candidates.items()
            for split in ("validation", "holdout")
        },
        "stage_curves": dg.MetadataValue.json(
            {
                k: {"points": [list(p) for p in v["points"]], "best_step": v["best_step"]}
                for k, v in curves.items()
            }
        ),
        **{
            f"validation_curve_{name}": dg.MetadataValue.md(
                line_plot_md(curve["points"], "step", f"validation NLL ({name})")
            )
            for name, curve in curves.items()
        },
        "folds": dg.MetadataValue.int(selection.num_folds),
        "fold_seconds": dg.MetadataValue.json([round(s, 2) for s in selection.fold_seconds]),
        "training_posts": dg.MetadataValue.int(selection.training_posts),
        "validation_posts": dg.MetadataValue.int(selection.validation_posts),
        "best_step": dg.MetadataValue.int(chosen.best_step),
        "train_seconds": round(selection.seconds, 2),
        "posts_per_second": round(selection.posts_per_second(), 1),
        "device": selection.device,
    }


def _plots(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> dict:
    if not y.size:
        return {}
    pit = norm.cdf((y - mu) / sigma)
    return {
        "calibration": dg.MetadataValue.md(calibration_md(pit)),
        "predicted_vs_observed": dg.MetadataValue.md(scatter_md(np.expm1(y), np.expm1(mu))),
    }


def _metric_metadata(metrics: dict) -> dict:
    """Every held-out number, as floats so the UI plots them across materialisations."""
    return {
        "holdout_posts": dg.MetadataValue.int(int(metrics.get("n", 0))),
        **{f"holdout_{k}": float(v) for k, v in metrics.items() if k != "n"},
    }
