"""The hidden generative process of fav_count, parameterised by a World.

Split in what is visible (a function of metadata: the oracle may use it) and what is not (the
per-post quality and the count noise). For ``classic`` the arithmetic is kept in the original
order, so its dumps are byte-identical to the single-world generator's.
"""

from __future__ import annotations

import numpy as np

from e6score_dagster.schema import RATINGS
from e6score_dagster.synthetic.worlds import ANIMATED_EXTS, EXTS, World

N_GROUPS = 2 * len(RATINGS)  # noise group = 2 * rating index + animated
UPLOADER_TABLE = 1 << 21  # per-uploader effects, indexed by uploader_id modulo this
TREND_CENTRE_YEARS = 10.0


def audience(world: World, years: np.ndarray) -> np.ndarray:
    """Log audience size relative to launch, by upload time in years since launch."""
    p = world.audience_params
    if world.audience == "exponential":
        return p[0] * years
    if world.audience == "logistic":
        rise, mid, width = p

        def sig(t: np.ndarray | float) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-(np.asarray(t) - mid) / width))

        return rise * (sig(years) - sig(0.0)) / (1.0 - sig(0.0))
    # piecewise linear: slope0, break1, slope1, break2, slope2, ...
    slopes, breaks = p[0::2], (0.0, *p[1::2])
    out = np.zeros_like(years, dtype=np.float64)
    for i, slope in enumerate(slopes):
        hi = breaks[i + 1] if i + 1 < len(breaks) else np.inf
        out += slope * np.clip(years - breaks[i], 0.0, hi - breaks[i])
    return out


def recency(world: World, age_days: np.ndarray) -> np.ndarray:
    """Log share of its eventual favourites a post of this age has collected."""
    age = np.maximum(age_days, 1e-4)
    t = world.recency_days
    if world.recency == "exponential":
        return np.log(-np.expm1(-age / t))
    if world.recency == "hyperbolic":
        return np.log(age / (age + t))
    return np.log(-np.expm1(-((age / t) ** world.recency_shape)))


def draw_effects(rng: np.random.Generator, world: World, scale: float, n: int) -> np.ndarray:
    """n hidden effects of the world's distribution with this scale (clipped at 8 scales)."""
    if world.effect_dist == "normal":
        return rng.normal(0.0, scale, n)
    if world.effect_dist == "laplace":
        return np.clip(rng.laplace(0.0, scale / np.sqrt(2.0), n), -8 * scale, 8 * scale)
    return np.clip(scale * rng.standard_t(world.effect_df, n), -8 * scale, 8 * scale)


def uploader_effects(seed: int, world: World) -> np.ndarray:
    """Hidden effect per uploader_id (modulo UPLOADER_TABLE); all zero without the feature."""
    if world.uploader_effect_sd == 0.0:
        return np.zeros(1)
    rng = np.random.default_rng([seed, 4])
    return draw_effects(rng, world, world.uploader_effect_sd, UPLOADER_TABLE)


def uploader_ids(rng: np.random.Generator, world: World, u: np.ndarray) -> np.ndarray:
    """A share from a Zipf-distributed set of regulars; the rest mostly one-off, growing."""
    n = u.size
    return np.where(
        rng.random(n) < world.heavy_uploader_share,
        1 + np.minimum(rng.zipf(1.3, n), world.heavy_uploaders) * 37,
        1 + (50 + 1.6e6 * u * rng.random(n)).astype(np.int64),
    )


def rating_index(rating: np.ndarray) -> np.ndarray:
    return np.select([rating == r for r in RATINGS], list(range(len(RATINGS))))


def noise_group(rating: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """Heteroscedastic worlds scale quality and noise by rating and animation."""
    return 2 * rating_index(rating) + np.isin(ext, ANIMATED_EXTS)


def group_quality_effect(world: World) -> np.ndarray:
    """Quality effect per noise group."""
    return np.array(
        [world.quality_effect * world.quality_by_rating[g // 2] for g in range(N_GROUPS)]
    )


def group_dispersion(world: World) -> np.ndarray:
    """Gamma shape of the count noise per noise group (smaller = noisier)."""
    return np.array(
        [
            world.dispersion
            * world.dispersion_by_rating[g // 2]
            * (world.dispersion_animated if g % 2 else 1.0)
            for g in range(N_GROUPS)
        ]
    )


def deletion_probability(world: World, quality: np.ndarray) -> np.ndarray:
    """Lower quality, likelier deleted; the mean over quality is ``deletion_rate``."""
    a = world.deletion_quality_slope
    return np.minimum(world.deletion_rate * np.exp(-a * quality - 0.5 * a * a), 1.0)


def visible_log_mu(
    world: World,
    *,
    years: np.ndarray,
    rating: np.ndarray,
    ext: np.ndarray,
    tag_effect: np.ndarray,
    deleted: np.ndarray,
) -> np.ndarray:
    """The metadata part of the log-mean, without recency (kept apart for classic's order)."""
    rating_eff = np.select(
        [rating == r for r in RATINGS], [world.rating_effect[r] for r in RATINGS]
    )
    ext_eff = np.select([ext == e for e in EXTS], [world.ext_effect[e] for e in EXTS])
    return (
        world.base_log_fav
        + audience(world, years)
        + rating_eff
        + ext_eff
        + tag_effect
        + world.deleted_effect * deleted
    )


def log_mu(
    world: World, visible: np.ndarray, quality: np.ndarray, group: np.ndarray, rec: np.ndarray
) -> np.ndarray:
    """The noiseless log-mean of fav_count: visible part + quality + recency."""
    return visible + group_quality_effect(world)[group] * quality + rec


def draw_fav_count(
    rng: np.random.Generator, world: World, mu_log: np.ndarray, group: np.ndarray
) -> np.ndarray:
    """Negative binomial around exp(mu_log): Poisson with gamma-distributed rate."""
    n = mu_log.size
    k: float | np.ndarray = world.dispersion
    if world.heteroscedastic:
        k = group_dispersion(world)[group]
    return rng.poisson(np.exp(mu_log) * rng.gamma(k, 1.0 / k, n))
