"""The exact additive fits (`model.ridge`): they predict what the network does with their
params, and the evidence gives each tag category the prior its effects call for."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from e6score_dagster.model import FeatureLayout, ModelConfig, ParquetBatches
from e6score_dagster.model.network import (
    CATEGORY_CODES,
    SPREAD_FEATURES,
    Link,
    effect_rows,
    tag_spread,
)
from e6score_dagster.model.ridge import (
    design_of,
    group_name,
    products_of,
    tag_groups,
    theta_of,
    train_ridge,
)
from e6score_dagster.model.train import calibrate_on_rows, evaluate, predict

CONFIG = ModelConfig(architecture="additive", hash_bits=10)
MAX_TAGS = 12
ARTIST, GENERAL = 2, 1  # tag-code categories: e621 category + 1
N_TAGS = 600  # vocabulary indices 1..600; the 300 most frequent get dense rows


def _quiet(_: str) -> None:
    pass


def _matrix(path, counts: bool, interaction_sd: float = 0.0, one_off_sd: float = 0.0):
    """Artist effects (sd 0.8) + general-tag effects (sd 0.03) + noise, twice as much noise
    for rating 2. With `counts`: that sum is the log rate of Poisson favourites (so the mean
    of log1p(favs) bends away from it where few are expected); else it is log1p(favs)."""
    rng = np.random.default_rng(3)
    n = 12000
    index = np.arange(1, N_TAGS + 1)
    category = np.where(index % 3 == 0, ARTIST, GENERAL)
    effect = np.where(category == ARTIST, rng.normal(0, 0.8, N_TAGS), rng.normal(0, 0.03, N_TAGS))
    # Zipf-like frequencies: low indices are common.
    pick = np.minimum(rng.zipf(1.3, (n, MAX_TAGS)), N_TAGS)
    keep = np.arange(MAX_TAGS)[None, :] < rng.integers(2, MAX_TAGS + 1, n)[:, None]
    pick = np.where(keep, pick, 0)
    codes = np.where(pick > 0, pick * CATEGORY_CODES + category[np.maximum(pick, 1) - 1], 0)
    rating = rng.integers(0, 3, n)
    noise = np.where(rating == 2, 1.0, 0.5)  # explicit posts twice as noisy
    y = (0.5 if counts else 2.0) + np.where(pick > 0, effect[np.maximum(pick, 1) - 1], 0).sum(1)
    if interaction_sd:  # each artist's effect differs by rating
        by_rating = rng.normal(0, interaction_sd, (N_TAGS, 3)) * (category == ARTIST)[:, None]
        extra = by_rating[np.maximum(pick, 1) - 1, rating[:, None]]
        y = y + np.where(pick > 0, extra, 0).sum(1)
    if one_off_sd:  # half the posts' last slot: an artist of its own (a one-off uploader's)
        own = rng.random(n) < 0.5
        codes[:, -1] = np.where(own, (N_TAGS + 1 + np.arange(n)) * CATEGORY_CODES + ARTIST,
                                codes[:, -1])
        y = y + own * rng.normal(0, one_off_sd, n)
    y += rng.normal(0, 1, n) * noise
    fav = rng.poisson(np.exp(y)) if counts else np.round(np.expm1(np.maximum(y, 0)))
    if counts:
        y = np.log1p(fav)
    ids = np.arange(1, n + 1) * 7
    table = pa.table({
        "id": ids,
        "fav_count": fav.astype(np.int64),
        "y": y.astype(np.float32),
        "tags": pa.array(list(codes.astype(np.int32)), type=pa.list_(pa.int32())),
        "rating_idx": rating.astype(np.int8),
        "ext_idx": rng.integers(0, 8, n).astype(np.int8),
        "t_upload_years": rng.uniform(0, 19, n).astype(np.float32),
        "holdout": (ids % 10) == 0,
        "trainable": np.ones(n, bool),
    })
    pq.write_table(table, path, row_group_size=2000)
    train_y = y[(ids % 10) != 0]
    layout = FeatureLayout(
        numeric=("t_upload_years",), max_tags=MAX_TAGS, n_ext=8, n_rating=3,
        y_mean=float(train_y.mean()), y_std=float(train_y.std()),
        numeric_mean=(9.5,), numeric_std=(5.5,), extra={"dense_tags": 301},
    )
    data = ParquetBatches(path, layout, 512, rows="train", validation_fraction=0.15)
    val = ParquetBatches(path, layout, 512, rows="validation", validation_fraction=0.15)
    return path, layout, data, val


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _matrix(tmp_path_factory.mktemp("ridge") / "matrix.parquet", counts=False)


def test_the_network_predicts_exactly_what_the_solve_did(world):
    path, layout, data, val = world
    result = train_ridge(CONFIG, layout, data, val, log=_quiet)
    d = design_of(data, CONFIG, layout)
    additive = jnp.asarray(d.predict(theta_of(result.params)))
    solved = layout.y_mean + layout.y_std * np.asarray(
        Link().apply({"params": result.params["link"]}, additive)
    )
    y, mu, _ = predict(CONFIG, layout, result.params,
                       ParquetBatches(path, layout, 512, rows="train", validation_fraction=0.15))
    np.testing.assert_allclose(mu, solved, atol=1e-3)
    np.testing.assert_allclose(y, data.load()["y"])
    # The dense rows belong to single tags; the long tail is hashed into shared rows.
    groups = tag_groups(d, by_category=True)
    assert {int(g) for g in groups[1:301] if g >= 0} <= {ARTIST * 2 + 1, GENERAL * 2 + 1}
    hashed = slice(301, 301 + 2**CONFIG.hash_bits)
    assert (groups[hashed] >= 0).any() and not d.row_dense[hashed].any()
    # After them, the interaction columns: only identity tags (here artists) have them.
    inter = d.row_kind != 0
    assert inter.sum() == (layout.n_rating + 1) * 301
    assert {group_name(g) for g in groups[inter] if g >= 0} == {
        "artist x rating", "artist x upload date"}


def test_the_evidence_gives_artists_a_wide_prior_and_general_tags_a_narrow_one(world):
    path, layout, data, val = world
    additive = train_ridge(CONFIG, layout, data, val, log=_quiet)
    prior = additive.prior_precision
    # Dense artists' effects vary ~25x more (in sd) than dense general tags': their prior
    # precision must be far lower.
    assert prior[ARTIST * 2 + 1] * 20 < prior[GENERAL * 2 + 1]
    # Reported in words and in log1p(favs): the artists' prior sd near the truth's 0.8.
    assert 0.5 < additive.prior_sd["artist"] < 1.1
    assert additive.prior_sd["general"] < 0.15
    linear_cfg = dataclasses.replace(CONFIG, architecture="linear")
    linear = train_ridge(linear_cfg, layout, data, val, log=_quiet)
    assert len(linear.prior_precision) == 1
    held = ParquetBatches(path, layout, 512, rows="holdout")
    m_add = evaluate(CONFIG, layout, additive.params, held)
    m_lin = evaluate(linear_cfg, layout, linear.params, held)
    assert m_add["nll"] < m_lin["nll"] - 0.01
    assert m_add["nll"] < m_add["constant_nll"] - 0.5
    # The validation curve is one point per evidence round; the best round's params are kept.
    best = min(additive.validation, key=lambda v: v["nll"])
    assert additive.best_step == best["step"]


def test_a_warm_start_from_another_fold_lands_on_the_same_fit(world):
    path, layout, data, val = world
    cold = train_ridge(CONFIG, layout, data, val, log=_quiet)
    other = ParquetBatches(path, layout, 512, rows="train", validation_fraction=0.15,
                           exclude_fold=(1, 3))
    first = train_ridge(CONFIG, layout, other, val, log=_quiet)
    warm = train_ridge(CONFIG, layout, data, val, log=_quiet,
                       warm=(first.params, first.prior_precision, first.prior_tail_dof))
    assert warm.validation[-1]["nll"] == pytest.approx(cold.validation[-1]["nll"], abs=2e-3)
    assert warm.steps < cold.steps


def test_on_an_accelerator_the_fit_is_the_one_on_the_cpu(world, monkeypatch):
    """Where JAX has an accelerator the solves' products run there (`sparse_ops`, resident
    design); run here through XLA on the CPU, the same code must give the same fit."""
    from e6score_dagster.model import ridge, sparse_ops
    from e6score_dagster.model.ridge import fit_ridge

    _, layout, data, val = world
    d = design_of(data, CONFIG, layout)
    groups = tag_groups(d, by_category=True)

    def one_solve():
        return fit_ridge(d, d.y, groups, rounds=1, tail_dof=0.0, log=_quiet).theta

    cpu, cpu_solve = train_ridge(CONFIG, layout, data, val, log=_quiet), one_solve()
    monkeypatch.setattr(sparse_ops, "on_accelerator", lambda: True)
    # Every resident array padded (rows, entries, the preconditioner's blocks), as on a GPU
    # where the lengths are rounded up to share compiled programs.
    monkeypatch.setattr(sparse_ops, "bucket", lambda size: size + 3)
    device, device_solve = train_ridge(CONFIG, layout, data, val, log=_quiet), one_solve()
    np.testing.assert_allclose(device_solve, cpu_solve, atol=1e-3)
    assert type(ridge.products_of(d)) is ridge._DeviceProducts
    # A design too large for the accelerator's free memory stays with the CPU's kernels.
    monkeypatch.setattr(sparse_ops, "fits_on_device", lambda n_bytes: False)
    assert type(ridge.products_of(d)) is ridge._Products
    # Float sums in another order may tip a stopping rule by a round, no more.
    assert abs(len(device.validation) - len(cpu.validation)) <= 1
    best = [min(v["nll"] for v in fit.validation) for fit in (device, cpu)]
    assert best[0] == pytest.approx(best[1], abs=5e-4)


def test_a_design_is_put_on_the_accelerator_only_where_half_its_free_memory_holds_it(
    monkeypatch,
):
    from e6score_dagster.model import sparse_ops

    class Device:  # what JAX reports of a GPU with 800 bytes free
        def memory_stats(self) -> dict:
            return {"bytes_limit": 1000, "bytes_in_use": 200}

    monkeypatch.setattr(sparse_ops.jax, "devices", lambda: [Device()])
    assert sparse_ops.fits_on_device(400) and not sparse_ops.fits_on_device(401)
    # The padded size: 4 bytes a value, the rows' metadata and mask, three arrays of entries.
    assert sparse_ops.resident_bytes(100, 5, 1000) == 4 * (100 * 6 + 3 * 1008)


def test_the_scale_follows_the_noise_of_each_rating(world):
    path, layout, data, val = world
    result = train_ridge(CONFIG, layout, data, val, log=_quiet)
    held = ParquetBatches(path, layout, 512, rows="holdout")
    rating = held.load()["rating"]
    y, mu, sigma = predict(CONFIG, layout, result.params, held)
    ratio = sigma[rating == 2].mean() / sigma[rating == 0].mean()
    assert 1.6 < ratio < 2.5  # the truth: 2
    z = (y - mu) / sigma
    for r in (0, 2):  # calibrated within each rating, not only on average
        assert 0.85 < z[rating == r].std() < 1.15


def test_a_fold_taken_from_the_pool_has_the_design_of_its_own_rows(world):
    """Every fit's design is taken from one design over all fit rows, built in blocks by
    fold x validation: it must hold exactly the rows that the fold and validation split would
    have read, share the pool's blocks instead of copying them, and still be right for a set
    whose split the blocks do not follow (then copied)."""
    path, layout, _, _ = world
    pool = ParquetBatches(path, layout, 512, rows="fit")
    for fraction, shared in ((0.15, True), (0.3, False)):
        split = {"validation_fraction": fraction, "exclude_fold": (1, 5)}
        for rows in ("train", "validation"):
            own = ParquetBatches(path, layout, 512, rows=rows, **split)
            pooled = ParquetBatches(path, layout, 512, rows=rows, pool=pool, **split)
            a, b = design_of(own, CONFIG, layout), design_of(pooled, CONFIG, layout)
            assert 0 < len(a.y) < 9000
            order_a, order_b = np.argsort(a.ids), np.argsort(b.ids)
            np.testing.assert_array_equal(a.ids[order_a], b.ids[order_b])
            np.testing.assert_array_equal(a.y[order_a], b.y[order_b])
            np.testing.assert_array_equal(a.z[order_a], b.z[order_b])
            assert (a.s[order_a] != b.s[order_b]).nnz == 0 and a.s.shape == b.s.shape
            whole = pool._derived[next(iter(pool._derived))]
            views = {id(blk) for blk in whole.blocks}
            assert all(id(blk) in views for blk in b.blocks) == shared
            # The rows themselves (a validation set's are read once for every fold).
            for key in ("id", "y", "tags"):
                np.testing.assert_array_equal(own.load()[key], pooled.load()[key])
    assert pool._loaded is None  # the design is streamed: the pool's rows are never loaded
    assert ("validation rows", 0.15) in pool._derived
    with pytest.raises(ValueError, match="cannot be taken from a pool"):
        ParquetBatches(path, layout, 512, rows="holdout", pool=pool)


def test_the_design_is_the_same_however_many_chunks_are_encoded_at_once(world, monkeypatch):
    """The chunks are encoded on several threads: the blocks must still hold the rows in the
    file's order, and every chunk's tags must count towards the rows' categories."""
    from e6score_dagster.model import ridge

    path, layout, _, _ = world
    designs = []
    for threads in (1, 4):
        monkeypatch.setattr(ridge, "PRODUCT_THREADS", threads)
        data = ParquetBatches(path, layout, 512, rows="fit")
        designs.append(ridge.build_design(data, CONFIG, layout))
    one, several = designs
    assert len(one.blocks) > 1  # six row groups of 2,000 posts: several chunks
    np.testing.assert_array_equal(one.ids, several.ids)
    np.testing.assert_array_equal(one.ids, np.sort(one.ids))  # the file's order
    assert (one.s != several.s).nnz == 0
    np.testing.assert_array_equal(one.row_category, several.row_category)
    # Artist tags are every third vocabulary index: their dense rows are tallied as artists.
    assert (one.row_category[3:301:3] == ARTIST).all()


