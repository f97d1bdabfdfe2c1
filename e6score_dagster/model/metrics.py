"""Held-out metrics of a Gaussian predictive distribution over log1p(fav_count)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm, spearmanr

COVERAGE_LEVELS = (0.5, 0.8, 0.95)


def predictive_metrics(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> dict[str, float]:
    """NLL in log1p space; errors of the median count; rank correlation; interval coverage.

    The expected count is the predictive median expm1(mu), the same number scored_posts reports.
    Coverage is the share of posts whose log1p count falls in the central 50/80/95% interval:
    a calibrated model gets close to the nominal level.
    """
    y, mu, sigma = (np.asarray(a, np.float64) for a in (y, mu, sigma))
    z = (y - mu) / sigma
    nll = np.log(sigma) + 0.5 * z * z + 0.5 * math.log(2 * math.pi)
    err = np.abs(np.expm1(mu) - np.expm1(y))
    out = {
        "n": int(y.size),
        "nll": float(nll.mean()),
        "mae": float(err.mean()),
        "median_ae": float(np.median(err)),
        "spearman": float(spearmanr(mu, y).statistic) if np.ptp(mu) > 0 else 0.0,
    }
    for level in COVERAGE_LEVELS:
        half = norm.ppf(0.5 + level / 2)
        out[f"coverage_{int(level * 100)}"] = float(np.mean(np.abs(z) <= half))
    return out
