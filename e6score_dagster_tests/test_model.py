"""The pure model package on feature matrices with a known, learnable signal."""

from __future__ import annotations

import importlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import serialization
from scipy.stats import norm

from e6score_dagster.model import (
    FeatureLayout,
    ModelConfig,
    ParquetBatches,
    evaluate,
    load_params,
    save_params,
    score_batches,
    train,
)
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.network import SPREAD_FEATURES, warm_start
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.train import (
    NonFiniteLossError,
    baseline_config,
    calibrate_scale,
    fit_with_baseline,
    init_params,
    predict,
)

CONFIG = ModelConfig(epochs=6, batch_size=128, hash_bits=10, embed_dim=8, mlp_widths=(16,),
                     learning_rate=1e-2)
MAX_TAGS = 8


def make_matrix(path, n=4000, seed=0, row_group=500, order=None, nan_y=False):
    """Posts whose log-favourites are a sum of hidden per-tag effects plus age and noise."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0, 0.8, 201)
    effects[0] = 0
    k = rng.integers(1, MAX_TAGS + 1, n)
    tags = rng.integers(1, 201, (n, MAX_TAGS))
    tags[np.arange(MAX_TAGS)[None, :] >= k[:, None]] = 0
    t_years = rng.uniform(0, 19, n).astype(np.float32)
    log_age = np.log1p((19 - t_years) * 365).astype(np.float32)
    mu = 1.5 + effects[tags].sum(axis=1) + 0.1 * t_years
    fav = np.maximum(np.round(np.expm1(mu + rng.normal(0, 0.3, n))), 0).astype(np.int64)
    y = np.log1p(fav).astype(np.float32)
    if nan_y:
        y[:] = np.nan
    ids = np.arange(1, n + 1) * 3
    table = pa.table({
        "id": ids,
        "fav_count": fav,
        "y": y,
        "tags": pa.array(list(tags.astype(np.int32)), type=pa.list_(pa.int32())),
        "rating_idx": rng.integers(0, 3, n).astype(np.int8),
        "ext_idx": rng.integers(0, 8, n).astype(np.int8),
        "t_upload_years": t_years,
        "log_age_days": log_age,
        "holdout": (ids % 10) == 0,
        "trainable": np.ones(n, bool),
    })
    if order is not None:
        table = table.take(order)
    pq.write_table(table, path, row_group_size=row_group)
    train_rows = ~table.column("holdout").to_numpy()
    yt = table.column("y").to_numpy()[train_rows]
    layout = FeatureLayout(
        numeric=("t_upload_years", "log_age_days"), max_tags=MAX_TAGS, n_ext=8, n_rating=3,
        y_mean=float(np.nanmean(yt)) if not nan_y else 0.0,
        y_std=float(np.nanstd(yt)) if not nan_y else 1.0,
        numeric_mean=(9.5, 7.0), numeric_std=(5.5, 1.5),
    )
    return table, layout


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "matrix.parquet"
    _, layout = make_matrix(path)
    data = ParquetBatches(path, layout, CONFIG.batch_size, rows="train", shuffle_seed=0)
    result = train(CONFIG, layout, data, log=lambda _: None)
    return path, layout, result


def test_loss_decreases_and_beats_constant_baseline(fitted):
    path, layout, result = fitted
    first = result.history[0]["loss"]
    last = result.history[-1]["loss"]
    assert last < first - 0.3
    metrics = evaluate(CONFIG, layout, result.params,
                       ParquetBatches(path, layout, 256, rows="holdout"))
    assert metrics["n"] == 400
    assert metrics["nll"] < metrics["constant_nll"] - 0.2
    assert metrics["spearman"] > 0.5 > metrics["constant_spearman"]
    assert abs(metrics["coverage_80"] - 0.8) < 0.1


def test_training_never_sees_holdout_rows(fitted):
    path, layout, _ = fitted
    seen = np.concatenate([
        b["id"][b["weight"] > 0]
        for b in ParquetBatches(path, layout, 128, rows="train", shuffle_seed=0).epoch(0)
    ])
    assert len(seen) == 3600 and len(np.unique(seen)) == 3600
    assert not np.any(seen % 10 == 0)


def test_streamed_rows_train_as_well_as_resident_ones(fitted, monkeypatch):
    """Rows above the resident limit (RESIDENT_MAX_BYTES on an accelerator, 3M posts;
    CPU_RESIDENT_MAX_BYTES on a CPU, 200k) stream from the file in chunks instead of being
    gathered on the device: another order of the same rows, the same quality."""
    path, layout, resident = fitted
    logs: list[str] = []
    trainer = importlib.import_module("e6score_dagster.model.train")
    monkeypatch.setattr(trainer, "RESIDENT_MAX_BYTES", 0)
    monkeypatch.setattr(trainer, "CPU_RESIDENT_MAX_BYTES", 0)
    data = ParquetBatches(path, layout, CONFIG.batch_size, rows="train", shuffle_seed=0)
    streamed = train(CONFIG, layout, data, log=logs.append)
    assert any("(streamed)" in line for line in logs)
    assert streamed.steps == resident.steps and streamed.history != resident.history
    holdout = ParquetBatches(path, layout, 256, rows="holdout")
    nll = [evaluate(CONFIG, layout, r.params, holdout)["nll"] for r in (resident, streamed)]
    assert abs(nll[0] - nll[1]) < 0.05
    assert nll[1] < evaluate(CONFIG, layout, streamed.params, holdout)["constant_nll"] - 0.2


def test_resident_rows_predict_slice_by_slice_as_the_streamed_batches_do(fitted, monkeypatch):
    """Resident rows are predicted in slices with only a few queued at once; every post's
    prediction is its own, in order, as from the file one batch at a time."""
    path, layout, result = fitted
    trainer = importlib.import_module("e6score_dagster.model.train")
    holdout = ParquetBatches(path, layout, 256, rows="holdout")
    fwd = trainer.forward_for(CONFIG, layout)
    y0, mu0, sigma0 = trainer._predict(fwd, result.params, holdout)
    monkeypatch.setattr(trainer, "PREDICT_BATCH", 48)  # 400 posts: 9 slices, the last padded
    y, mu, sigma = predict(CONFIG, layout, result.params, holdout)
    assert len(y) == 400 and np.array_equal(y, y0)
    np.testing.assert_allclose(mu, mu0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma0, rtol=1e-5, atol=1e-6)
    assert np.std(mu) > 0.1  # posts differ: a slice read twice would show


def test_same_seed_same_params_other_seed_differs(fitted, tmp_path):
    path, layout, result = fitted
    again = train(CONFIG, layout, ParquetBatches(path, layout, CONFIG.batch_size, rows="train",
                                                 shuffle_seed=0), log=lambda _: None)
    assert serialization.to_bytes(again.params) == serialization.to_bytes(result.params)
    cfg = ModelConfig(**{**CONFIG.to_dict(), "seed": 1, "mlp_widths": CONFIG.mlp_widths})
    other = train(cfg, layout, ParquetBatches(path, layout, CONFIG.batch_size, rows="train",
                                              shuffle_seed=1), log=lambda _: None)
    assert serialization.to_bytes(other.params) != serialization.to_bytes(result.params)


def _scores(fitted_model, path, layout, batch):
    out = {}
    for s in score_batches(fitted_model, ParquetBatches(path, layout, batch, rows="all")):
        for i, *vals in zip(s["id"], s["expected_fav_count"], s["fav_score"], s["fav_zscore"],
                            strict=True):
            assert i not in out
            out[int(i)] = vals
    return out


def test_scores_cover_every_post_in_range_and_ignore_order(fitted, tmp_path):
    path, layout, result = fitted
    model = Fitted(result.params, CONFIG, layout)
    table = pq.read_table(path)
    scores = _scores(model, path, layout, 300)
    assert set(scores) == set(table.column("id").to_pylist())
    vals = np.array(list(scores.values()))
    assert np.all((vals[:, 1] >= 0) & (vals[:, 1] <= 1)) and np.all(vals[:, 0] >= 0)
    assert np.all(np.isfinite(vals))
    # The same posts in another order and row-group/batch layout get the same scores.
    shuffled = tmp_path / "shuffled.parquet"
    order = np.random.default_rng(5).permutation(table.num_rows)
    make_matrix(shuffled, order=order, row_group=333)
    again = _scores(model, shuffled, layout, 1000)
    for i, v in scores.items():
        np.testing.assert_allclose(again[i], v, rtol=1e-4, atol=1e-5)
    # fav_score tracks the residual (not exactly: it is continuity-corrected for counts).
    z = vals[:, 2]
    assert np.corrcoef(np.argsort(np.argsort(z)), np.argsort(np.argsort(vals[:, 1])))[0, 1] > 0.9


def test_params_round_trip_and_refuse_other_files(fitted, tmp_path):
    _, layout, result = fitted
    path = tmp_path / "p.msgpack"
    save_params(path, Fitted(result.params, CONFIG, layout, {"dump_date": "2026-01-01"}))
    back = load_params(path)
    assert back.config == CONFIG and back.layout == layout
    assert back.meta["dump_date"] == "2026-01-01"
    assert serialization.to_bytes(back.params) == serialization.to_bytes(result.params)
    assert not list(tmp_path.glob("*.part"))
    bogus = tmp_path / "bogus.msgpack"
    bogus.write_bytes(serialization.msgpack_serialize({"hello": 1}))
    with pytest.raises(ValueError, match="not an E6Score params file"):
        load_params(bogus)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    path = tmp_path / "nan.parquet"
    _, layout = make_matrix(path, n=600, nan_y=True)
    with pytest.raises(NonFiniteLossError, match="at step 1 "):
        train(CONFIG, layout, ParquetBatches(path, layout, 128, rows="train", shuffle_seed=0),
              log=lambda _: None)


def test_oversized_params_file_is_refused(fitted, tmp_path, monkeypatch):
    _, layout, result = fitted
    path = tmp_path / "p.msgpack"
    save_params(path, Fitted(result.params, CONFIG, layout))
    monkeypatch.setattr("e6score_dagster.model.params.MAX_PARAMS_BYTES", 1000)
    with pytest.raises(ValueError, match="over the 1000-byte limit"):
        load_params(path)


def test_predictive_metrics_against_hand_computed_values():
    from e6score_dagster.model.metrics import predictive_metrics

    y = np.log1p(np.array([0.0, 9.0, 99.0]))
    mu = np.log1p(np.array([1.0, 9.0, 9.0]))
    sigma = np.array([1.0, 0.5, 2.0])
    m = predictive_metrics(y, mu, sigma)
    z = (y - mu) / sigma
    nll = np.mean(np.log(sigma) + 0.5 * z**2 + 0.5 * np.log(2 * np.pi))
    assert m["n"] == 3
    assert m["nll"] == pytest.approx(nll)
    assert m["mae"] == pytest.approx((1 + 0 + 90) / 3)
    assert m["median_ae"] == pytest.approx(1.0)
    assert m["spearman"] == pytest.approx(0.8660254, abs=1e-6)  # ties in mu: 2 and 3 share a rank
    # |z| = 0.693, 0, 1.151: inside the 50% interval (|z| <= 0.674) only the second.
    assert m["coverage_50"] == pytest.approx(1 / 3)
    assert m["coverage_80"] == pytest.approx(3 / 3)  # 1.2816 covers all
    assert m["coverage_95"] == pytest.approx(1.0)


def test_validation_slice_is_stable_disjoint_and_never_held_out(fitted, tmp_path):
    path, layout, _ = fitted

    def ids(p, rows):
        return set(np.concatenate([
            b["id"][b["weight"] > 0]
            for b in ParquetBatches(p, layout, 256, rows=rows, validation_fraction=0.2).epoch(0)
        ]).tolist())

    train_ids, val_ids, fit_ids = ids(path, "train"), ids(path, "validation"), ids(path, "fit")
    assert not train_ids & val_ids and train_ids | val_ids == fit_ids and len(fit_ids) == 3600
    assert 0.15 < len(val_ids) / len(fit_ids) < 0.25
    assert not any(i % 10 == 0 for i in val_ids)  # held-out posts stay held out
    # Another row order (another dump) puts the same posts in the slice.
    shuffled = tmp_path / "shuffled.parquet"
    make_matrix(shuffled, order=np.random.default_rng(3).permutation(4000), row_group=700)
    assert ids(shuffled, "validation") == val_ids


def test_calibrate_scale_against_hand_computed_value():
    params = {"sigma_calibration": np.float32(0.0)}
    y, mu, sigma = np.array([1.0, 0.0]), np.array([0.0, 3.0]), np.array([1.0, 1.0])
    # z = 1 and -3: the NLL-optimal factor is sqrt(mean(z^2)) = sqrt(5).
    assert calibrate_scale(params, y, mu, sigma) == pytest.approx(np.sqrt(5))
    assert float(params["sigma_calibration"]) == pytest.approx(np.log(np.sqrt(5)), rel=1e-6)


def _validation_nll(cfg, layout, params, data):
    y, mu, sigma = predict(cfg, layout, params, data)
    return predictive_metrics(y, mu, sigma)["nll"], mu, sigma


def test_warm_start_predicts_exactly_the_additive_fit_and_training_only_improves(tmp_path):
    path = tmp_path / "m.parquet"
    _, layout = make_matrix(path, n=3000, seed=4)
    cfg = ModelConfig(**{**CONFIG.to_dict(), "mlp_widths": CONFIG.mlp_widths, "epochs": 3,
                         "baseline_min_steps": 60, "validation_fraction": 0.2})
    split = {"validation_fraction": 0.2}
    data = ParquetBatches(path, layout, cfg.batch_size, rows="train", shuffle_seed=0, **split)
    val = ParquetBatches(path, layout, 512, rows="validation", **split)
    acfg = baseline_config(cfg, "additive")
    additive = train(acfg, layout, data, log=lambda _: None, validation=val)
    add_nll, add_mu, add_sigma = _validation_nll(acfg, layout, additive.params, val)
    start = warm_start(init_params(cfg, layout), additive.params)
    _, mu0, sigma0 = _validation_nll(cfg, layout, start, val)
    np.testing.assert_allclose(mu0, add_mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma0, add_sigma, rtol=1e-4)
    # The whole fit: its first validation score is the additive stage's (the same fit, as
    # training is deterministic), the kept params are the best scored, and calibration only
    # lowers that.
    fits = fit_with_baseline(cfg, layout, data, val, log=lambda _: None)
    model, linear = fits.model, fits.linear
    assert model.validation[0] == {"step": 0, "nll": pytest.approx(add_nll, abs=1e-5)}
    best = min(v["nll"] for v in model.validation)
    assert model.best_step == min(model.validation, key=lambda v: v["nll"])["step"]
    assert _validation_nll(cfg, layout, model.params, val)[0] <= best + 1e-5 <= add_nll + 1e-5
    # The deep part learnt (it moved), the frozen additive terms did not.
    assert model.best_step > 0
    np.testing.assert_array_equal(model.params["tags"]["bias"], fits.additive.params["tag_weight"])
    np.testing.assert_array_equal(model.params["wide"]["kernel"],
                                  fits.additive.params["linear"]["kernel"])
    # The baseline is a plain additive fit: no shrinkage parameters.
    assert "shrink" not in linear.params and "shrink" in fits.additive.params
    assert serialization.to_bytes(fits.additive.params) == serialization.to_bytes(
        additive.params
    )


def test_early_stopping_stops_when_validation_stops_improving(tmp_path):
    path = tmp_path / "m.parquet"
    _, layout = make_matrix(path, n=1500, seed=5)
    # A learning rate this high makes validation NLL bounce; patience 1 must stop the run.
    cfg = ModelConfig(**{**CONFIG.to_dict(), "mlp_widths": CONFIG.mlp_widths, "epochs": 40,
                         "learning_rate": 0.3, "validation_fraction": 0.2, "patience": 1})
    split = {"validation_fraction": 0.2}
    data = ParquetBatches(path, layout, cfg.batch_size, rows="train", shuffle_seed=0, **split)
    val = ParquetBatches(path, layout, 512, rows="validation", **split)
    result = train(cfg, layout, data, log=lambda _: None, validation=val)
    assert result.steps < 40 * data.steps()
    nlls = [v["nll"] for v in result.validation]
    assert nlls[-1] >= min(nlls[:-1])  # stopped right after a scoring that did not improve


def test_params_from_before_the_scale_correction_still_load_and_score(tmp_path, fitted):
    """A params file written before the models had a `scale` kernel, a link or tag
    interactions scores as it did then: one scale for every post, a plain additive mean."""
    path, layout, result = fitted
    old = {k: v for k, v in result.params.items() if k not in ("scale", "link", "interactions")}
    save_params(tmp_path / "old.msgpack", Fitted(old, CONFIG, layout))
    loaded = load_params(tmp_path / "old.msgpack")
    for part, key in (("scale", "kernel"), ("link", "kernel"), ("interactions", "weight")):
        assert not np.asarray(loaded.params[part][key]).any(), part
    held = ParquetBatches(path, layout, 256, rows="holdout")
    _, mu, sigma = predict(CONFIG, layout, loaded.params, held)
    assert np.isfinite(mu).all() and np.isfinite(sigma).all()


def test_params_from_before_the_spread_score_as_they_did(tmp_path, fitted):
    """A params file written before the scale could widen with each post's spread (a scale
    kernel without its last SPREAD_FEATURES rows, no tag variances) loads with those at 0
    and predicts exactly what the same params predict with the spread's coefficients at 0."""
    path, layout, result = fitted
    kernel = np.asarray(result.params["scale"]["kernel"])
    old = dict(result.params)  # the deep model's: its tag variances sit under "tags"
    old["tags"] = {k: v for k, v in old["tags"].items() if k != "variance"}
    old["scale"] = {"kernel": kernel[:-SPREAD_FEATURES]}
    save_params(tmp_path / "old.msgpack", Fitted(old, CONFIG, layout))
    loaded = load_params(tmp_path / "old.msgpack")
    assert not np.asarray(loaded.params["tags"]["variance"]).any()
    assert not np.asarray(loaded.params["scale"]["kernel"])[-SPREAD_FEATURES:].any()
    same = {**result.params, "scale": {"kernel": kernel.copy()}}
    same["scale"]["kernel"][-SPREAD_FEATURES:] = 0.0
    held = ParquetBatches(path, layout, 256, rows="holdout")
    _, mu, sigma = predict(CONFIG, layout, loaded.params, held)
    _, mu0, sigma0 = predict(CONFIG, layout, same, held)
    np.testing.assert_allclose(mu, mu0, rtol=1e-6)
    np.testing.assert_allclose(sigma, sigma0, rtol=1e-6)


