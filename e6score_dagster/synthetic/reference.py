"""A learner told the world's priors but none of its hidden effects: what the posts allow.

The oracle knows every tag's, interaction's and uploader's effect. No learner can: in these
worlds, as on e621, most tags and uploaders have a handful of posts. This learner is told
everything else the oracle uses (audience, recency, rating, file type and deletion effects, the
count noise: `generate.Hidden.known` and the oracle's tables) and the variance of the
distribution each hidden effect was drawn from, and infers the effects from the training posts'
favourites: Gauss-Newton on the exact predictive moments (weighted by the exact predictive
variance) under that Gaussian prior. Its predictive distribution carries the effects'
posterior uncertainty (diagonal). In the heavy-tailed worlds, EM rounds of the Student-t
scale mixture the prior really is were tried on top: heavy_tails at 100k 9.25-9.38% from the
oracle against 9.12% without, so the learner keeps the Gaussian prior with the true variance.

So its gap to the oracle is what the data leave open to a learner that knows the world's
structure exactly, and the pipeline's gap to it is what the pipeline leaves on the table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import stats
from scipy.integrate import quad
from scipy.sparse.linalg import LinearOperator, cg

from e6score_dagster.synthetic.generate import Chunk, iter_chunks
from e6score_dagster.synthetic.oracle import Oracle
from e6score_dagster.synthetic.process import TREND_CENTRE_YEARS, UPLOADER_TABLE
from e6score_dagster.synthetic.tags import Vocabulary
from e6score_dagster.synthetic.worlds import World

# At 100k posts, 6 rounds instead of 4 move a gap by at most 6e-5 points (heavy_tails).
GAUSS_NEWTON_ROUNDS = 4
SLOPE_STEP = 0.01  # finite difference of the predictive mean in the log-mean
PREDICTIVE_NODES = 16  # Gauss-Hermite nodes over the effects' posterior
CLIP = 8.0  # `process.draw_effects` clips at this many scales
ORACLE_COLUMNS = ("oracle_mean", "oracle_sd", "oracle_score")


@dataclass
class Posts:
    """Every post's outcome, known log-mean part and hidden-entity design."""

    ids: np.ndarray
    count: np.ndarray
    quality: np.ndarray
    known: np.ndarray
    group: np.ndarray
    deleted: np.ndarray
    oracle: np.ndarray  # (posts, 3): the truth file's oracle mean, sd and score
    x: sp.csr_matrix  # posts x hidden entities (tags, tag x rating, tag trends, uploaders)
    scale: np.ndarray  # per column: the scale of the distribution its effect was drawn from
    entity: np.ndarray  # per column: tag rank r (< T), T + 3 r + rating, 4 T + r (trend) or
    # 5 T + uploader_id % UPLOADER_TABLE, with T the vocabulary's size

    @property
    def y(self) -> np.ndarray:
        return np.log1p(self.count)


def unit_variance(world: World) -> float:
    """Variance of a hidden effect of scale 1 as `process.draw_effects` draws it."""
    if world.effect_dist == "normal":
        return 1.0
    if world.effect_dist == "laplace":
        dist = stats.laplace(scale=1.0 / np.sqrt(2.0))
    else:
        dist = stats.t(world.effect_df)
    inside = quad(lambda v: v * v * dist.pdf(v), -CLIP, CLIP, limit=200)[0]
    return inside + 2.0 * CLIP * CLIP * dist.sf(CLIP)


def collect(chunks: Iterable[Chunk], vocab: Vocabulary, world: World) -> Posts:
    """The posts of a generated dump (`iter_chunks`), with one design column per entity."""
    n_tags = vocab.names.size
    cat = vocab.category
    main_scale = np.array([world.effect_sd[c] for c in cat])
    by_rating = np.array([world.rating_interaction_sd.get(c, 0.0) for c in cat])
    trend = np.array([world.trend_sd.get(c, 0.0) for c in cat])
    rows, cols, vals, fields = [], [], [], []
    offset = 0
    for chunk in chunks:
        h, truth = chunk.hidden, chunk.truth
        r, t = h.tag_rows + offset, h.tag_ranks
        rows.append(r), cols.append(t), vals.append(np.ones(t.size))
        if vocab.rating_effect is not None:
            on = by_rating[t] > 0
            rows.append(r[on]), cols.append(n_tags + 3 * t[on] + h.rating[h.tag_rows[on]])
            vals.append(np.ones(int(on.sum())))
        if vocab.trend is not None:
            on = trend[t] > 0
            rows.append(r[on]), cols.append(4 * n_tags + t[on])
            vals.append((h.years[h.tag_rows[on]] - TREND_CENTRE_YEARS) / 10.0)
        if world.uploader_effect_sd:
            n = h.known.size
            rows.append(offset + np.arange(n))
            cols.append(5 * n_tags + h.uploader % UPLOADER_TABLE), vals.append(np.ones(n))
        fields.append((
            truth.column("id").to_numpy(),
            np.asarray(chunk.posts["fav_count"], dtype=np.int64),
            truth.column("quality").to_numpy(),
            h.known, h.group, h.deleted,
            np.column_stack([truth.column(c).to_numpy() for c in ORACLE_COLUMNS]),
        ))
        offset += h.known.size
    col = np.concatenate(cols)
    used, col = np.unique(col, return_inverse=True)
    scale = np.select(
        [used < n_tags, used < 4 * n_tags, used < 5 * n_tags],
        [main_scale[np.minimum(used, n_tags - 1)],
         by_rating[np.clip((used - n_tags) // 3, 0, n_tags - 1)],
         trend[np.clip(used - 4 * n_tags, 0, n_tags - 1)]],
        world.uploader_effect_sd,
    )
    x = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), col)), shape=(offset, used.size)
    )
    ids, count, quality, known, group, deleted, oracle = (
        np.concatenate(f) for f in zip(*fields, strict=True)
    )
    return Posts(ids, count, quality, known, group, deleted, oracle, x, scale, used)


