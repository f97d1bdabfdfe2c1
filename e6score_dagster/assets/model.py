"""Fitting the E6Score model on the feature matrix; params keyed by what they were built from."""

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
from dagster_duckdb import DuckDBResource
from scipy.stats import norm

from e6score_dagster import stage
from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.code_versions import code_version
from e6score_dagster.model import (
    FeatureLayout,
    ModelConfig,
    ParquetBatches,
    predict,
    save_params,
)
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.train import baseline_config, fit_with_baseline, metrics_with_constant
from e6score_dagster.plots import calibration_md, line_plot_md, scatter_md
from e6score_dagster.resources import StateDir

_DEFAULTS = ModelConfig()


BASELINES = ("constant", "linear")
# "Better" means by more than rounding and the scale calibration's own noise: a model that
# predicts what a baseline predicts must not pass by a hair.
MIN_NLL_GAIN = 1e-3


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
    evals_per_epoch: int = _DEFAULTS.evals_per_epoch
    patience: int = _DEFAULTS.patience

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_dump())


@dataclass
class Fit:
    """What one fit produced: the params to save, their held-out metrics, what to report."""

    fitted: Fitted
    metrics: dict
    metadata: dict


def fit_model(mcfg: ModelConfig, features: Path, meta: dict, log) -> Fit:
    """Fit on the feature matrix in `features`; held-out metrics for the model and baselines."""
    layout = FeatureLayout.read(features / "layout.json")
    matrix = features / "matrix.parquet"
    split = {"validation_fraction": mcfg.validation_fraction}
    data = ParquetBatches(
        matrix, layout, mcfg.batch_size, rows="train", shuffle_seed=mcfg.seed, **split
    )
    validation = ParquetBatches(matrix, layout, 8192, rows="validation", **split)
    held_out = ParquetBatches(matrix, layout, 8192, rows="holdout")
    # The linear baseline: same split and optimiser, additive in the tags and metadata.
    fits = fit_with_baseline(mcfg, layout, data, validation, log=log)
    result = fits.model
    y, mu, sigma = predict(mcfg, layout, result.params, held_out)
    metrics = metrics_with_constant(y, mu, sigma, layout)
    stages = {"linear": (baseline_config(mcfg), fits.linear)}
    if fits.additive is not None:  # reported, to show what each stage adds
        stages["additive"] = (baseline_config(mcfg, "additive"), fits.additive)
    for name, (cfg, fit) in stages.items():
        sy, smu, ssigma = predict(cfg, layout, fit.params, held_out)
        if sy.size:
            stage_metrics = predictive_metrics(sy, smu, ssigma)
            metrics |= {f"{name}_{k}": v for k, v in stage_metrics.items() if k != "n"}
    log(f"held-out metrics: {metrics}")
    curve = [(h["step"], h["loss"]) for h in result.history]
    metadata = {
        "config": dg.MetadataValue.json(mcfg.to_dict()),
        "training_posts": dg.MetadataValue.int(data.num_rows()),
        **_metric_metadata(metrics),
        "validation_posts": dg.MetadataValue.int(validation.num_rows()),
        "steps": dg.MetadataValue.int(result.steps),
        "best_step": dg.MetadataValue.int(result.best_step),
        "sigma_calibration": round(result.sigma_calibration, 4),
        "train_seconds": round(result.seconds, 2),
        "validation_seconds": round(result.eval_seconds, 2),
        "stage_seconds": dg.MetadataValue.json(
            {
                "linear": round(fits.linear.seconds, 2),
                **({"additive": round(fits.additive.seconds, 2)} if fits.additive else {}),
                "deep": round(result.seconds, 2),
            }
        ),
        "posts_per_second": round(result.posts_per_second, 1),
        "data_wait_share": round(result.data_wait_seconds / max(result.seconds, 1e-9), 4),
        "loss_curve": dg.MetadataValue.md(line_plot_md(curve, "step", "training NLL")),
        "validation_curve": dg.MetadataValue.md(
            line_plot_md(
                [(v["step"], v["nll"]) for v in result.validation], "step", "validation NLL"
            )
        ),
        **_plots(y, mu, sigma),
    }
    fitted = Fitted(result.params, mcfg, layout, {**meta, "metrics": metrics})
    return Fit(fitted, metrics, metadata)


@dg.asset(
    group_name="model",
    deps=["feature_matrix"],
    kinds={"jax", "msgpack"},
    code_version=code_version(__name__),
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    check_specs=[
        dg.AssetCheckSpec(
            "beats_baselines",
            asset="fitted_params",
            blocking=True,
            description="Held-out NLL beats (by at least 0.001) a constant log-normal and a "
            "linear model on tag indicators plus metadata, fitted on the same split. A fit that "
            "does not is not published: the previous params stay in use (its metrics stay in "
            "the lineage history).",
        )
    ],
    description="The fitted E6Score model (Flax params, msgpack), trained on every non-deleted "
    "post outside the hold-out set. One file per version (feature matrix, code version, "
    "config) under `$E6SCORE_HOME/params/`: the same inputs never train twice; the files of "
    "the last `E6SCORE_KEEP_DUMPS` published versions stay loadable.",
)
def fitted_params(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    duckdb: DuckDBResource,
    state: StateDir,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    mcfg = config.to_model_config()
    with stage.begin(
        context, duckdb, state, inputs=["feature_matrix"], config=mcfg.to_dict(),
        folder=state.params,
    ) as st:
        if st.reuse:
            path = Path(st.reuse.info["path"])
            return st.reused_result(
                params_path=dg.MetadataValue.path(str(path)),
                **_metric_metadata(st.reuse.info.get("metrics", {})),
            )
        path = state.params / f"{st.dump_date}-{st.version}.msgpack"
        meta = {
            "dump_date": st.dump_date,
            "inputs": st.input_versions,
            "code_version": st.code_version,
        }
        fit = fit_model(
            mcfg, Path(st.inputs["feature_matrix"].info["dir"]), meta, context.log.info
        )
        save_params(st.path(path), fit.fitted)
        return st.finish(
            info={"path": str(path), **fit.fitted.meta},
            checks=[_gate(fit.metrics)],
            metadata={
                "params_path": dg.MetadataValue.path(str(path)),
                **fit.metadata,
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )


def _plots(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> dict:
    if not y.size:
        return {}
    pit = norm.cdf((y - mu) / sigma)
    return {
        "calibration": dg.MetadataValue.md(calibration_md(pit)),
        "predicted_vs_observed": dg.MetadataValue.md(scatter_md(np.expm1(y), np.expm1(mu))),
    }


def _gate(metrics: dict) -> dg.AssetCheckResult:
    """Blocking: a fit that does not beat every baseline on held-out NLL is not used."""
    nll = metrics.get("nll", float("inf"))
    losers = [
        b for b in BASELINES if not nll < metrics.get(f"{b}_nll", float("-inf")) - MIN_NLL_GAIN
    ]
    return dg.AssetCheckResult(
        check_name="beats_baselines",
        passed=bool(metrics.get("n")) and not losers,
        metadata={
            "holdout_nll": float(nll),
            **{f"{b}_nll": float(metrics.get(f"{b}_nll", float("nan"))) for b in BASELINES},
            "loses_to": ", ".join(losers) or "none",
            "min_nll_gain": MIN_NLL_GAIN,
        },
    )


def _metric_metadata(metrics: dict) -> dict:
    """Every held-out number, as floats so the UI plots them across materialisations."""
    return {
        "holdout_posts": dg.MetadataValue.int(int(metrics.get("n", 0))),
        **{f"holdout_{k}": float(v) for k, v in metrics.items() if k != "n"},
    }
