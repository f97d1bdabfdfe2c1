"""Batched scoring: where each post's favourites fall in its metadata-only prediction."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from e6score_dagster.model.data import ParquetBatches
from e6score_dagster.model.params import Fitted
from e6score_dagster.model.train import make_model, model_inputs


def score_batches(fitted: Fitted, data: ParquetBatches) -> Iterator[dict[str, np.ndarray]]:
    """Yields id, mu, sigma, expected_fav_count, fav_score, fav_zscore for every real row.

    expected_fav_count is the predictive median, expm1(mu): the mean of a heavy-tailed
    log-normal is dominated by its tail and would rank nothing usefully.
    fav_score is P(count <= observed), i.e. the CDF at log1p(observed + 0.5), a continuity
    correction for the count being an integer.
    """
    model = make_model(fitted.config, fitted.layout)

    @jax.jit
    def predict(params, batch, fav):
        mu, sigma = model.apply({"params": params}, batch)
        return (
            mu,
            sigma,
            jnp.expm1(mu),
            norm.cdf((jnp.log(fav + 1.5) - mu) / sigma),
            (jnp.log1p(fav) - mu) / sigma,
        )

    params = jax.device_put(fitted.params)
    for batch in data.epoch(0):
        real = batch["weight"] > 0
        out = predict(params, model_inputs(batch), batch["fav_count"].astype(np.float32))
        mu, sigma, expected, cdf, z = (np.asarray(o)[real] for o in out)
        yield {
            "id": batch["id"][real],
            "mu": mu,
            "sigma": sigma,
            "expected_fav_count": np.maximum(expected, 0.0),
            "fav_score": np.clip(cdf, 0.0, 1.0),
            "fav_zscore": z,
        }
