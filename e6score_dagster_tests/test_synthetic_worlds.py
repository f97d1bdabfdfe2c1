"""The family of worlds: each makes a valid dump, they differ in structure, and the truth's
oracle columns are the exact predictive distribution (checked against brute-force simulation)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kurtosis

from e6score_dagster.schema import POOLS_COLUMNS, POSTS_COLUMNS, TAGS_COLUMNS
from e6score_dagster.synthetic import (
    DEFAULT_WORLD,
    HELD_BACK_WORLD,
    TUNING_WORLDS,
    WORLDS,
    Oracle,
    build_vocabulary,
    default_n_tags,
    generate_dump,
    get_world,
    iter_chunks,
    main,
    process,
)

DATE = "2026-11-20"
POSTS = 2500


def _frame(world: str, posts: int = POSTS, seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    _, chunks = iter_chunks(posts, DATE, seed=seed, world=world)
    parts = list(chunks)
    frame = pd.concat([pd.DataFrame(c.posts) for c in parts], ignore_index=True)
    truth = pd.concat([c.truth.to_pandas() for c in parts], ignore_index=True)
    return frame, truth


def test_registry() -> None:
    assert len(WORLDS) >= 5 and DEFAULT_WORLD == "classic"
    assert HELD_BACK_WORLD in WORLDS and HELD_BACK_WORLD not in TUNING_WORLDS
    assert "HELD BACK" in WORLDS[HELD_BACK_WORLD].summary
    with pytest.raises(ValueError, match="unknown world"):
        get_world("atlantis")


@pytest.mark.parametrize("world", list(WORLDS))
def test_every_world_makes_a_valid_dump(tmp_path: Path, world: str) -> None:
    paths = generate_dump(tmp_path, 1200, DATE, seed=1, world=world)
    for kind, columns in (
        ("posts", POSTS_COLUMNS),
        ("tags", TAGS_COLUMNS),
        ("pools", POOLS_COLUMNS),
    ):
        with gzip.open(paths[kind], "rt", encoding="utf-8", newline="") as fh:
            assert fh.readline().rstrip("\n") == ",".join(columns), (world, kind)
    posts = pd.read_csv(paths["posts"], dtype=str, keep_default_na=False)
    assert len(posts) == 1200 and set(posts["is_deleted"]) <= {"t", "f"}
    assert posts["created_at"].str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}").all()
    assert posts["description"].str.contains("\n").any()
    fav = posts["fav_count"].astype(np.int64)
    assert (fav >= 0).all() and fav.median() > 3, "a plausible count scale"
    truth = pd.read_parquet(paths["truth"])
    assert (truth["id"].to_numpy() == posts["id"].astype(np.int64).to_numpy()).all()
    assert truth[["oracle_mean", "oracle_sd", "oracle_score"]].notna().all().all()
    assert (truth["oracle_sd"] > 0).all() and truth["oracle_score"].between(0, 1).all()


@pytest.mark.parametrize("world", ["classic", "uploaders"])
def test_deterministic_by_seed_and_world(tmp_path: Path, world: str) -> None:
    a = generate_dump(tmp_path / "a", 600, DATE, seed=5, world=world)
    b = generate_dump(tmp_path / "b", 600, DATE, seed=5, world=world)
    for kind in a:
        assert a[kind].read_bytes() == b[kind].read_bytes(), kind
    other = generate_dump(tmp_path / "c", 600, DATE, seed=6, world=world)
    assert other["posts"].read_bytes() != a["posts"].read_bytes()


def test_worlds_differ_in_favourites() -> None:
    classic, _ = _frame("classic")
    heavy, _ = _frame("heavy_tails")
    assert not classic["fav_count"].equals(heavy["fav_count"])


def test_tag_effect_tails_differ() -> None:
    """Artist effects: Gaussian in classic, heavy-tailed (excess kurtosis) in heavy_tails."""
    kurt = {}
    for world in ("classic", "heavy_tails", "long_tail"):
        vocab = build_vocabulary(0, 30_000, world)
        kurt[world] = kurtosis(vocab.effect[vocab.category == 1])
    assert abs(kurt["classic"]) < 0.3
    assert kurt["heavy_tails"] > 3 and kurt["long_tail"] > 1.5


def test_vocabulary_size_per_post_differs() -> None:
    assert default_n_tags(100_000, "long_tail") > 2 * default_n_tags(100_000, "classic")
    assert default_n_tags(100_000, "uploaders") < default_n_tags(100_000, "classic")


def test_uploader_effects_show_in_the_data() -> None:
    """Regular uploaders' posts share an effect in `uploaders`, not in `classic`."""
    spread = {}
    for world in ("classic", "uploaders"):
        posts, truth = _frame(world, posts=6000)
        resid = truth["expected_log_fav"] - get_world(world).quality_effect * truth["quality"]
        by = resid.groupby(posts["uploader_id"]).agg(["mean", "size"])
        spread[world] = by.loc[by["size"] >= 15, "mean"].std()
    assert spread["uploaders"] > spread["classic"] + 0.25


