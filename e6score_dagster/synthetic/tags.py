"""The tag universe (names, categories, popularity, hidden effects) and tags drawn per post."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from e6score_dagster.schema import RATINGS, TAG_CATEGORIES
from e6score_dagster.synthetic.names import (
    SEED_NAMES,
    STR,
    candidate_keys,
    key_names,
    pseudo_words,
)
from e6score_dagster.synthetic.process import TREND_CENTRE_YEARS, draw_effects
from e6score_dagster.synthetic.worlds import World, get_world

# Per tag category: share of the vocabulary, Zipf offset (flattens the
# head: no single artist owns 8% of the site), and per-post count distribution (see _tag_counts).
CATEGORY_SHARE = {0: 0.45, 1: 0.30, 3: 0.05, 4: 0.14, 5: 0.04, 7: 0.01, 8: 0.01}
CATEGORY_ZIPF_OFFSET = {0: 2.0, 1: 60.0, 3: 3.0, 4: 25.0, 5: 1.0, 7: 1.0, 8: 3.0}
assert set(CATEGORY_SHARE) <= set(TAG_CATEGORIES)  # no "invalid" (6) tags are generated
ZIPF_EXPONENT = 1.05
UNUSED_TAG_SHARE = 0.02


@dataclass(frozen=True)
class Vocabulary:
    """The tag universe, indexed by alphabetical rank (tag_string is sorted by name)."""

    names: np.ndarray  # object[str], alphabetical
    ids: np.ndarray  # int64 tag id (creation order, unrelated to popularity)
    category: np.ndarray  # int64
    effect: np.ndarray  # float64 hidden effect on log favourites
    rating_effect: np.ndarray | None  # (tag, rating index) hidden interaction, if the world has it
    trend: np.ndarray | None  # hidden change of the effect per decade of upload time, if any
    members: dict[int, np.ndarray]  # category -> alphabetical ranks of its tags
    cum_prob: dict[int, np.ndarray]  # category -> cumulative Zipf probabilities over members


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sort-based unique: numpy 2.4's hash-based np.unique is ~50x slower on int64 keys."""
    values = np.sort(values)
    keep = np.ones(values.size, bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each key (stable sort; np.unique is slow here)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(keys.size, bool)
    first[1:] = ordered[1:] != ordered[:-1]
    mask = np.empty(keys.size, bool)
    mask[order] = first
    return mask


def _category_sizes(n_tags: int) -> dict[int, int]:
    sizes = {c: max(3, int(round(share * n_tags))) for c, share in CATEGORY_SHARE.items()}
    sizes[0] += n_tags - sum(sizes.values())
    return sizes


def _category_seeds(sizes: dict[int, int]) -> dict[int, tuple[str, ...]]:
    return {c: SEED_NAMES[c][: max(1, n // 3)] for c, n in sizes.items()}


def _tag_names(
    rng: np.random.Generator, words: np.ndarray, sizes: dict[int, int]
) -> dict[int, np.ndarray]:
    """Unique names per category: well-known seed names first, then generated ones."""
    seeds = _category_seeds(sizes)
    taken = {x for names in seeds.values() for x in names}
    factor = 1.6
    while True:
        keys = [candidate_keys(rng, words.size, c, int(n * factor) + 20) for c, n in sizes.items()]
        labels = np.concatenate([np.full(k.size, c) for k, c in zip(keys, sizes, strict=True)])
        allkeys = np.concatenate(keys)
        keep = _first_occurrence(allkeys)
        out = {}
        for c, n in sizes.items():
            need = n - len(seeds[c])
            cand = allkeys[keep & (labels == c)][: need + 50]
            names = key_names(cand, words)
            names = names[[x not in taken for x in names.tolist()]][:need]
            out[c] = np.concatenate([np.array(seeds[c], dtype=object), names])
        if all(out[c].size == n for c, n in sizes.items()):
            return out
        factor *= 2


def _zipf_cum(rng: np.random.Generator, n: int, offset: float, n_seeds: int) -> np.ndarray:
    """Cumulative Zipf-Mandelbrot probabilities; seeds lead, the rest in random rank order."""
    rank = np.concatenate([np.arange(n_seeds), n_seeds + rng.permutation(n - n_seeds)])
    weight = (rank + 1.0 + offset) ** -ZIPF_EXPONENT
    unused = rng.random(n) < UNUSED_TAG_SHARE
    unused[:n_seeds] = False
    weight[unused] = 0.0
    cum = np.cumsum(weight)
    return cum / cum[-1]


def _per_category(
    rng: np.random.Generator, world: World, sd: dict[int, float], sizes: dict[int, int], k: int
) -> np.ndarray | None:
    """(tags, k) hidden values, scale by category (0 where absent); None if none at all."""
    if not any(sd.values()):
        return None
    return np.concatenate(
        [draw_effects(rng, world, sd.get(c, 0.0), n * k).reshape(n, k) for c, n in sizes.items()]
    )


def build_vocabulary(seed: int, n_tags: int, world: str | World = "classic") -> Vocabulary:
    """The tag universe: names, categories, popularity and hidden effects."""
    world = get_world(world)
    rng = np.random.default_rng([seed, 0])
    words = pseudo_words(rng, max(4000, min(n_tags // 4, 200_000)))
    sizes = _category_sizes(n_tags)
    by_cat = _tag_names(rng, words, sizes)
    seeds = _category_seeds(sizes)
    names = np.concatenate([by_cat[c] for c in sizes])
    cats = np.concatenate([np.full(sizes[c], c) for c in sizes])
    effect = np.concatenate([draw_effects(rng, world, world.effect_sd[c], sizes[c]) for c in sizes])
    cum = {}
    start = 0
    for c, n in sizes.items():
        cum[c] = _zipf_cum(rng, n, CATEGORY_ZIPF_OFFSET[c], len(seeds[c]))
        effect[start : start + n] -= effect[start : start + n].mean()
        start += n
    ids = rng.permutation(np.sort(rng.choice(int(n_tags * 1.3) + 10, n_tags, replace=False)) + 1)
    listed = names.tolist()
    order = np.array(sorted(range(n_tags), key=listed.__getitem__))  # faster than np.argsort
    rank = np.empty(n_tags, np.int64)
    rank[order] = np.arange(n_tags)
    members, start = {}, 0
    for c, n in sizes.items():
        members[c] = rank[start : start + n]
        start += n
    extra = np.random.default_rng([seed, 5])  # classic's stream above stays untouched
    rating_effect = _per_category(extra, world, world.rating_interaction_sd, sizes, len(RATINGS))
    trend = _per_category(extra, world, world.trend_sd, sizes, 1)
    trend = None if trend is None else trend[:, 0]
    return Vocabulary(
        names=names[order],
        ids=ids[order],
        category=cats[order],
        effect=effect[order],
        rating_effect=None if rating_effect is None else rating_effect[order],
        trend=None if trend is None else trend[order],
        members=members,
        cum_prob=cum,
    )


def tag_effects(
    vocab: Vocabulary,
    rows: np.ndarray,
    ranks: np.ndarray,
    rating_idx: np.ndarray,
    years: np.ndarray,
) -> np.ndarray:
    """Per post: the sum of its tags' hidden effects, with rating and trend interactions."""
    n = rating_idx.size
    total = np.bincount(rows, weights=vocab.effect[ranks], minlength=n)
    if vocab.rating_effect is not None:
        inter = vocab.rating_effect[ranks, rating_idx[rows]]
        total = total + np.bincount(rows, weights=inter, minlength=n)
    if vocab.trend is not None:
        drift = vocab.trend[ranks] * (years[rows] - TREND_CENTRE_YEARS) / 10.0
        total = total + np.bincount(rows, weights=drift, minlength=n)
    return total


def _tag_counts(rng: np.random.Generator, n: int) -> dict[int, np.ndarray]:
    """Tags per post by category; general counts are lognormal (mean ~26, tail to hundreds)."""
    general = np.exp(rng.normal(np.log(20), 0.75, n)).round().astype(np.int64).clip(0, 900)
    return {
        0: general,
        1: rng.choice(4, size=n, p=(0.06, 0.84, 0.08, 0.02)),
        3: rng.poisson(0.7, n),
        4: rng.poisson(1.1, n),
        5: rng.poisson(2.0, n),
        7: rng.poisson(2.0, n),
        8: (rng.random(n) < 0.04).astype(np.int64),
    }


def draw_tags(
    rng: np.random.Generator, vocab: Vocabulary, n: int, empty: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(post row, alphabetical rank) pairs, unique per post and sorted by post then name."""
    n_tags = vocab.names.size
    keys = []
    for cat, k in _tag_counts(rng, n).items():
        k = np.where(empty, 0, k)
        rows = np.repeat(np.arange(n, dtype=np.int64), k)
        pos = np.searchsorted(vocab.cum_prob[cat], rng.random(rows.size), side="right")
        pos = np.minimum(pos, vocab.members[cat].size - 1)
        keys.append(rows * n_tags + vocab.members[cat][pos])
    uniq = sorted_unique(np.concatenate(keys))
    return uniq // n_tags, uniq % n_tags


def tag_strings(vocab: Vocabulary, rows: np.ndarray, ranks: np.ndarray, n: int) -> list[str]:
    tokens = vocab.names[ranks].tolist()
    bounds = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).tolist()
    return [" ".join(tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def locked_tags(rng: np.random.Generator, vocab: Vocabulary, n: int) -> list[str]:
    """Mostly empty; a few posts lock one or two popular tags (sometimes as removals)."""
    popular = vocab.names[vocab.members[0][:30]].astype(str).astype(STR)
    first = popular[rng.integers(0, popular.size, n)]
    first = np.where(rng.random(n) < 0.3, np.strings.add("-", first), first)
    second = np.strings.add(" ", popular[rng.integers(0, popular.size, n)])
    out = np.where(rng.random(n) < 0.3, np.strings.add(first, second), first)
    return np.where(rng.random(n) < 0.015, out, "").tolist()
