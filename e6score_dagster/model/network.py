"""The E6Score regressor: metadata in, a Gaussian over log1p(fav_count) out."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e6score_dagster.model.config import ModelConfig

# Odd 32-bit multipliers for multiply-shift hashing, one per probe.
_PROBE_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C | 1)


def probe_buckets(tag_idx: jnp.ndarray, hash_bits: int, num_probes: int) -> jnp.ndarray:
    """Multiply-shift hashes of each tag index into 2**hash_bits rows, one per probe.

    Several probes per tag make a collision of two tags in one row harmless: their other
    rows still tell them apart (a Bloom-style hashed embedding).
    """
    xp = np if isinstance(tag_idx, np.ndarray) else jnp  # NumPy in, NumPy out
    x = tag_idx.astype(xp.uint32)
    rows = [
        (x * xp.uint32(m)) >> xp.uint32(32 - hash_bits) for m in _PROBE_MULTIPLIERS[:num_probes]
    ]
    return xp.stack(rows, axis=-1).astype(xp.int32)


CATEGORY_CODES = 16  # a tag code is vocabulary index * 16 + (e621 category + 1); 0 = padding
# The uploader enters as one more "tag" with its own category code (index: the uploader's
# rank by post count), so it gets an additive effect with its own shrinkage group.
UPLOADER_CATEGORY = CATEGORY_CODES - 1


def effect_rows(tags: jnp.ndarray, hash_bits: int, num_probes: int, n_dense: int) -> jnp.ndarray:
    """Rows of the additive effect table for each tag code, [B, T, P]: the `n_dense` most
    frequent tags own one row each (no collisions where the data can pin an effect down);
    the long tail and the uploaders share 2**hash_bits hashed rows after them. NumPy in,
    NumPy out; JAX otherwise."""
    xp = np if isinstance(tags, np.ndarray) else jnp
    hashed = probe_buckets(tags, hash_bits, num_probes) + n_dense
    if n_dense <= 0:
        return hashed
    index = tags // CATEGORY_CODES
    dense = (index < n_dense) & (index > 0) & (tags % CATEGORY_CODES != UPLOADER_CATEGORY)
    return xp.where(dense[..., None], index[..., None], hashed).astype(xp.int32)


# Tags whose effect may depend on the rating and drift over the upload years: identities (an
# artist, a copyright, a character, a species: audiences differ between safe and explicit
# posts, and rise and fall), not descriptive general or meta tags. Tag codes: category + 1.
INTERACTING_CODES = (2, 4, 5, 6)
# The upload-date trend is per decade about this upload year (years after the site's launch).
TREND_CENTER_YEARS = 12.0
TREND_SCALE_YEARS = 10.0


def interaction_terms(tags, rating, t_years, n_dense: int, n_rating: int):
    """Rows and values [B, T, 2] of each tag slot in the interaction table (n_rating + 1 rows
    per dense tag): its effect for this rating (value 1), and its slope over the upload date
    (value: decades from TREND_CENTER_YEARS). Only dense tags of INTERACTING_CODES have them;
    other slots point at row 0 with value 0. NumPy in, NumPy out; JAX otherwise."""
    xp = np if isinstance(tags, np.ndarray) else jnp
    index = tags // CATEGORY_CODES
    code = tags % CATEGORY_CODES
    ok = (index > 0) & (index < n_dense)
    ok = ok & xp.isin(code, xp.asarray(INTERACTING_CODES))
    by_rating = index * n_rating + rating[:, None]
    by_time = n_rating * n_dense + index
    rows = xp.stack([xp.where(ok, by_rating, 0), xp.where(ok, by_time, 0)], axis=-1)
    trend = (t_years.astype(xp.float32) - TREND_CENTER_YEARS) / TREND_SCALE_YEARS
    values = xp.stack([ok.astype(xp.float32), ok * trend[:, None]], axis=-1)
    return rows.astype(xp.int32), values.astype(xp.float32)


def interaction_rows(n_dense: int, n_rating: int) -> int:
    return (n_rating + 1) * n_dense


class Interactions(nn.Module):
    """Tag x rating effects and tag x upload-date slopes of the dense identity tags (zero at
    initialisation: without them the model is additive in the tags)."""

    n_dense: int
    n_rating: int

    @nn.compact
    def __call__(self, batch: dict[str, jnp.ndarray]) -> jnp.ndarray:
        size = max(interaction_rows(self.n_dense, self.n_rating), 1)
        weight = self.param("weight", nn.initializers.zeros, (size,))
        rows, values = interaction_terms(
            batch["tags"], batch["rating"], batch["t_years"], self.n_dense, self.n_rating
        )
        return (weight[rows] * values).sum(axis=(1, 2))


class TraitsDense(nn.Module):
    """One linear function of a tag's traits: its e621 category (one-hot) and its log frequency
    rank (and the square). The params are those of `nn.Dense(1)` on the 18 traits, but the
    category's weight is read by index instead of multiplying a [B, T, 18] one-hot, which was
    half of an additive model's forward pass."""

    @nn.compact
    def __call__(self, tags: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.initializers.zeros, (CATEGORY_CODES + 2, 1))[:, 0]
        bias = self.param("bias", nn.initializers.zeros, (1,))
        rank = jnp.log1p((tags // CATEGORY_CODES).astype(jnp.float32)) / 10.0
        per_category = kernel[: CATEGORY_CODES][tags % CATEGORY_CODES]
        return per_category + rank * kernel[CATEGORY_CODES] + jnp.square(rank) * kernel[-1] + bias


class Shrinkage(nn.Module):
    """A factor on each tag's additive effect, learned from the tag's category and rarity: a
    rare general tag's estimate is mostly noise, a rare artist's much less (empirical-Bayes
    shrinkage by group, which one ridge penalty for all tags cannot do). Exactly 1 at
    initialisation, so a warm start keeps the fit it starts from."""

    @nn.compact
    def __call__(self, tags: jnp.ndarray) -> jnp.ndarray:
        return 2.0 * jax.nn.sigmoid(TraitsDense(name="factor")(tags))  # in (0, 2)


class TagEncoder(nn.Module):
    config: ModelConfig
    n_dense: int = 0

    @nn.compact
    def __call__(self, tags: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, ...]:
        cfg = self.config
        rows = probe_buckets(tags, cfg.hash_bits, cfg.num_probes)  # [B, T, P]
        mask = (tags > 0).astype(jnp.float32)[..., None]  # index 0 is padding
        emb_mask = mask
        if train and cfg.tag_dropout > 0:
            # Tag dropout: the deep part must not hinge on any one (rare) tag; the additive
            # part below still sees every tag.
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - cfg.tag_dropout, mask.shape)
            emb_mask = mask * keep
        table = self.param(
            "embedding", nn.initializers.normal(0.05), (2**cfg.hash_bits, cfg.embed_dim)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.n_dense + 2**cfg.hash_bits,))
        probe_w = self.param("probe_weight", nn.initializers.ones, (cfg.num_probes,))
        emb = jnp.einsum("btpd,p->btd", table[rows], probe_w) * emb_mask
        count = jnp.maximum(emb_mask.sum(axis=1), 1.0)
        pooled = emb.sum(axis=1) / jnp.sqrt(count)
        # Additive per-tag effect: the wide (linear-in-tags) part of the model.
        shrink = Shrinkage(name="shrink")(tags)
        effect_at = effect_rows(tags, cfg.hash_bits, cfg.num_probes, self.n_dense)
        effect = bias[effect_at]
        linear = (effect.mean(axis=-1) * shrink * mask[..., 0]).sum(axis=1)
        variance = self.param("variance", nn.initializers.zeros, bias.shape)
        spread = tag_spread(variance, effect_at, mask[..., 0], self.n_dense, cfg.num_probes)
        return pooled, linear, spread