def test_interactions_and_heteroscedasticity() -> None:
    inter = build_vocabulary(0, 5000, "interactions")
    classic = build_vocabulary(0, 5000, "classic")
    assert classic.rating_effect is None and classic.trend is None
    species = inter.category == 5
    assert inter.rating_effect is not None and inter.rating_effect[species].std() > 0.25
    assert inter.trend is not None and inter.trend[inter.category == 1].std() > 0.4
    k = process.group_dispersion(get_world("interactions"))
    assert k.max() / k.min() > 3 and len(set(process.group_dispersion(get_world("classic")))) == 1


def test_audience_and_recency_shapes_differ() -> None:
    years = np.array([0.0, 5.0, 15.0, 19.5])
    classic = process.audience(get_world("classic"), years)
    logistic = process.audience(get_world("heavy_tails"), years)
    piecewise = process.audience(get_world("uploaders"), years)
    assert classic[3] - classic[2] > 1.0  # still growing
    assert logistic[3] - logistic[2] < 0.3 < logistic[2] - logistic[1]  # saturated
    assert piecewise[3] - piecewise[2] < 0.3 and piecewise[1] > 2.0
    day = np.array([1.0, 30.0])
    fast = np.exp(process.recency(get_world("heavy_tails"), day))
    slow = np.exp(process.recency(get_world("long_tail"), day))
    assert fast[0] > 0.45 and fast[1] > 0.999
    assert slow[0] < 0.25 and slow[1] < 0.75


def _simulate(world: str, m: float, group: int, deleted: bool, n: int, rng) -> np.ndarray:
    """Brute force: draw quality, keep draws whose deletion flag matches, draw the count."""
    w = get_world(world)
    q = rng.normal(size=n)
    q = q[(rng.random(n) < process.deletion_probability(w, q)) == deleted]
    mu = np.exp(m + process.group_quality_effect(w)[group] * q)
    k = process.group_dispersion(w)[group]
    return rng.poisson(mu * rng.gamma(k, 1 / k, q.size))


@pytest.mark.parametrize(
    ("world", "m", "group", "deleted"),
    [
        ("classic", 3.0, 0, False),
        ("classic", -0.5, 4, True),
        ("classic", 7.5, 2, False),
        ("interactions", 2.0, 5, False),
        ("long_tail", 0.3, 1, True),
        ("drift", 5.0, 3, False),
    ],
)
def test_oracle_matches_monte_carlo(world: str, m: float, group: int, deleted: bool) -> None:
    rng = np.random.default_rng(11)
    n = 600_000 if not deleted else 6_000_000
    fav = _simulate(world, m, group, deleted, n, rng)
    y = np.log1p(fav)
    oracle = Oracle(get_world(world))
    one = np.ones(1)
    mean, sd = oracle.moments(m * one, np.array([group]), np.array([deleted]))
    se = y.std() / np.sqrt(y.size)
    assert abs(mean[0] - y.mean()) < 4 * se + 1e-4
    assert abs(sd[0] - y.std()) < 4 * se + 1e-3
    for count in np.quantile(fav, [0.1, 0.5, 0.9]).astype(int):
        cdf = oracle.cdf(count * one, m * one, np.array([group]), np.array([deleted]))[0]
        empirical = np.mean(fav <= count)
        assert abs(cdf - empirical) < 4 * np.sqrt(empirical * (1 - empirical) / fav.size) + 1e-3


@pytest.mark.parametrize("world", ["classic", "interactions", HELD_BACK_WORLD])
def test_truth_oracle_is_consistent_and_calibrated(world: str) -> None:
    """The truth's oracle columns use the post's own visible log-mean, and fit the data."""
    posts, truth = _frame(world, posts=8000)
    w = get_world(world)
    rating, ext = posts["rating"].to_numpy(), posts["file_ext"].to_numpy()
    group = process.noise_group(rating, ext)
    deleted = (posts["is_deleted"] == "t").to_numpy()
    m = truth["expected_log_fav"] - process.group_quality_effect(w)[group] * truth["quality"]
    mean, sd = Oracle(w).moments(m.to_numpy(), group, deleted)
    assert np.allclose(mean, truth["oracle_mean"]) and np.allclose(sd, truth["oracle_sd"])
    y = np.log1p(posts["fav_count"].astype(np.int64))
    z = (y - truth["oracle_mean"]) / truth["oracle_sd"]
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    # the oracle's score is a probability integral transform: roughly uniform
    deciles = np.histogram(truth["oracle_score"], bins=10, range=(0, 1))[0] / len(truth)
    assert np.abs(deciles - 0.1).max() < 0.03


def test_cli_world(tmp_path: Path) -> None:
    main(["--posts", "200", "--date", DATE, "--out", str(tmp_path), "--world", "long_tail"])
    assert len(pd.read_parquet(tmp_path / f"truth-{DATE}.parquet")) == 200
    with pytest.raises(SystemExit):
        main(["--posts", "10", "--date", DATE, "--out", str(tmp_path), "--world", "nope"])
