"""A realistic, seeded e621-style dump generator for tests, the bundled sample and benchmarks.

The real export is several GB and cannot ship with the repo, yet every stage (ingest, cleaning,
vocabulary, model, scoring) must face its quirks: quoted multi-line Unicode descriptions, `t`/`f`
booleans, microsecond timestamps, empty tag strings, unused tags, a growing audience and posts too
young to have collected their favourites. This package reproduces those quirks and plants a known
signal (a hidden per-post ``quality``) so benchmarks can measure how much of it a score recovers.

It makes a *family* of worlds (``worlds.py``): one generative process whose structure differs
per world, so defaults tuned on one world can be checked on others. ``classic`` is the default
(the bundled sample); ``HELD_BACK_WORLD`` (``drift``) is never tuned on.

Generative process for ``fav_count`` (``process.py``; every term's shape is a world knob)::

    log_mu = base_log_fav
           + audience(years_since_upload_start)    # exponential, logistic or piecewise
           + rating_effect[rating] + ext_effect[file_ext]
           + sum over the post's tags of
                 effect[tag]                       # normal / Student-t / Laplace, scale by
                                                   # category (artists lead in classic)
               + rating_effect[tag, rating]        # tag x rating interaction (some worlds)
               + trend[tag] * (years - 10) / 10    # tag x year drift (some worlds)
           + uploader_effect[uploader_id]          # some worlds; uploader_id is visible
           + deleted_effect * is_deleted
           + quality_effect[g] * quality           # quality ~ N(0, 1), hidden
           + recency(age_days)                     # log share of final favourites so far
    fav_count ~ Poisson(exp(log_mu) * Gamma(k[g], 1 / k[g]))

where g is the noise group (rating x animated): heteroscedastic worlds vary the quality effect
and the count dispersion k by it. Deletion is likelier for low quality:
P(deleted | quality) = rate * exp(-a * quality - a^2 / 2). Everything but ``quality`` and the
gamma noise is visible in the metadata. up_score, down_score, score and comment_count are drawn
*from* fav_count: outcomes, not inputs.

``truth-DATE.parquet`` holds per post id: ``quality``, ``expected_log_fav`` (= log_mu), and the
Bayes-optimal prediction given the metadata (``oracle.py``): ``oracle_mean`` and ``oracle_sd``
of log1p(fav_count), exact up to a 0.01-step grid, and ``oracle_score``, the predictive
P(fav_count <= observed), the oracle's own fav_score.
"""

from e6score_dagster.synthetic.cli import main
from e6score_dagster.synthetic.generate import (
    CHUNK_ROWS,
    MAX_TAGS,
    TRUTH_SCHEMA,
    Chunk,
    default_n_tags,
    generate_dump,
    iter_chunks,
)
from e6score_dagster.synthetic.names import TextPools, build_text_pools
from e6score_dagster.synthetic.oracle import Oracle
from e6score_dagster.synthetic.tags import Vocabulary, build_vocabulary
from e6score_dagster.synthetic.worlds import (
    DEFAULT_WORLD,
    HELD_BACK_WORLD,
    TUNING_WORLDS,
    WORLDS,
    World,
    get_world,
)

__all__ = [
    "CHUNK_ROWS",
    "DEFAULT_WORLD",
    "HELD_BACK_WORLD",
    "MAX_TAGS",
    "TRUTH_SCHEMA",
    "TUNING_WORLDS",
    "WORLDS",
    "Chunk",
    "Oracle",
    "TextPools",
    "Vocabulary",
    "World",
    "build_text_pools",
    "build_vocabulary",
    "default_n_tags",
    "generate_dump",
    "get_world",
    "iter_chunks",
    "main",
]