def calibrate(module: nn.Module, sigma: jnp.ndarray) -> jnp.ndarray:
    """Scale sigma by a factor that training never moves: it is fitted afterwards on the
    validation slice (`train.calibrate_scale`), since a scale learned on the training posts'
    own residuals is overconfident wherever the mean has fitted noise."""
    log_factor = module.param("sigma_calibration", nn.initializers.zeros, ())
    return sigma * jnp.exp(jax.lax.stop_gradient(log_factor))


def metadata_features(batch: dict[str, jnp.ndarray], n_rating: int, n_ext: int, n_freq: int):
    """Everything but the tags, as one dense vector per post (NumPy in, NumPy out)."""
    xp = np if isinstance(batch["numeric"], np.ndarray) else jnp

    def one_hot(codes, n: int):
        return (codes[:, None] == xp.arange(n)[None, :]).astype(xp.float32)

    return xp.concatenate(
        [
            batch["numeric"],
            one_hot(batch["rating"], n_rating),
            one_hot(batch["ext"], n_ext),
            time_encoding(batch["t_years"], n_freq),
        ],
        axis=-1,
    )


def time_encoding(t_years: jnp.ndarray, n_freq: int) -> jnp.ndarray:
    """Smooth basis of the upload date, periods from ~40 years down to ~1 year."""
    xp = np if isinstance(t_years, np.ndarray) else jnp
    periods = xp.geomspace(40.0, 1.0, n_freq).astype(xp.float32)
    ang = xp.float32(2 * math.pi) * t_years[:, None] / periods[None, :]
    return xp.concatenate([xp.sin(ang), xp.cos(ang)], axis=-1)


