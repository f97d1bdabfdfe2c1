"""Fitting the E6Score model on the feature matrix; params keyed by what they were built from."""

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
from dagster_duckdb import DuckDBResource
from scipy.stats import norm

from e6score_dagster.automation import ON_NEW_DATA_VERSION
from e6score_dagster.model import (
    FeatureLayout,
    ModelConfig,
    ParquetBatches,
    load_params,
    predict,
    save_params,
)
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.train import (
    Fits,
    TrainResult,
    baseline_config,
    fit_with_baseline,
    metrics_with_constant,
)
from e6score_dagster.plots import calibration_md, scatter_md, stage_curves_md
from e6score_dagster.report import comparison_table_md, gain_over, summary_lines
from e6score_dagster.resources import StateDir
from e6score_dagster.store import (
    code_version,
    lineage_metadata,
    read_lineage,
    record_lineage,
    transaction,
    version_key,
)

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


@dg.asset(
    group_name="model",
    deps=["feature_matrix"],
    kinds={"jax", "msgpack"},
    code_version="2",
    pool="duckdb",
    automation_condition=ON_NEW_DATA_VERSION,
    check_specs=[
        dg.AssetCheckSpec(
            "beats_baselines",
            asset="fitted_params",
            blocking=True,
            description="Held-out NLL beats (by at least 0.001) a constant log-normal and a "
            "linear model on tag indicators plus metadata, fitted on the same split. A fit that "
            "does not is kept for inspection but not used: the previous params stay in use.",
        )
    ],
    description="The fitted E6Score model (Flax params, msgpack), trained on every non-deleted "
    "post outside the hold-out set. One file per (feature matrix, code version, config) under "
    "`$E6SCORE_HOME/params/`: the same inputs never train twice, and earlier files stay "
    "loadable.",
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
    mcfg = config.to_model_config()
    inputs = {"feature_matrix": features["key"]}
    key = version_key(inputs, code_version(context), mcfg.to_dict())
    path = state.params / f"{dump_date}-{key}.msgpack"
    if path.exists():
        context.log.info(f"params for these inputs, code and config exist: reusing {path.name}")
        meta = load_params(path).meta
        gate = _gate(meta.get("metrics", {}))
        if gate.passed:
            with duckdb.get_connection() as conn, transaction(conn):
                record_lineage(
                    conn, "fitted_params", dump_date, {"key": key, "path": str(path), **meta}
                )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(key),
            metadata={
                **lineage_metadata(dump_date, key, inputs, reused=True),
                **_comparison_metadata(meta.get("metrics", {}), mcfg),
                "params_path": dg.MetadataValue.path(str(path)),
            },
            check_results=[gate],
        )
    fdir = Path(features["dir"])
    layout = FeatureLayout.read(fdir / "layout.json")
    matrix = fdir / "matrix.parquet"
    split = {"validation_fraction": mcfg.validation_fraction}
    data = ParquetBatches(
        matrix, layout, mcfg.batch_size, rows="train", shuffle_seed=mcfg.seed, **split
    )
    validation = ParquetBatches(matrix, layout, 8192, rows="validation", **split)
    held_out = ParquetBatches(matrix, layout, 8192, rows="holdout")
    # The linear baseline: same split and optimiser, additive in the tags and metadata.
    fits = fit_with_baseline(mcfg, layout, data, validation, log=context.log.info)
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
    metrics |= _validation_nlls(fits)
    curves = _stage_curves(fits)
    candidates, chosen = _candidates(metrics, mcfg)
    for line in summary_lines(
        candidates, chosen, curves.best_steps, curves.kept, int(metrics.get("n", 0))
    ):
        context.log.info(line)
    gate = _gate(metrics)
    meta = {
        "dump_date": dump_date,
        "inputs": inputs,
        "code_version": code_version(context),
        "metrics": metrics,
    }
    save_params(path, Fitted(result.params, mcfg, layout, meta))
    if gate.passed:
        with duckdb.get_connection() as conn, transaction(conn):
            record_lineage(
                conn, "fitted_params", dump_date, {"key": key, "path": str(path), **meta}
            )
    else:
        context.log.warning(
            f"the new fit does not beat {gate.metadata['loses_to'].value}: kept {path.name} for "
            "inspection, the previous params stay in use"
        )
    stage_seconds = {name: fit.seconds for name, fit in _stage_fits(fits).items()}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key),
        metadata={
            **_comparison_metadata(metrics, mcfg),
            "stage_curves": dg.MetadataValue.md(curves.markdown),
            "train_seconds": round(sum(stage_seconds.values()), 2),
            "posts_per_second": round(result.posts_per_second, 1),
            **lineage_metadata(dump_date, key, inputs, reused=False),
            "params_path": dg.MetadataValue.path(str(path)),
            "config": dg.MetadataValue.json(mcfg.to_dict()),
            "training_posts": dg.MetadataValue.int(data.num_rows()),
            "validation_posts": dg.MetadataValue.int(validation.num_rows()),
            "steps": dg.MetadataValue.int(result.steps),
            "best_step": dg.MetadataValue.int(result.best_step),
            "sigma_calibration": round(result.sigma_calibration, 4),
            "validation_seconds": round(result.eval_seconds, 2),
            "stage_seconds": dg.MetadataValue.json(
                {name: round(sec, 2) for name, sec in stage_seconds.items()}
            ),
            "data_wait_share": round(result.data_wait_seconds / max(result.seconds, 1e-9), 4),
            **_plots(y, mu, sigma),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        check_results=[gate],
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


def _stage_fits(fits: Fits) -> dict[str, TrainResult]:
    """The fits of this materialisation by stage name, in the order they ran."""
    if fits.model is fits.linear:  # architecture "linear": the baseline is the model
        return {"linear": fits.linear}
    stages = {"linear": fits.linear}
    if fits.additive is not None:
        stages["additive"] = fits.additive
    stages["deep"] = fits.model
    return stages


def _validation_nlls(fits: Fits) -> dict[str, float]:
    """Each fit's best validation NLL, keyed like the held-out metrics (the model unprefixed)."""
    out = {}
    for name, fit in _stage_fits(fits).items():
        if fit.validation:
            prefix = "" if fit is fits.model else f"{name}_"
            out[f"{prefix}val_nll"] = min(v["nll"] for v in fit.validation)
    return out


@dataclass
class _Curves:
    markdown: str
    best_steps: dict[str, int]
    kept: dict[str, bool]


def _stage_curves(fits: Fits) -> _Curves:
    """Every fitted stage's validation curve (training loss when there is no validation
    slice); the deep stage is not kept when no step beat its warm start."""
    stages = _stage_fits(fits)
    on_validation = all(fit.validation for fit in stages.values())
    curves = {
        name: [(v["step"], v["nll"]) for v in fit.validation]
        if on_validation
        else [(h["step"], h["loss"]) for h in fit.history]
        for name, fit in stages.items()
    }
    best_steps = {name: fit.best_step for name, fit in stages.items()}
    warm = fits.additive is not None
    kept = {
        name: not (warm and name == "deep" and fit.best_step == 0) for name, fit in stages.items()
    }
    md = stage_curves_md(
        curves, best_steps, kept, "validation NLL" if on_validation else "training NLL"
    )
    return _Curves(md, best_steps, kept)


def _candidates(metrics: dict, mcfg: ModelConfig) -> tuple[dict[str, dict], str]:
    """Held-out (and validation) metrics per candidate, baselines first, and the one in use."""
    chosen = "linear" if mcfg.architecture == "linear" else "deep"
    rows: dict[str, dict] = {}
    for name in ("constant", "linear", "additive"):
        prefix = f"{name}_"
        row = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        if row and name != chosen:
            rows[name] = row
    rows[chosen] = {k: v for k, v in metrics.items() if not k.startswith(_PREFIXES) and k != "n"}
    return rows, chosen


_PREFIXES = ("constant_", "linear_", "additive_")


def _comparison_metadata(metrics: dict, mcfg: ModelConfig) -> dict:
    """The comparison table first, then the few numbers the UI plots across materialisations."""
    if not metrics.get("n"):
        return {"holdout_posts": dg.MetadataValue.int(0)}
    candidates, chosen = _candidates(metrics, mcfg)
    n = int(metrics["n"])
    return {
        "model_comparison": dg.MetadataValue.md(comparison_table_md(candidates, chosen, n)),
        "holdout_nll": round(float(metrics["nll"]), 4),
        "nll_gain_over_linear": round(gain_over(candidates, chosen, "linear"), 4),
        "holdout_posts": dg.MetadataValue.int(n),
        "candidate_metrics": dg.MetadataValue.json(candidates),
    }