def test_the_threaded_products_equal_scipys(monkeypatch):
    """The solver's products run over row pieces of the blocks, split over threads."""
    import scipy.sparse as sp

    from e6score_dagster.model import ridge
    from e6score_dagster.model.ridge import Design, _DeviceProducts, _Products

    monkeypatch.setattr(ridge, "PRODUCT_THREADS", 2)  # one thread per core: two here

    rng = np.random.default_rng(0)
    n, m, dz = 300_000, 5000, 3
    per_row = rng.integers(0, 8, n)
    indptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    s = sp.csr_matrix((rng.random(indptr[-1], dtype=np.float32),
                       rng.integers(0, m, indptr[-1]).astype(np.int32), indptr), shape=(n, m))
    z = rng.normal(size=(n, dz)).astype(np.float32)
    whole = Design.of(z, s, np.zeros(n, np.float32), row_category=np.zeros(m, np.int64),
                      row_dense=np.ones(m, bool))
    cut = 70_001  # two blocks of uneven size
    d = dataclasses.replace(whole, blocks=[whole.blocks[0].rows(0, cut),
                                           whole.blocks[0].rows(cut, n)])
    products = _Products(d)
    assert len(products.runs) == 2
    theta = rng.normal(size=dz + 1 + m).astype(np.float32)
    u = rng.normal(size=n).astype(np.float32)
    np.testing.assert_allclose(products.forward(theta),
                               z @ theta[:dz] + theta[dz] + s @ theta[dz + 1 :],
                               rtol=1e-4, atol=1e-4)
    expected = np.concatenate([z.T @ u, [u.sum()], s.T @ u])
    np.testing.assert_allclose(products.transposed(u), expected, rtol=1e-4, atol=2e-2)
    # Entry by entry (a row may name a column twice: the diagonal approximation's sums).
    squared = sp.csr_matrix((np.square(s.data), s.indices, s.indptr), shape=s.shape)
    diag = products.gram_blocks(d.row_kind).diag
    np.testing.assert_allclose(diag[dz + 1 :], np.asarray(squared.sum(axis=0))[0], rtol=1e-4)
    np.testing.assert_allclose(diag[:dz], np.square(z).sum(axis=0), rtol=1e-4)
    per_column = rng.random(m).astype(np.float32)
    np.testing.assert_allclose(products.squared_rows(per_column), squared @ per_column,
                               rtol=1e-4, atol=1e-5)
    # The accelerator's products (here through XLA on the CPU) are the same products.
    device = _DeviceProducts(d)
    np.testing.assert_allclose(device.forward(theta), products.forward(theta),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(device.transposed(u), expected, rtol=1e-4, atol=2e-2)
    gram = products.normal(theta)
    np.testing.assert_allclose(device.normal(theta), gram, rtol=1e-4,
                               atol=1e-5 * np.abs(gram).max())


def test_the_block_preconditioner_inverts_the_nested_blocks_of_the_gram_matrix(world):
    """Each identity tag's own column nests its per-rating columns and its date slope (the
    Jacobi preconditioner sees them as independent: CG took nearly twice the iterations), and
    the metadata one-hots nest in the bias. The blocks are read from a design built the
    product's way; they and the preconditioner must equal the Gram matrix's own."""
    import scipy.sparse as sp

    from e6score_dagster.model.ridge import _Products

    path, layout, data, _ = world
    d = design_of(data, CONFIG, layout)
    # Posts without a column named twice (this world draws tags with replacement; hashed
    # probes may collide): the solver's diagonal sums squares entry by entry.
    merged = d.s.copy()
    merged.sum_duplicates()
    d = d.take(np.diff(merged.indptr) == np.diff(d.s.indptr))
    assert len(d.y) > 2000
    dz = d.n_metadata
    x = sp.hstack([d.z, np.ones((len(d.y), 1), np.float32), d.s], format="csr")
    gram_matrix = (x.T @ x).toarray().astype(np.float64)
    gram = _Products(d).gram_blocks(d.row_kind)
    assert len(gram.cols) > 50  # the artists with a row of their own
    np.testing.assert_allclose(gram.diag, np.diag(gram_matrix), rtol=1e-4)
    np.testing.assert_allclose(gram.zz, gram_matrix[: dz + 1, : dz + 1], rtol=1e-4, atol=1e-2)
    cols = gram.cols + dz + 1
    blocks = gram_matrix[cols[:, :, None], cols[:, None, :]]
    off = ~np.eye(cols.shape[1], dtype=bool)
    np.testing.assert_allclose(gram.g[:, off], blocks[:, off], rtol=1e-4, atol=1e-3)
    # The preconditioner: the inverse of (those blocks + diag(lam)), the rest diagonal.
    rng = np.random.default_rng(1)
    lam = rng.uniform(0.5, 5.0, d.n_params).astype(np.float32)
    v = rng.normal(size=d.n_params).astype(np.float32)
    shown = np.diag(np.diag(gram_matrix))
    shown[: dz + 1, : dz + 1] = gram_matrix[: dz + 1, : dz + 1]
    shown[cols[:, :, None], cols[:, None, :]] = blocks
    expected = np.linalg.solve(shown + np.diag(lam), v)
    np.testing.assert_allclose(gram.preconditioner(lam)(v), expected, rtol=2e-3, atol=1e-5)


def test_the_link_bends_the_mean_where_counts_are_few(tmp_path):
    """Favourites are Poisson counts around an additive log rate: log1p(favs) cannot go below
    0, so where the additive mean is low the fitted link lifts it, and the held-out NLL is
    better than the same fit with the link taken out."""
    path, layout, data, val = _matrix(tmp_path / "counts.parquet", counts=True)
    result = train_ridge(CONFIG, layout, data, val, log=_quiet)
    held = ParquetBatches(path, layout, 512, rows="holdout")
    unlinked = {**result.params, "link": {"kernel": np.zeros_like(result.params["link"]["kernel"])}}
    assert evaluate(CONFIG, layout, result.params, held)["nll"] < (
        evaluate(CONFIG, layout, unlinked, held)["nll"] - 0.005
    )
    low = jnp.asarray([-2.5, -2.0], jnp.float32)  # standardised: fewer than one favourite
    lifted = np.asarray(Link().apply({"params": result.params["link"]}, low))
    assert (lifted > np.asarray(low) + 0.1).all()


def test_the_metadata_weights_are_refitted_through_the_link():
    """A small group of posts (think `swf`) whose effect was fitted without the bend: one
    Gauss-Newton step through the link moves its weight to where the bent mean fits it."""
    from e6score_dagster.model.ridge import fit_link_and_metadata

    rng = np.random.default_rng(5)
    n = 200_000
    truth = rng.normal(0.0, 1.2, n)
    z = np.zeros((n, 2), np.float32)
    z[:, 0] = rng.random(n) < 0.05  # the small group
    z[:, 1] = rng.normal(size=n)  # a feature the fit already has right
    y = np.logaddexp(0.0, 1.5 * truth) / 1.5 + rng.normal(0, 0.3, n)  # a soft floor
    mean = (truth - 0.5 * z[:, 0]).astype(np.float32)  # the group's effect 0.5 too low
    link, shift = fit_link_and_metadata(mean, y.astype(np.float32), z)
    assert shift[0] == pytest.approx(0.5, abs=0.08)
    assert abs(shift[1]) < 0.03 and abs(shift[2]) < 0.05  # the rest stays
    assert np.abs(link).max() > 0.1  # and the link bends


def _sparse_world(effects: np.ndarray, n: int, seed: int):
    """A design of n posts with 6 tags each (uniform over the vocabulary) and one metadata
    column, targets = the tags' effects + unit noise."""
    import scipy.sparse as sp

    from e6score_dagster.model.ridge import Design

    rng = np.random.default_rng(seed)
    m = len(effects)
    cols = rng.integers(0, m, (n, 6)).astype(np.int32)
    s = sp.csr_matrix((np.ones(n * 6, np.float32), cols.reshape(-1),
                       np.arange(0, n * 6 + 1, 6)), shape=(n, m))
    s.sum_duplicates()
    y = (s @ effects + rng.normal(0, 1, n)).astype(np.float32)
    d = Design.of(np.zeros((n, 1), np.float32), s, y, rating=np.zeros(n, np.int8),
                  ext=np.zeros(n, np.int8), row_category=np.zeros(m, np.int64),
                  row_dense=np.ones(m, bool))
    return d, y


@pytest.mark.parametrize("tails", [True, False])
def test_a_heavy_tailed_prior_is_chosen_where_effects_are_heavy_tailed(tails):
    """Student-t(2) tag effects: a few are huge. The Gaussian prior shrinks those too much
    and the rest too little; the Student-t rounds recover the effects better, and validation
    keeps them. With Gaussian effects the choice costs (almost) nothing."""
    from e6score_dagster.model.ridge import fit_ridge

    rng = np.random.default_rng(5)
    m = 3000
    effects = (0.3 * (rng.standard_t(2, m) if tails else rng.normal(0, 1.4, m))).astype(
        np.float32)
    d, y = _sparse_world(effects, 8000, 1)  # about 16 posts a tag: the prior matters
    vd, vy = _sparse_world(effects, 4000, 2)
    groups = np.zeros(m, np.int64)
    gauss = fit_ridge(d, y, groups, (vd, vy), tail_dof=0.0, log=_quiet)
    chosen = fit_ridge(d, y, groups, (vd, vy), log=_quiet)

    def error(fit) -> float:
        return float(np.sqrt(np.mean(np.square(fit.theta[2:] - effects))))

    assert gauss.tail_dof == 0.0
    if tails:
        assert chosen.tail_dof > 0
        assert error(chosen) < 0.9 * error(gauss)
    else:
        assert error(chosen) < 1.02 * error(gauss)
    # A refit told to use the chosen prior lands where it did, from its solution.
    again = fit_ridge(d, y, groups, (vd, vy), rounds=1, theta0=chosen.theta,
                      prior0=chosen.prior_precision, tail_dof=chosen.tail_dof, log=_quiet)
    assert error(again) == pytest.approx(error(chosen), rel=0.02)


def test_the_evidence_finds_tag_by_rating_effects_only_where_there_are_some(world, tmp_path):
    """Artists whose effect differs by rating (sd 0.6): the additive model's artist x rating
    prior widens to about that and its hold-out NLL beats the plain linear baseline's by more
    than in the world without them; without them, that prior closes."""
    inter = _matrix(tmp_path / "matrix.parquet", counts=False, interaction_sd=0.6)
    sds, gains = [], []
    for path, layout, data, val in (world, inter):
        additive = train_ridge(CONFIG, layout, data, val, log=_quiet)
        linear_cfg = dataclasses.replace(CONFIG, architecture="linear")
        linear = train_ridge(linear_cfg, layout, data, val, log=_quiet)
        held = ParquetBatches(path, layout, 512, rows="holdout")
        sds.append(additive.prior_sd["artist x rating"])
        gains.append(evaluate(linear_cfg, layout, linear.params, held)["nll"]
                     - evaluate(CONFIG, layout, additive.params, held)["nll"])
    assert sds[0] < 0.15 and 0.3 < sds[1] < 1.0, sds
    assert gains[1] > gains[0] + 0.05, gains


def test_a_set_without_rows_has_an_empty_design_of_the_full_width(world):
    """No validation slice (fraction 0): the design has no rows but every column, so a fit
    can still be given it."""
    path, layout, data, _ = world
    none = ParquetBatches(path, layout, 512, rows="validation", validation_fraction=0.0)
    d, full = design_of(none, CONFIG, layout), design_of(data, CONFIG, layout)
    assert len(d.y) == 0 and d.z.shape == (0, full.n_metadata)
    assert d.width == full.width and d.predict(np.zeros(full.n_params, np.float32)).shape == (0,)


def test_extrapolated_evidence_rounds_get_closer_to_the_fixed_point(monkeypatch):
    """Two groups of tags, effects of sd 1 and 0.05: MacKay's update creeps towards the
    prior precisions it would settle on; extrapolating each group's steps gets nearer in the
    same number of rounds, and lands on the same fixed point."""
    from e6score_dagster.model import ridge
    from e6score_dagster.model.ridge import fit_ridge

    rng = np.random.default_rng(9)
    m = 2000
    groups = (np.arange(m) % 2).astype(np.int64)
    effects = np.where(groups == 0, rng.normal(0, 1.0, m), rng.normal(0, 0.05, m))
    d, y = _sparse_world(effects.astype(np.float32), 6000, 4)

    def log_prior(rounds: int, ratio: float) -> np.ndarray:
        monkeypatch.setattr(ridge, "EXTRAPOLATION_RATIO", ratio)
        fit = fit_ridge(d, y, groups, None, rounds=rounds, tail_dof=0.0, log=_quiet)
        return np.log([fit.prior_precision[0], fit.prior_precision[1]])

    ratio = ridge.EXTRAPOLATION_RATIO
    settled = log_prior(60, 0.0)  # the plain update, run until it stops moving
    plain, extrapolated = log_prior(4, 0.0), log_prior(4, ratio)
    assert np.abs(extrapolated - settled).max() < 0.6 * np.abs(plain - settled).max()
    # Both stop once no precision moves by 5% in a round.
    np.testing.assert_allclose(log_prior(60, ratio), settled, atol=0.1)


def test_an_extrapolated_step_is_at_most_doubled_and_never_past_a_reversal():
    from e6score_dagster.model.ridge import EXTRAPOLATION_RATIO, LAMBDA_RANGE, _extrapolated

    steps: dict[int, float] = {}
    assert _extrapolated(10.0, 20.0, steps, 0) == 20.0  # the first step: as it is
    # The same direction again at ratio 1 (creeping): the step at most doubled.
    assert _extrapolated(20.0, 40.0, steps, 0) == pytest.approx(
        20.0 * 2.0 ** (1 / (1 - EXTRAPOLATION_RATIO)))
    assert _extrapolated(80.0, 60.0, steps, 0) == 60.0  # a reversal: as it is
    # A shrinking step (ratio 1/4): the rest of the geometric way, step / (1 - 1/4).
    steps = {1: math.log(4.0)}
    assert _extrapolated(4.0, 4.0 * math.sqrt(2), steps, 1) == pytest.approx(
        4.0 * math.exp(math.log(math.sqrt(2)) / 0.75))
    assert _extrapolated(1e5, 9e5, {2: 5.0}, 2) == LAMBDA_RANGE[1]  # within the bounds


def test_a_designs_used_columns_are_those_of_the_blocks_it_keeps():
    import scipy.sparse as sp

    from e6score_dagster.model.ridge import Block, Design

    def block(cols: list[int], ids: list[int]) -> Block:
        n = len(ids)
        s = sp.csr_matrix((np.ones(len(cols), np.float32), cols, [0, *([len(cols)] * n)]),
                          shape=(n, 11))
        zeros = np.zeros(n, np.int8)
        return Block(np.zeros((n, 1), np.float32), s, np.zeros(n, np.float32), zeros, zeros,
                     np.array(ids, np.int64), np.zeros((n, 2), np.float32))

    d = Design([block([0, 2], [1, 2]), block([2, 10], [3])], row_category=np.zeros(11, np.int64),
               row_dense=np.ones(11, bool))
    assert np.flatnonzero(d.used_columns()).tolist() == [0, 2, 10]
    first = d.take(np.array([True, True, False]))
    assert np.flatnonzero(first.used_columns()).tolist() == [0, 2]
    assert np.flatnonzero(d.used_columns()).tolist() == [0, 2, 10]  # the whole's is unchanged


def test_a_design_too_big_for_the_heap_is_read_from_a_file_and_fits_the_same(
    world, tmp_path, monkeypatch
):
    """Above `SPILL_BYTES` the design's bulk lives in an unlinked file beside the matrix,
    mapped read-only (`spill.py`): the fit must be the very same as from the heap, the blocks
    must be views of the mapping (not copies), and nothing may be left in the folder."""
    import mmap
    import shutil

    from e6score_dagster.model import ridge

    path, layout, _, _ = world
    own = tmp_path / "matrix.parquet"
    shutil.copy(path, own)
    fits, designs = [], []
    for limit in (ridge.SPILL_BYTES, 0):
        monkeypatch.setattr(ridge, "SPILL_BYTES", limit)
        pool = ParquetBatches(own, layout, 512, rows="fit")
        split = {"validation_fraction": 0.15, "exclude_fold": (1, 5), "pool": pool}
        data = ParquetBatches(own, layout, 512, rows="train", **split)
        val = ParquetBatches(own, layout, 512, rows="validation", **split)
        fits.append(train_ridge(CONFIG, layout, data, val, log=_quiet))
        designs.append(design_of(data, CONFIG, layout))
    heap, spilled = designs

    def mapped(x: np.ndarray) -> bool:
        while isinstance(x, np.ndarray | memoryview):
            x = x.base if isinstance(x, np.ndarray) else x.obj
        return isinstance(x, mmap.mmap)

    assert len(spilled.blocks) == len(heap.blocks) > 1
    for a, b in zip(heap.blocks, spilled.blocks, strict=True):
        np.testing.assert_array_equal(a.z, b.z)
        np.testing.assert_array_equal(a.ids, b.ids)
        assert (a.s != b.s).nnz == 0
        assert all(mapped(x) for x in (b.z, b.s.data, b.s.indices))
        assert not any(mapped(x) for x in (a.z, a.s.data, a.s.indices))
    np.testing.assert_array_equal(theta_of(fits[0].params), theta_of(fits[1].params))
    assert fits[0].validation == fits[1].validation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.parquet"]


def test_the_network_reads_each_posts_spread_as_the_design_weighs_its_rows(world):
    """`network.tag_spread` (what the scale sees at scoring) is the design's squared rows
    times the rows' posterior variances (what the fit's leverage is made of), dense and
    hashed tags alike."""
    path, layout, data, val = world
    params = train_ridge(CONFIG, layout, data, val, log=_quiet).params
    variance = np.asarray(params["tag_variance"])
    assert (variance > 0).all()
    d = design_of(data, CONFIG, layout)
    per_column = np.zeros(d.width, np.float32)
    per_column[: len(variance)] = variance
    expected = products_of(d).squared_rows(per_column)
    tags = np.asarray(data.load()["tags"])
    rows = effect_rows(tags, CONFIG.hash_bits, CONFIG.num_probes, 301)
    got = tag_spread(variance, rows, (tags > 0).astype(np.float32), 301, CONFIG.num_probes)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def _kept_and_rival(world, widen: bool) -> tuple[float, float, float, float]:
    """Validation and hold-out NLL of the scale `train_ridge` kept, and of its rival: the same
    fit with the spread's coefficient at a Gaussian posterior's 0.5 (`widen`) or with the
    spread and long tail's at 0, each calibrated on validation."""
    path, layout, data, val = world
    logged: list[str] = []
    params = train_ridge(CONFIG, layout, data, val, log=logged.append).params
    assert any(f"scale: {'with' if widen else 'without'} the spread" in m for m in logged)
    kernel = np.asarray(params["scale"]["kernel"]).copy()
    assert np.any(kernel[-SPREAD_FEATURES:] != 0) == widen
    if widen:
        kernel[-SPREAD_FEATURES:] = 0.0
    else:
        kernel[-SPREAD_FEATURES] = 0.5
    rival = {**params, "scale": {"kernel": kernel},
             "sigma_calibration": np.asarray(0.0, np.float32)}
    calibrate_on_rows(CONFIG, layout, rival, val.load())
    held = ParquetBatches(path, layout, 512, rows="holdout")
    return tuple(evaluate(CONFIG, layout, p, rows)["nll"]
                 for p in (params, rival) for rows in (val, held))


def test_the_scale_widens_with_the_spread_where_validation_says_it_helps(tmp_path):
    """Half the posts have an artist of their own (sd 0.7): its effect is unknown to any fit,
    so those posts are less predictable than their other tags say, and the scale that widens
    with the long tail wins on validation and on held-out posts."""
    world = _matrix(tmp_path / "one_off.parquet", counts=False, one_off_sd=0.7)
    kept_val, kept_held, rival_val, rival_held = _kept_and_rival(world, widen=True)
    assert kept_val < rival_val and kept_held < rival_held - 0.005


def test_the_scale_stays_plain_where_validation_says_the_spread_does_not_help(world):
    """Here the diagonal spread overstates what rare tags cost (held-out residuals do not
    grow with it): the plain scale is kept, and a spread coefficient of 0.5 would score worse
    on validation and held-out posts alike."""
    kept_val, kept_held, rival_val, rival_held = _kept_and_rival(world, widen=False)
    assert kept_val < rival_val and kept_held < rival_held