class E6ScoreNet(nn.Module):
    """Tags, rating, file type, time and numeric metadata -> (mean, scale) of log1p(favs)."""

    config: ModelConfig
    n_rating: int
    n_ext: int
    y_mean: float
    y_std: float
    n_dense: int = 0

    @nn.compact
    def __call__(
        self, batch: dict[str, jnp.ndarray], train: bool = False
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        cfg = self.config
        pooled, linear, spread = TagEncoder(cfg, self.n_dense, name="tags")(batch["tags"], train)
        # Wide part: the linear baseline's terms. The deep part sees their sum (the additive
        # prediction) as an input, so it can bend the link and set the scale by it, and only
        # has to learn what is not additive.
        wide = nn.Dense(1, kernel_init=nn.initializers.zeros, name="wide")(
            metadata_features(batch, self.n_rating, self.n_ext, cfg.time_frequencies)
        )[:, 0]
        inter = Interactions(self.n_dense, self.n_rating, name="interactions")(batch)
        additive = Link(name="link")(linear + wide + inter)
        rating = nn.Embed(self.n_rating, 8, name="rating")(batch["rating"])
        ext = nn.Embed(self.n_ext, 8, name="ext")(batch["ext"])
        x0 = jnp.concatenate(
            [
                pooled,
                rating,
                ext,
                batch["numeric"],
                time_encoding(batch["t_years"], cfg.time_frequencies),
                additive[:, None],
            ],
            axis=-1,
        )
        d = x0.shape[-1]
        x = x0
        for i in range(cfg.cross_layers):  # DCN-v2 cross layers: explicit feature crosses
            x = x0 * nn.Dense(d, name=f"cross_{i}", kernel_init=nn.initializers.zeros)(x) + x
        h = x
        for i, w in enumerate(cfg.mlp_widths):
            h = nn.gelu(nn.Dense(w, name=f"mlp_{i}")(h))
        out = nn.Dense(2, name="head", kernel_init=nn.initializers.zeros)(h)
        mu = self.y_mean + self.y_std * (out[:, 0] + additive)
        # The additive models' scale correction, kept as it was fitted (`warm_start`).
        scale = ScaleCorrection(name="scale")(
            scale_features(batch, additive, self.n_rating, self.n_ext, spread,
                           long_tail(batch["tags"], self.n_dense))
        )
        sigma = self.y_std * (jax.nn.softplus(out[:, 1] + 0.5413) + 1e-3)  # softplus(.5413)=1
        return mu, calibrate(self, sigma * jnp.exp(scale))


def gaussian_nll(mu: jnp.ndarray, sigma: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    z = (y - mu) / sigma
    return jnp.log(sigma) + 0.5 * z * z + 0.5 * math.log(2 * math.pi)


class LinearNet(nn.Module):
    """Additive hashed tag effects plus a linear term in the other metadata, with one
    homoscedastic scale; L2 from the optimiser's weight decay (ridge). Without `shrinkage` it
    is the baseline; with it, the model's additive stage."""

    config: ModelConfig
    n_rating: int
    n_ext: int
    y_mean: float
    y_std: float
    n_dense: int = 0
    shrinkage: bool = False

    @nn.compact
    def __call__(
        self, batch: dict[str, jnp.ndarray], train: bool = False
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        cfg = self.config
        rows = effect_rows(batch["tags"], cfg.hash_bits, cfg.num_probes, self.n_dense)
        mask = (batch["tags"] > 0).astype(jnp.float32)
        weight = self.param("tag_weight", nn.initializers.zeros, (self.n_dense + 2**cfg.hash_bits,))
        tag_w = weight[rows].mean(axis=-1)
        if self.shrinkage:
            tag_w = tag_w * Shrinkage(name="shrink")(batch["tags"])
        tag_term = (tag_w * mask).sum(axis=1)
        variance = self.param("tag_variance", nn.initializers.zeros, weight.shape)
        spread = tag_spread(variance, rows, mask, self.n_dense, cfg.num_probes)
        tag_term += Interactions(self.n_dense, self.n_rating, name="interactions")(batch)
        x = metadata_features(batch, self.n_rating, self.n_ext, cfg.time_frequencies)
        linear = nn.Dense(1, kernel_init=nn.initializers.zeros, name="linear")(x)[:, 0]
        mean = Link(name="link")(linear + tag_term)
        mu = self.y_mean + self.y_std * mean
        log_scale = self.param("log_scale", nn.initializers.zeros, ())
        # The noise of log1p(favs) is not one number: it depends on the expected count (few
        # favourites are noisier on the log scale), the rating and the file type. A log-linear
        # correction, zero at initialisation (then one scale for every post).
        features = scale_features(batch, mean, self.n_rating, self.n_ext, spread,
                                  long_tail(batch["tags"], self.n_dense))
        scale = ScaleCorrection(name="scale")(features)
        sigma = self.y_std * jnp.exp(log_scale + scale)
        return mu, calibrate(self, sigma)


MAX_LOG_SCALE_CORRECTION = math.log(2.0)


class ScaleCorrection(nn.Module):
    """The additive models' log-scale correction: linear in `scale_features`, zero at
    initialisation, and bounded to a factor of 2 either way, so a poorly pinned-down fit (a
    small dump, an outlier) cannot make any post's predictive scale absurd."""

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.initializers.zeros, (features.shape[-1], 1))
        bound = MAX_LOG_SCALE_CORRECTION
        return jnp.clip((features @ kernel)[:, 0], -bound, bound)


SPREAD_FEATURES = 3  # the last columns of `scale_features`: the spread and `long_tail`


def scale_feature_count(n_rating: int, n_ext: int) -> int:
    """How many columns `scale_features` has: the mean, its square, the one-hots, the spread
    and the two `long_tail` columns."""
    return 2 + n_rating + n_ext + SPREAD_FEATURES


def long_tail(tags, n_dense: int):
    """[B, 2]: whether the post's uploader is in the hashed long tail (every uploader is), and
    log(1 + how many of its tags are). A hashed row is shared by many tags or uploaders, so
    its posterior variance (`tag_spread`) says little of how well it knows one of them: a
    one-off uploader's own effect is as unknown as its group's prior. The scale learns what
    these cost from the residuals. NumPy in, NumPy out; JAX otherwise."""
    xp = np if isinstance(tags, np.ndarray) else jnp
    index, code = tags // CATEGORY_CODES, tags % CATEGORY_CODES
    uploader = (tags > 0) & (code == UPLOADER_CATEGORY)
    hashed = (tags > 0) & ~uploader & (index >= n_dense)
    return xp.stack(
        [uploader.any(axis=-1), xp.log1p(hashed.sum(axis=-1).astype(xp.float32))], axis=-1
    ).astype(xp.float32)


def tag_spread(variance, rows, mask, n_dense: int, num_probes: int):
    """Each post's uncertainty about its tags' summed effect, in units of the noise: the sum
    over its tags of the posterior variance of the rows each effect reads, weighed as the
    design weighs them (a dense tag's own row at 1, a hashed tag's P rows at 1/P each, so
    mean / P). A post of rarely seen tags (or a new uploader) is less predictable than one of
    well-known tags; the fit sets `variance` (`ridge.RidgeFit.row_variance`), zero without it.
    NumPy in, NumPy out; JAX otherwise."""
    xp = np if isinstance(rows, np.ndarray) else jnp
    v = variance[rows].mean(axis=-1)
    v = xp.where(rows[..., 0] < n_dense, v, v / num_probes)
    return (v * mask).sum(axis=1)


def scale_features(batch: dict, mean, n_rating: int, n_ext: int, spread, tail):
    """What the additive models' log scale varies with: the standardised mean (and its square,
    clipped so an extreme post cannot blow up its scale), rating, file type, log(1 + spread)
    (`tag_spread`: a Gaussian posterior's predictive variance is the noise's times 1 + spread,
    so its coefficient is near 0.5) and the `long_tail` columns `tail`. NumPy in, NumPy out
    (the exact solves on the host, no compilation per shape); JAX otherwise."""
    xp = np if isinstance(mean, np.ndarray) else jnp
    m = xp.clip(mean, -4.0, 4.0).astype(xp.float32)

    def one_hot(codes, n: int):
        return (codes[:, None] == xp.arange(n)[None, :]).astype(xp.float32)

    return xp.concatenate(
        [
            m[:, None],
            xp.square(m)[:, None] / 4.0,
            one_hot(batch["rating"], n_rating),
            one_hot(batch["ext"], n_ext),
            xp.log1p(xp.maximum(spread, 0.0)).astype(xp.float32)[:, None],
            tail,
        ],
        axis=-1,
    )


# Knots of the additive models' link, in standard deviations of log1p(favs) about its mean.
LINK_KNOTS = tuple(k / 2 for k in range(-6, 7))


def link_features(mean):
    """Hinges max(0, knot - mean) at LINK_KNOTS: a piecewise-linear function of the additive
    mean, free below each knot (NumPy in, NumPy out; JAX otherwise)."""
    xp = np if isinstance(mean, np.ndarray) else jnp
    knots = xp.asarray(LINK_KNOTS, xp.float32)[None, :]
    return xp.maximum(xp.float32(0.0), knots - mean[:, None].astype(xp.float32))


class Link(nn.Module):
    """The additive models' link: mean -> mean + a piecewise-linear correction (zero at
    initialisation). Favourites are counts: log1p of a count cannot fall below 0 and is
    noisiest near it, so E[log1p(favs)] bends away from a sum of effects where few favourites
    are expected; an additive mean alone cannot bend."""

    @nn.compact
    def __call__(self, mean: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.initializers.zeros, (len(LINK_KNOTS), 1))
        return mean + (link_features(mean) @ kernel)[:, 0]


# The additive terms a warm start copies from the additive fit, and training then keeps fixed.
WARM_FROZEN = (
    ("tags", "bias"), ("tags", "variance"), ("tags", "shrink"), ("wide",), ("scale",), ("link",),
    ("interactions",),
)


def warm_start(params: dict, additive: dict) -> dict:
    """E6ScoreNet params that predict exactly what the fitted shrinkage LinearNet `additive`
    predicts: its tag effects and shrinkage and its metadata terms become the wide part
    (`WARM_FROZEN`), its scale the head's scale bias, and the deep part starts at zero output.
    Training then learns only what the additive model misses (a residual fit), and early
    stopping can never end worse than the additive fit on validation."""
    out = jax.tree_util.tree_map(np.array, params)
    out["tags"]["bias"] = np.array(additive["tag_weight"])
    out["tags"]["variance"] = np.array(additive["tag_variance"])
    # A plain linear fit has no shrinkage: the initial (zero) shrinkage is a factor of exactly 1.
    if "shrink" in additive:
        out["tags"]["shrink"] = jax.tree_util.tree_map(np.array, additive["shrink"])
    out["wide"] = {k: np.array(v) for k, v in additive["linear"].items()}
    for part in ("scale", "link"):
        if part in additive:
            out[part] = {"kernel": np.array(additive[part]["kernel"])}
    if "interactions" in additive:
        out["interactions"] = {"weight": np.array(additive["interactions"]["weight"])}
    scale = float(np.exp(additive["log_scale"] + additive["sigma_calibration"]))
    head_bias = np.array(out["head"]["bias"])
    head_bias[1] = math.log(math.expm1(max(scale - 1e-3, 1e-3))) - 0.5413
    out["head"]["bias"] = head_bias
    return out
