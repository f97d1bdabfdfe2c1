"""The family of synthetic worlds: one generative process, structurally different parameter sets.

A model tuned on one world learns that world's accidents (which categories carry signal, how
fast posts mature, whether uploaders matter). Every world below shares the process documented
in ``e6score_dagster.synthetic`` and differs in *structure*: the size and tail of tag effects per
category, interactions (tag x rating, tag x year), per-uploader effects, heteroscedastic noise,
the shape of audience growth and of recency, and how many tags there are per post.

``HELD_BACK_WORLD`` was chosen before any model was tuned: never tune defaults on it; report it
apart. ``classic`` is the original single world (the bundled sample and older benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

EffectDist = Literal["normal", "student_t", "laplace"]
AudienceShape = Literal["exponential", "logistic", "piecewise"]
RecencyShape = Literal["exponential", "hyperbolic", "stretched"]

# tag categories: 0 general, 1 artist, 3 copyright, 4 character, 5 species, 7 meta, 8 lore
CLASSIC_EFFECT_SD = {0: 0.08, 1: 0.7, 3: 0.25, 4: 0.3, 5: 0.15, 7: 0.08, 8: 0.15}
CLASSIC_RATING_EFFECT = {"s": 0.0, "q": 0.3, "e": 0.55}
EXTS = ("jpg", "png", "gif", "webm", "mp4", "swf", "webp")
ANIMATED_EXTS = ("gif", "webm", "mp4", "swf")
CLASSIC_EXT_EFFECT = dict(zip(EXTS, (0.0, 0.05, 0.1, 0.3, 0.3, -0.2, 0.0), strict=True))


@dataclass(frozen=True)
class World:
    """Every knob of the hidden process. Defaults are the ``classic`` world."""

    name: str
    summary: str
    # -- tags: hidden effect per tag, scale by category, drawn from effect_dist
    effect_sd: dict[int, float] = field(default_factory=lambda: dict(CLASSIC_EFFECT_SD))
    effect_dist: EffectDist = "normal"  # student_t/laplace: scale effect_sd, heavy tails
    effect_df: float = 3.0  # degrees of freedom of student_t
    posts_per_tag: float = 5.0  # vocabulary size = posts / posts_per_tag (within bounds)
    # -- interactions: per tag, a rating-specific extra effect and a trend over upload years
    rating_interaction_sd: dict[int, float] = field(default_factory=dict)  # tag x rating
    trend_sd: dict[int, float] = field(default_factory=dict)  # tag x year, per decade
    # -- uploaders: a share of posts comes from a Zipf-distributed set of regular uploaders
    uploader_effect_sd: float = 0.0  # hidden per-uploader effect (uploader_id is visible)
    heavy_uploader_share: float = 0.3
    heavy_uploaders: int = 2000
    # -- audience growth over upload years: exponential (params: rate), logistic (params:
    # total rise, midpoint year, width in years), piecewise linear (params: slope, break, ...)
    audience: AudienceShape = "exponential"
    audience_params: tuple[float, ...] = (0.26,)
    # -- recency: log share of its final favourites a post has at age t days
    # exponential 1-exp(-t/T), hyperbolic t/(t+T), stretched 1-exp(-(t/T)^shape)
    recency: RecencyShape = "exponential"
    recency_days: float = 7.0
    recency_shape: float = 1.0
    # -- quality and noise; heteroscedastic worlds vary both by rating and animation
    quality_effect: float = 0.7
    quality_by_rating: tuple[float, float, float] = (1.0, 1.0, 1.0)  # multiplier for s, q, e
    dispersion: float = 2.5  # gamma shape of the Poisson mixing (negative binomial)
    dispersion_by_rating: tuple[float, float, float] = (1.0, 1.0, 1.0)  # multiplier
    dispersion_animated: float = 1.0  # multiplier for gif/webm/mp4/swf
    # -- deletion: P(deleted | quality) = rate * exp(-slope * quality - slope^2 / 2)
    deletion_rate: float = 0.05
    deletion_quality_slope: float = 0.5
    deleted_effect: float = -0.7
    base_log_fav: float = float(np.log(0.5))
    rating_effect: dict[str, float] = field(default_factory=lambda: dict(CLASSIC_RATING_EFFECT))
    ext_effect: dict[str, float] = field(default_factory=lambda: dict(CLASSIC_EXT_EFFECT))

    @property
    def heteroscedastic(self) -> bool:
        return (
            len(set(self.dispersion_by_rating)) > 1
            or self.dispersion_animated != 1.0
            or len(set(self.quality_by_rating)) > 1
        )


WORLDS: dict[str, World] = {
    w.name: w
    for w in (
        World(
            name="classic",
            summary="the original world: Gaussian tag effects led by artists, exponential "
            "audience, week-scale maturity, no uploader effects or interactions",
        ),
        World(
            name="heavy_tails",
            summary="Student-t(2.5) tag effects (a few tags with huge effects), characters and "
            "copyrights matter as much as artists, saturating (logistic) audience, posts "
            "mature within days, a large vocabulary",
            effect_sd={0: 0.1, 1: 0.45, 3: 0.4, 4: 0.45, 5: 0.15, 7: 0.06, 8: 0.2},
            effect_dist="student_t",
            effect_df=2.5,
            posts_per_tag=3.0,
            audience="logistic",
            audience_params=(4.8, 8.0, 2.5),
            recency="exponential",
            recency_days=1.5,
            dispersion=2.0,
        ),
        World(
            name="uploaders",
            summary="strong per-uploader effects with most posts from regular uploaders, weak "
            "artist effects, piecewise audience growth that stalls, recency over weeks "
            "(hyperbolic), a small vocabulary",
            effect_sd={0: 0.06, 1: 0.35, 3: 0.2, 4: 0.25, 5: 0.12, 7: 0.05, 8: 0.1},
            posts_per_tag=8.0,
            uploader_effect_sd=0.6,
            heavy_uploader_share=0.65,
            heavy_uploaders=20000,
            audience="piecewise",
            audience_params=(0.45, 6.0, 0.2, 13.0, 0.03),
            recency="hyperbolic",
            recency_days=6.0,
            dispersion=3.0,
        ),
        World(
            name="interactions",
            summary="species and character effects that depend on the rating, artists whose "
            "popularity rises and falls over the years, heteroscedastic noise (explicit and "
            "animated posts noisier, quality matters more for explicit posts)",
            effect_sd={0: 0.07, 1: 0.5, 3: 0.25, 4: 0.25, 5: 0.2, 7: 0.08, 8: 0.15},
            rating_interaction_sd={0: 0.04, 4: 0.25, 5: 0.35},
            trend_sd={1: 0.6, 3: 0.2},
            audience_params=(0.3,),
            recency_days=3.0,
            quality_effect=0.75,
            quality_by_rating=(0.7, 1.0, 1.25),
            dispersion=2.5,
            dispersion_by_rating=(1.6, 1.0, 0.65),
            dispersion_animated=0.6,
        ),
        World(
            name="long_tail",
            summary="weak Laplace tag effects over a huge vocabulary (most tags rare), a weaker "
            "quality signal under heavy count noise, favourites still arriving after months "
            "(stretched-exponential recency), slower audience growth",
            effect_sd={0: 0.04, 1: 0.4, 3: 0.15, 4: 0.2, 5: 0.08, 7: 0.05, 8: 0.1},
            effect_dist="laplace",
            posts_per_tag=2.0,
            audience_params=(0.2,),
            recency="stretched",
            recency_days=25.0,
            recency_shape=0.5,
            quality_effect=0.55,
            dispersion=1.3,
            deletion_rate=0.08,
            deletion_quality_slope=0.3,
            base_log_fav=float(np.log(1.2)),
        ),
        World(
            name="drift",
            summary="HELD BACK: Laplace tag effects with strong artists that drift over the "
            "years, moderate uploader effects, species x rating interactions, logistic "
            "audience, hyperbolic recency over days, noise by rating and animation",
            effect_sd={0: 0.07, 1: 0.55, 3: 0.3, 4: 0.3, 5: 0.15, 7: 0.1, 8: 0.15},
            effect_dist="laplace",
            posts_per_tag=4.0,
            rating_interaction_sd={5: 0.2},
            trend_sd={1: 0.4},
            uploader_effect_sd=0.35,
            heavy_uploader_share=0.45,
            heavy_uploaders=8000,
            audience="logistic",
            audience_params=(5.5, 11.0, 3.0),
            recency="hyperbolic",
            recency_days=2.5,
            quality_effect=0.65,
            quality_by_rating=(1.1, 1.0, 0.85),
            dispersion=2.2,
            dispersion_by_rating=(1.3, 1.0, 0.8),
            dispersion_animated=0.7,
            deletion_rate=0.06,
            deletion_quality_slope=0.6,
        ),
    )
}
DEFAULT_WORLD = "classic"
HELD_BACK_WORLD = "drift"  # chosen in advance: never tune on it, report it apart
TUNING_WORLDS = tuple(name for name in WORLDS if name != HELD_BACK_WORLD)


def get_world(world: str | World) -> World:
    """A World by name (one clear error for an unknown name)."""
    if isinstance(world, World):
        return world
    try:
        return WORLDS[world]
    except KeyError:
        raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}") from None