def test_fav_score_averages_one_half_where_most_posts_have_no_favourites():
    """Counts drawn from the model itself (the Gaussian over log1p, read off by the
    continuity correction): the mid-distribution score averages 0.5 at every level of
    expected favourites, where P(count <= observed) alone would sit far above it."""
    from e6score_dagster.model.score import mid_distribution

    rng = np.random.default_rng(0)
    for mu in (0.1, 0.7, 4.0):
        y = rng.normal(mu, 0.6, 200_000)
        fav = np.maximum(np.floor(np.expm1(y) + 0.5), 0.0).astype(np.float32)
        score = np.asarray(mid_distribution(fav, np.float32(mu), np.float32(0.6)))
        assert abs(score.mean() - 0.5) < 0.005, mu
        at_most = norm.cdf((np.log(fav + 1.5) - mu) / 0.6)
        if mu < 1:
            assert at_most.mean() > 0.55  # what the old score did on such posts


def test_shrinkage_reads_the_same_linear_function_as_a_dense_layer_on_the_traits():
    """The shrinkage factor's gather is `nn.Dense(1)` on the tag traits (one-hot category,
    log rank and its square) with the same params, so params fitted before it still mean
    what they meant."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from e6score_dagster.model.network import CATEGORY_CODES, Shrinkage

    rng = np.random.default_rng(0)
    tags = jnp.asarray(rng.integers(0, 50_000 * CATEGORY_CODES, (64, 12)), jnp.int32)
    kernel = rng.normal(0, 1, (CATEGORY_CODES + 2, 1)).astype(np.float32)
    params = {"params": {"factor": {"kernel": kernel, "bias": np.float32([0.3])}}}
    rank = jnp.log1p((tags // CATEGORY_CODES).astype(jnp.float32)) / 10.0
    traits = jnp.concatenate(
        [jax.nn.one_hot(tags % CATEGORY_CODES, CATEGORY_CODES), rank[..., None],
         jnp.square(rank)[..., None]], axis=-1)
    dense = nn.Dense(1).apply({"params": params["params"]["factor"]}, traits)[..., 0]
    got = Shrinkage().apply(params, tags)
    np.testing.assert_allclose(got, 2.0 * jax.nn.sigmoid(dense), rtol=1e-5, atol=1e-6)
    assert float(jnp.std(got)) > 0.05  # the factor really varies with the traits
