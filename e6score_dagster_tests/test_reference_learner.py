"""The learner told the priors (`synthetic.reference`): its design holds every hidden effect of
every world, and it lands between knowing nothing of the effects and knowing them all."""

from __future__ import annotations

import numpy as np
import pytest

from e6score_dagster.synthetic import WORLDS, Oracle, get_world, iter_chunks, process, reference

DATE = "2026-11-20"


def _holdout(ids: np.ndarray) -> np.ndarray:
    return (ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32) < 0.1 * 2**32


def _true_effects(p: reference.Posts, world_name: str, posts: int) -> np.ndarray:
    """Each design column's hidden value, read from the generator's own tables."""
    world = get_world(world_name)
    vocab, _ = iter_chunks(posts, DATE, seed=2, world=world)
    t = vocab.names.size
    e = p.entity
    out = np.zeros(e.size)
    main = e < t
    out[main] = vocab.effect[e[main]]
    by_rating = (e >= t) & (e < 4 * t)
    if by_rating.any():
        out[by_rating] = vocab.rating_effect[(e[by_rating] - t) // 3, (e[by_rating] - t) % 3]
    trend = (e >= 4 * t) & (e < 5 * t)
    if trend.any():
        out[trend] = vocab.trend[e[trend] - 4 * t]
    uploader = e >= 5 * t
    if uploader.any():
        out[uploader] = process.uploader_effects(2, world)[e[uploader] - 5 * t]
    return out


@pytest.mark.parametrize("world", list(WORLDS))
def test_design_with_the_true_effects_is_the_oracle(world: str) -> None:
    """The known part plus the design times the true effects is the oracle's log-mean: no
    hidden effect is missing from the learner's design or sits in a wrong column."""
    posts = 3000
    vocab, chunks = iter_chunks(posts, DATE, seed=2, world=world)
    p = reference.collect(chunks, vocab, get_world(world))
    m = p.known + p.x @ _true_effects(p, world, posts)
    mean, sd = Oracle(get_world(world)).moments(m, p.group, p.deleted)
    np.testing.assert_allclose(mean, p.oracle[:, 0], atol=1e-9)
    np.testing.assert_allclose(sd, p.oracle[:, 1], atol=1e-9)
    assert np.all(p.scale > 0)


@pytest.mark.parametrize("world", ["classic", "uploaders"])
def test_learner_lies_between_no_effects_and_the_oracle(world: str) -> None:
    """On held-out posts the learner beats the same predictive without effects (it learns
    from the training posts) and does not beat the oracle by more than noise."""
    w = get_world(world)
    posts = 20_000
    vocab, chunks = iter_chunks(posts, DATE, seed=2, world=w)
    p = reference.collect(chunks, vocab, w)
    oracle = Oracle(w)
    live = ~p.deleted
    held = np.flatnonzero(live & _holdout(p.ids))
    fit = reference.fit(p, oracle, np.flatnonzero(live & ~_holdout(p.ids)), w)
    mean, sd, score = reference.predictive(p, oracle, fit, held)
    prior_only = reference.Fit(np.zeros_like(fit.theta), p.scale**2 * reference.unit_variance(w))
    mean0, sd0, _ = reference.predictive(p, oracle, prior_only, held)
    y = p.y[held]
    nll, nll0 = reference.gaussian_nll(y, mean, sd), reference.gaussian_nll(y, mean0, sd0)
    oracle_nll = reference.gaussian_nll(y, p.oracle[held, 0], p.oracle[held, 1])
    assert oracle_nll - 0.01 < nll < nll0 - 0.01
    assert np.all((score >= 0) & (score <= 1))
    assert float(np.corrcoef(score, p.quality[held])[0, 1]) > 0.3
