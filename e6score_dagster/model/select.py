"""Model selection and cross-fitting: which candidate to publish, and out-of-fold params.

The candidates, simplest first: a constant log-normal, the linear model (ridge on hashed tag
effects plus metadata), the additive model (the same with tag effects shrunk by category and
rarity) and the deep stage fitted on top of the better of those two. All are fitted on the
same rows (every fold but fold 0, outside the hold-out) and compared on the same validation
slice; the hold-out is scored for reporting only. The chosen candidate is then refitted
without each other fold, so every post is scored by a model that never saw its favourites.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from e6score_dagster.memory import release_memory
from e6score_dagster.model.config import ModelConfig
from e6score_dagster.model.data import Batch, FeatureLayout, ParquetBatches, fold_of
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.network import WARM_FROZEN, warm_start
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.ridge import train_ridge
from e6score_dagster.model.train import (
    Log,
    TrainResult,
    baseline_config,
    calibrate_scale,
    device_name,
    init_params,
    metrics_with_constant,
    predict,
    predict_rows,
    train,
)

CANDIDATES = ("constant", "linear", "additive", "deep")
ADDITIVE = ("linear", "additive")  # what the deep stage can start from
# A more complex candidate is chosen only when it beats a simpler one on validation by more
# than this (noise of the scale calibration and rounding).
SELECTION_MARGIN = 1e-4
# The blocking rules (`gate`): the published model must beat the constant log-normal on the
# hold-out by at least MIN_GAIN_OVER_CONSTANT nats (less means broken data or training), and
# must not be worse than the params in use, on the same hold-out, by more than
# CURRENT_TOLERANCE nats.
MIN_GAIN_OVER_CONSTANT = 0.01
CURRENT_TOLERANCE = 0.01
EVAL_BATCH = 8192
MAX_VALIDATION_FRACTION = 0.2


@dataclass
class CandidateFit:
    name: str
    config: ModelConfig
    params: dict = field(repr=False)
    validation: dict[str, float]
    holdout: dict[str, float]
    curve: list[tuple[int, float]]  # (step, validation NLL)
    best_step: int
    steps: int
    seconds: float
    posts_per_second: float
    base: str | None = None  # the additive candidate the deep stage started from
    prior_precision: dict[int, float] = field(default_factory=dict)  # exact fits, per group
    prior_tail_dof: float = 0.0  # exact fits: Student-t prior's degrees of freedom, 0: Gaussian
    prior_sd: dict[str, float] = field(default_factory=dict)  # the same as sd of log1p(favs)
    solver: str = ""  # "ridge" (exact), "sgd" (gradient steps) or "" (nothing to fit)

    def warm(self) -> tuple[dict, dict[int, float], float]:
        """What starts another exact fit of the same model from this one (`train_ridge`)."""
        return self.params, self.prior_precision, self.prior_tail_dof


@dataclass
class Selection:
    """Everything `select_and_crossfit` decided and measured; the asset only reports it."""

    chosen: str
    config: ModelConfig  # the chosen candidate's
    candidates: dict[str, CandidateFit]
    fold_params: list[dict] = field(repr=False)  # [k]: fitted without fold k
    num_folds: int
    holdout: dict[str, float]  # the published (out-of-fold) predictions on the hold-out
    training_posts: int
    validation_posts: int
    fold_seconds: list[float]
    seconds: float
    device: str
    # (y, mu, sigma) of the published predictions on the hold-out, for the asset's plots
    holdout_predictions: tuple[np.ndarray, ...] = field(default=(), repr=False)
    # The params in use (`previous`), scored on the same hold-out; None on a first run
    current_holdout_nll: float | None = None

    @property
    def params(self) -> dict:
        return self.fold_params[0]

    def curves(self) -> dict[str, dict]:
        """Validation NLL by step for every fitted stage, with the step that was kept."""
        return {
            name: {"points": c.curve, "best_step": c.best_step}
            for name, c in self.candidates.items()
            if c.curve
        }

    def tag_effect_sd(self) -> dict[str, float]:
        """How much tag effects vary per group in the published model's additive part (its
        empirical-Bayes prior), in log1p(favs); empty when that part was not solved exactly."""
        chosen = self.candidates[self.chosen]
        base = self.candidates.get(chosen.base or "") if chosen.name == "deep" else chosen
        return dict(base.prior_sd) if base else {}

    def candidate_table(self) -> dict[str, dict[str, float]]:
        """Per candidate: validation and hold-out metrics, steps and seconds (JSON-able)."""
        out = {}
        for name, c in self.candidates.items():
            row: dict[str, float | str | None] = {
                **{f"validation_{k}": v for k, v in c.validation.items()},
                **{f"holdout_{k}": v for k, v in c.holdout.items()},
                "best_step": c.best_step,
                "solver": c.solver,
                "seconds": round(c.seconds, 2),
                "posts_per_second": round(c.posts_per_second, 1),
            }
            if c.base:
                row["base"] = c.base
            if c.solver == "ridge":
                row["prior"] = (f"student-t({c.prior_tail_dof:g})" if c.prior_tail_dof
                                else "gaussian")
            out[name] = row
        return out

    def posts_per_second(self) -> float:
        """Training throughput of the gradient-step fits (the exact solves have no batches)."""
        fits = [c for c in self.candidates.values() if c.steps and c.solver == "sgd"]
        posts = sum(c.steps * c.config.batch_size for c in fits)
        return posts / max(sum(c.seconds for c in fits), 1e-9)


@dataclass
class GateDecision:
    passed: bool
    reason: str
    metadata: dict[str, float | str]


def validation_fraction(config: ModelConfig, fit_posts: int) -> float:
    """`config.validation_fraction`, raised on small dumps so the slice that stops, calibrates
    and selects every fit holds at least `min_validation_posts` (at most 20% of the posts)."""
    wanted = config.min_validation_posts / max(fit_posts, 1)
    return max(config.validation_fraction, min(wanted, MAX_VALIDATION_FRACTION))


def _datasets(
    config: ModelConfig,
    layout: FeatureLayout,
    pool: ParquetBatches,
    fold: tuple[int, int] | None,
) -> tuple[ParquetBatches, ParquetBatches]:
    """The training and validation rows of the fit without `fold`, taken from `pool`. The
    validation fraction is the same for every fold (set by the rows one fold's fit has), so
    every fold's rows are whole blocks of the pool's design."""
    kept = (fold[1] - 1) / fold[1] if fold else 1.0
    fraction = validation_fraction(config, round(pool.num_rows() * kept))
    split = {"validation_fraction": fraction, "exclude_fold": fold, "pool": pool}
    matrix = pool.path
    data = ParquetBatches(
        matrix, layout, config.batch_size, rows="train", shuffle_seed=config.seed, **split
    )
    return data, ParquetBatches(matrix, layout, EVAL_BATCH, rows="validation", **split)


def candidate_config(config: ModelConfig, name: str) -> ModelConfig:
    if name == "deep":
        return dataclasses.replace(config, architecture="e6score")
    return baseline_config(config, name)


def _constant(config: ModelConfig, layout: FeatureLayout, validation: ParquetBatches) -> dict:
    """The all-zero LinearNet predicts the training posts' mean and standard deviation of
    log1p(favs); only its scale is calibrated on the validation slice."""
    params = jax.tree_util.tree_map(np.array, init_params(config, layout))
    y, mu, sigma = predict(config, layout, params, validation)
    calibrate_scale(params, y, mu, sigma)
    return params


def _fit(
    name: str,
    config: ModelConfig,
    layout: FeatureLayout,
    data: ParquetBatches,
    validation: ParquetBatches,
    log: Log,
    base: dict | None = None,
    warm: tuple[dict, dict[int, float], float | None] | None = None,
) -> tuple[dict, TrainResult | None]:
    """One candidate's params (and its training record); `base` is the additive fit the deep
    stage starts from, `warm` an earlier exact fit that starts an additive one."""
    cfg = candidate_config(config, name)
    if name == "constant":
        return _constant(cfg, layout, validation), None
    if name == "deep":
        if base is None:  # no additive stage to build on: the whole network from scratch
            result = train(cfg, layout, data, log, validation=validation)
        else:
            init = warm_start(init_params(cfg, layout), base)
            result = train(
                cfg, layout, data, log, validation=validation, init=init, frozen=WARM_FROZEN
            )
        return result.params, result
    if cfg.additive_solver == "ridge":
        result = train_ridge(cfg, layout, data, validation, log, warm)
    else:
        result = train(cfg, layout, data, log, validation=validation)
    return result.params, result


def _metrics(cfg: ModelConfig, layout: FeatureLayout, params: dict, data: ParquetBatches) -> dict:
    y, mu, sigma = predict(cfg, layout, params, data)
    return predictive_metrics(y, mu, sigma) if y.size else {"n": 0}


def choose(validation_nll: dict[str, float]) -> str:
    """The candidate with the best validation NLL; a later (more complex) one must beat the
    best so far by more than SELECTION_MARGIN."""
    best = None
    for name, nll in validation_nll.items():
        if best is None or nll < validation_nll[best] - SELECTION_MARGIN:
            best = name
    if best is None:
        raise ValueError("no candidates to choose from")
    return best


def select_and_crossfit(
    config: ModelConfig,
    layout: FeatureLayout,
    matrix: Path,
    log: Log = print,
    previous: Fitted | None = None,
) -> Selection:
    """Fit every candidate without fold 0, choose by validation NLL, refit the chosen one
    without each other fold. With `config.folds` < 2 nothing is held out of the fits but the
    hold-out (in-sample scores; for comparison only). `previous`: the params in use, scored
    on the same hold-out for the gate."""
    t0 = time.perf_counter()
    k_folds = max(int(config.folds), 1)
    fold0 = (0, k_folds) if k_folds > 1 else None
    names = [n for n in CANDIDATES if n in config.candidates]
    unknown = set(config.candidates) - set(CANDIDATES)
    if unknown or not names:
        raise ValueError(f"unknown candidates {sorted(unknown)}; known: {CANDIDATES}")
    # Every fit's rows come from one pool of all fit rows: the exact solves' design is built
    # once over it, in blocks by fold and validation split, and each fit takes its blocks.
    pool = ParquetBatches(matrix, layout, config.batch_size, rows="fit")
    data, validation = _datasets(config, layout, pool, fold0)
    held_out = ParquetBatches(matrix, layout, EVAL_BATCH, rows="holdout")
    held_out.load()  # kept until the out-of-fold predictions: read once
    fits: dict[str, CandidateFit] = {}
    params_of: dict[str, dict] = {}
    for name in names:
        base_name = None
        if name == "deep":
            done = [n for n in ADDITIVE if n in fits]
            if done:
                base_name = min(done, key=lambda n: fits[n].validation["nll"])
            data.release()  # the exact fits' part of the pool's design: the folds refit from it
        log(f"candidate {name}" + (f" (on top of {base_name})" if base_name else ""))
        t_fit = time.perf_counter()
        base = params_of.get(base_name) if base_name else None
        warm = (params_of["linear"], {}, None) if name == "additive" and "linear" in fits else None
        params, result = _fit(name, config, layout, data, validation, log, base, warm)
        cfg = candidate_config(config, name)
        params_of[name] = params
        if base_name and result is not None and result.best_step == 0:
            # The deep stage kept its start, which predicts what its base does (`warm_start`).
            scored = fits[base_name].validation, fits[base_name].holdout
        else:
            scored = (_metrics(cfg, layout, params, validation),
                      _metrics(cfg, layout, params, held_out))
        fits[name] = CandidateFit(
            name=name,
            config=cfg,
            params=params,
            validation=scored[0],
            holdout=scored[1],
            curve=[(v["step"], v["nll"]) for v in result.validation] if result else [],
            best_step=result.best_step if result else 0,
            steps=result.steps if result else 0,
            seconds=result.seconds if result else time.perf_counter() - t_fit,
            posts_per_second=result.posts_per_second if result else 0.0,
            base=base_name,
            prior_precision=result.prior_precision if result else {},
            prior_tail_dof=result.prior_tail_dof if result else 0.0,
            prior_sd=result.prior_sd if result else {},
            solver=(cfg.additive_solver if name in ADDITIVE else "sgd") if result else "",
        )
        log(
            f"candidate {name}: validation NLL {fits[name].validation.get('nll', float('nan')):.4f}"
        )
        # A fit's link, scale and metrics leave about 0.9 GB of freed heap at 6M posts, which
        # the next fit (the deep stage: its peak) would otherwise start on top of.
        release_memory(collect=False)
    # The refits read their own rows: let these go (at 1M posts, about 0.5 GB with designs).
    training_posts, validation_posts = data.num_rows(), validation.num_rows()
    data.release()
    validation.release()
    chosen = choose({n: f.validation["nll"] for n, f in fits.items()})
    log(f"chosen: {chosen}")
    chosen_fit = fits[chosen]
    fold_params = [chosen_fit.params]
    fold_seconds = [time.perf_counter() - t0]
    # The prior widths are hyper-parameters, chosen by the evidence on fold 0's fit: each refit
    # keeps them and solves once, from fold 0's solution.
    refit = dataclasses.replace(config, evidence_rounds=1)
    for k in range(1, k_folds):
        t_fold = time.perf_counter()
        log(f"cross-fitting {chosen} without fold {k} of {k_folds}")
        fdata, fval = _datasets(config, layout, pool, (k, k_folds))
        # Every fold's fit starts from fold 0's (the same rows but two folds' worth).
        base = None
        if chosen == "deep" and chosen_fit.base:
            first = fits[chosen_fit.base]
            warm = first.warm()
            base, _ = _fit(first.name, refit, layout, fdata, fval, log, warm=warm)
        warm = chosen_fit.warm() if chosen in ADDITIVE else None
        params, _ = _fit(chosen, refit, layout, fdata, fval, log, base, warm)
        fold_params.append(params)
        fdata.release()
        fval.release()
        release_memory(collect=False)
        fold_seconds.append(time.perf_counter() - t_fold)
    pool.release()
    held_rows = held_out.load()
    predictions = predict_out_of_fold(chosen_fit.config, layout, fold_params, held_rows)
    current_nll = current_holdout_nll(previous, layout, matrix, held_rows) if previous else None
    held_out.release()
    return Selection(
        chosen=chosen,
        config=chosen_fit.config,
        candidates=fits,
        fold_params=fold_params,
        num_folds=k_folds,
        holdout=metrics_with_constant(*predictions, layout),
        training_posts=training_posts,
        validation_posts=validation_posts,
        fold_seconds=fold_seconds,
        seconds=time.perf_counter() - t0,
        device=device_name(),
        holdout_predictions=predictions,
        current_holdout_nll=current_nll,
    )


def predict_out_of_fold(
    config: ModelConfig, layout: FeatureLayout, fold_params: list[dict], rows: Batch
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, mu, sigma) of loaded `rows`, each post predicted by its own fold's model."""
    fold = fold_of(rows["id"], len(fold_params))
    parts = [
        predict_rows(config, layout, params, {k: v[fold == i] for k, v in rows.items()})
        for i, params in enumerate(fold_params)
    ]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def gate(selection: Selection, current_nll: float | None) -> GateDecision:
    """Whether the new params may be published. Blocks only a fit that is not clearly better
    than the constant log-normal (broken data or training) or that is worse than the params in
    use, on the same hold-out, by more than CURRENT_TOLERANCE."""
    nll = float(selection.holdout.get("nll", float("inf")))
    const = selection.candidates.get("constant")
    const_nll = float(
        const.holdout["nll"] if const else selection.holdout.get("constant_nll", float("nan"))
    )
    meta: dict[str, float | str] = {
        "chosen_candidate": selection.chosen,
        "holdout_nll": nll,
        "constant_holdout_nll": const_nll,
        "min_gain_over_constant": MIN_GAIN_OVER_CONSTANT,
        "current_tolerance": CURRENT_TOLERANCE,
    }
    if current_nll is not None:
        meta["current_params_holdout_nll"] = float(current_nll)
    if not selection.holdout.get("n"):
        return GateDecision(False, "no hold-out posts to judge the fit on", meta)
    if not nll < const_nll - MIN_GAIN_OVER_CONSTANT:
        reason = (
            f"the chosen model ({selection.chosen}, hold-out NLL {nll:.4f}) is not better than "
            f"a constant log-normal ({const_nll:.4f}) by {MIN_GAIN_OVER_CONSTANT}: broken data "
            "or training"
        )
        return GateDecision(False, reason, meta)
    if current_nll is not None and nll > current_nll + CURRENT_TOLERANCE:
        reason = (
            f"the new fit's hold-out NLL {nll:.4f} is worse than the params in use "
            f"({current_nll:.4f}) by more than {CURRENT_TOLERANCE}"
        )
        return GateDecision(False, reason, meta)
    return GateDecision(True, f"{selection.chosen} published", meta)


def compatible(previous: Fitted, layout: FeatureLayout) -> bool:
    """Whether `previous` params read this feature matrix's columns and tag codes the same
    way (same vocabulary and feature layout), so they can be scored on its hold-out."""
    keys = ("vocabulary", "dense_tags")
    return (
        previous.layout.numeric == layout.numeric
        and previous.layout.max_tags == layout.max_tags
        and all(previous.layout.extra.get(k) == layout.extra.get(k) for k in keys)
    )


def current_holdout_nll(
    previous: Fitted, layout: FeatureLayout, matrix: Path, rows: Batch | None = None
) -> float | None:
    """The hold-out NLL of the params in use, on the new feature matrix's hold-out (`rows`
    when already loaded) when they can read it; otherwise the NLL they recorded on their own
    dump's hold-out (the same hash-chosen posts, a dump earlier); None when neither is
    known."""
    if compatible(previous, layout):
        folds = previous.fold_params or [previous.params]
        if rows is None:
            rows = ParquetBatches(matrix, layout, EVAL_BATCH, rows="holdout").load()
        y, mu, sigma = predict_out_of_fold(previous.config, previous.layout, folds, rows)
        return float(predictive_metrics(y, mu, sigma)["nll"]) if y.size else None
    recorded = (previous.meta.get("metrics") or {}).get("nll")
    return float(recorded) if recorded is not None else None
