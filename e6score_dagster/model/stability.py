"""How much fav_score moves between two dumps for the posts present in both."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def rank_stability(
    ids_a: np.ndarray, scores_a: np.ndarray, ids_b: np.ndarray, scores_b: np.ndarray
) -> dict[str, float]:
    """Spearman rank correlation of the scores of the posts present in both dumps, and the
    mean absolute change of their score (both 1 and 0 for identical scores)."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    common, ia, ib = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
    a = np.asarray(scores_a, np.float64)[ia]
    b = np.asarray(scores_b, np.float64)[ib]
    if common.size < 2:
        return {"common_posts": int(common.size), "spearman": float("nan"), "mean_abs_change": 0.0}
    return {
        "common_posts": int(common.size),
        "spearman": float(spearmanr(a, b).statistic),
        "mean_abs_change": float(np.mean(np.abs(a - b))),
    }