@dataclass
class Fit:
    theta: np.ndarray  # posterior mode of the hidden effects
    variance: np.ndarray  # their posterior variances (diagonal)


def _moments(oracle: Oracle, m: np.ndarray, g: np.ndarray, d: np.ndarray):
    mean, sd = oracle.moments(m, g, d)
    up, _ = oracle.moments(m + SLOPE_STEP, g, d)
    down, _ = oracle.moments(m - SLOPE_STEP, g, d)
    return mean, sd, (up - down) / (2 * SLOPE_STEP)


def fit(p: Posts, oracle: Oracle, train: np.ndarray, world: World) -> Fit:
    """Posterior mode and variances of the hidden effects from the training posts."""
    x = p.x[train]
    xt = x.T.tocsr()
    x2t = x.multiply(x).T.tocsr()
    k, y, g, d = p.known[train], p.y[train], p.group[train], p.deleted[train]
    prec = 1.0 / (p.scale**2 * unit_variance(world))
    theta = np.zeros(x.shape[1])
    for _ in range(GAUSS_NEWTON_ROUNDS):
        mean, sd, slope = _moments(oracle, k + x @ theta, g, d)
        w = slope**2 / sd**2
        diag = x2t @ w + prec
        rhs = xt @ (slope * (y - mean) / sd**2) - prec * theta
        a = LinearOperator(
            (theta.size, theta.size), matvec=lambda v, w=w: xt @ (w * (x @ v)) + prec * v
        )
        step, _ = cg(a, rhs, M=sp.diags(1.0 / diag), rtol=1e-5, maxiter=500)
        theta = theta + step
    return Fit(theta, 1.0 / diag)


def predictive(p: Posts, oracle: Oracle, f: Fit, rows: np.ndarray):
    """Predictive mean and sd of log1p(favs) and the score P(N <= n), integrating the effects'
    posterior (Gauss-Hermite over each post's log-mean)."""
    x = p.x[rows]
    centre = p.known[rows] + x @ f.theta
    spread = np.sqrt(x.multiply(x) @ f.variance)
    g, d, n = p.group[rows], p.deleted[rows], p.count[rows]
    nodes, weights = np.polynomial.hermite_e.hermegauss(PREDICTIVE_NODES)
    weights = weights / weights.sum()
    first = second = score = 0.0
    for z, w in zip(nodes, weights, strict=True):
        m = centre + z * spread
        mean, sd = oracle.moments(m, g, d)
        first = first + w * mean
        second = second + w * (mean**2 + sd**2)
        score = score + w * oracle.cdf(n, m, g, d)
    return first, np.sqrt(np.maximum(second - first**2, 1e-12)), score


def gaussian_nll(y: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> float:
    """Mean Gaussian NLL of log1p(favs): how the worlds judge every predictive."""
    z = (y - mean) / sd
    return float(np.mean(np.log(sd) + 0.5 * z * z + 0.5 * np.log(2 * np.pi)))


def posts_of(world: World, posts: int, date: str, seed: int, n_tags: int | None = None) -> Posts:
    """A generated dump's posts (`iter_chunks` with these arguments), collected. The hidden
    design is not in the dump's files, so a dump on disk is generated again for it."""
    vocab, chunks = iter_chunks(posts, date, seed, n_tags=n_tags, world=world)
    return collect(chunks, vocab, world)


def evaluate(p: Posts, world: World, holdout: Callable[[np.ndarray], np.ndarray]) -> dict:
    """The learner fitted on the live training posts and judged on the live hold-out posts
    (`holdout(ids)`) beside the oracle: held-out NLL, and the Spearman of each one's score
    with the hidden quality over the same posts."""
    t0 = time.perf_counter()
    live = ~p.deleted
    held = live & holdout(p.ids)
    oracle = Oracle(world)
    f = fit(p, oracle, np.flatnonzero(live & ~held), world)
    rows = np.flatnonzero(held)
    mean, sd, score = predictive(p, oracle, f, rows)
    y, quality, truth = p.y[rows], p.quality[rows], p.oracle[rows]
    oracle_nll = gaussian_nll(y, truth[:, 0], truth[:, 1])
    nll = gaussian_nll(y, mean, sd)
    sp_oracle = float(stats.spearmanr(truth[:, 2], quality).statistic)
    return {
        "reference_nll": nll,
        "reference_gap_pct": 100.0 * (nll - oracle_nll) / abs(oracle_nll),
        "reference_spearman_ratio": float(stats.spearmanr(score, quality).statistic) / sp_oracle,
        "holdout_spearman_oracle": sp_oracle,
        "reference_effects": int(p.x.shape[1]),
        "reference_seconds": round(time.perf_counter() - t0, 1),
    }
