"""Fitting the E6Score model: the model package selects and cross-fits, this asset reports."""

import time
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
    load_params,
    save_params,
    use_compilation_cache,
)
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.select import (
    CURRENT_TOLERANCE,
    MIN_GAIN_OVER_CONSTANT,
    GateDecision,
    Selection,
    gate,
    select_and_crossfit,
)
from e6score_dagster.plots import calibration_md, scatter_md, stage_curves_md
from e6score_dagster.report import comparison_table_md, gain_over, summary_lines
from e6score_dagster.resources import StateDir

_DEFAULTS = ModelConfig()
CHECK = "fit_is_publishable"
PUBLISHED_ROW = "published (out of fold)"


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
    additive_solver: str = _DEFAULTS.additive_solver
    """"ridge": the linear and additive candidates solved exactly (prior scales by the
    evidence); "sgd": trained by AdamW with early stopping like the deep stage."""
    evidence_rounds: int = _DEFAULTS.evidence_rounds
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
    code_version=code_version(__name__),
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
            f"on the same hold-out, by more than {CURRENT_TOLERANCE}. A fit that fails is not "
            "published: the previous params stay in use (its metrics stay in the lineage "
            "history).",
        )
    ],
    description="The fitted E6Score model (Flax params, msgpack): the candidate (constant, "
    "linear, additive, deep) with the best validation NLL, refitted without each "
    "cross-fitting fold so every post is scored out of fold. One file per version (feature "
    "matrix, code version, config) under `$E6SCORE_HOME/params/`: the same inputs never train "
    "twice; the files of the last `E6SCORE_KEEP_DUMPS` published versions stay loadable.",
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
            info = st.reuse.info
            return st.reused_result(
                params_path=dg.MetadataValue.path(info["path"]),
                **_comparison_metadata(info.get("table", {}), info.get("chosen_candidate", "")),
            )
        use_compilation_cache(state.sub("jax_cache"))
        features = Path(st.inputs["feature_matrix"].info["dir"])
        layout = FeatureLayout.read(features / "layout.json")
        matrix = features / "matrix.parquet"
        selection = select_and_crossfit(
            mcfg, layout, matrix, log=context.log.info, previous=_params_in_use(st.published)
        )
        decision = gate(selection, selection.current_holdout_nll)
        table = _table(selection)
        for line in summary_lines(
            table, selection.chosen, *_stage_marks(selection), int(selection.holdout.get("n", 0))
        ):
            context.log.info(line)
        path = state.params / f"{st.dump_date}-{st.version}.msgpack"
        meta = {
            "dump_date": st.dump_date,
            "inputs": st.input_versions,
            "code_version": st.code_version,
            "chosen_candidate": selection.chosen,
            "metrics": selection.holdout,
            "table": table,
        }
        fitted = Fitted(selection.params, selection.config, layout, meta, selection.fold_params)
        save_params(st.path(path), fitted)
        return st.finish(
            info={"path": str(path), **meta},
            checks=[_check(decision)],
            metadata={
                **_comparison_metadata(table, selection.chosen),
                "stage_curves": dg.MetadataValue.md(
                    stage_curves_md(_curves(selection), *_stage_marks(selection))
                ),
                **_selection_metadata(selection),
                "params_path": dg.MetadataValue.path(str(path)),
                "config": dg.MetadataValue.json(mcfg.to_dict()),
                **_plots(*selection.holdout_predictions),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )


def _params_in_use(published) -> Fitted | None:
    """The published params the new fit must not be worse than (None on a first run)."""
    if published is None or not Path(published.info.get("path", "")).exists():
        return None
    return load_params(Path(published.info["path"]))


def _check(decision: GateDecision) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=CHECK,
        passed=decision.passed,
        metadata={**decision.metadata, "reason": decision.reason},
    )


def _table(selection: Selection) -> dict[str, dict[str, float]]:
    """Per candidate its hold-out metrics and best validation NLL, then the published
    (out-of-fold) predictions of the chosen one: what the comparison table shows."""
    rows = {
        name: {**{k: v for k, v in c.holdout.items() if k != "n"}, "val_nll": c.validation["nll"]}
        for name, c in selection.candidates.items()
    }
    rows[PUBLISHED_ROW] = {
        k: v for k, v in selection.holdout.items() if k != "n" and not k.startswith("constant_")
    }
    return rows


def _curves(selection: Selection) -> dict[str, list[tuple[int, float]]]:
    return {name: c["points"] for name, c in selection.curves().items()}


def _stage_marks(selection: Selection) -> tuple[dict[str, int], dict[str, bool]]:
    """Each fitted stage's stopping step, and whether its result is in the published model
    (the chosen candidate and the additive stage it was built on)."""
    curves = selection.curves()
    chosen = selection.candidates[selection.chosen]
    in_use = {selection.chosen, chosen.base}
    best_steps = {name: c["best_step"] for name, c in curves.items()}
    return best_steps, {name: name in in_use for name in curves}


def _comparison_metadata(table: dict[str, dict[str, float]], chosen: str) -> dict:
    """The comparison table first, then the few numbers the UI plots across materialisations."""
    published = table.get(PUBLISHED_ROW, {})
    if not published:
        return {}
    return {
        "model_comparison": dg.MetadataValue.md(comparison_table_md(table, chosen)),
        "chosen_candidate": chosen,
        "holdout_nll": round(float(published["nll"]), 4),
        "nll_gain_over_linear": round(gain_over(table, PUBLISHED_ROW, "linear"), 4),
        "candidate_metrics": dg.MetadataValue.json(table),
    }


def _selection_metadata(selection: Selection) -> dict:
    """How the fits went: folds, sizes, time, throughput and the device they ran on."""
    return {
        "holdout_posts": dg.MetadataValue.int(int(selection.holdout.get("n", 0))),
        "folds": dg.MetadataValue.int(selection.num_folds),
        "fold_seconds": dg.MetadataValue.json([round(s, 2) for s in selection.fold_seconds]),
        "training_posts": dg.MetadataValue.int(selection.training_posts),
        "validation_posts": dg.MetadataValue.int(selection.validation_posts),
        "train_seconds": round(selection.seconds, 2),
        "posts_per_second": round(selection.posts_per_second(), 1),
        "stage_fits": dg.MetadataValue.json({
            name: {k: row[k] for k in ("solver", "prior", "seconds", "posts_per_second",
                                       "best_step") if k in row}
            for name, row in selection.candidate_table().items()
        }),
        "device": selection.device,
        "tag_effect_sd": dg.MetadataValue.json(selection.tag_effect_sd()),
    }


def _plots(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> dict:
    if not y.size:
        return {}
    pit = norm.cdf((y - mu) / sigma)
    return {
        "calibration": dg.MetadataValue.md(calibration_md(pit)),
        "predicted_vs_observed": dg.MetadataValue.md(scatter_md(np.expm1(y), np.expm1(mu))),
    }
