"""A realistic, seeded e621-style dump generator for tests, the bundled sample and benchmarks.

The real export is several GB and cannot ship with the repo, yet every stage (ingest, cleaning,
vocabulary, model, scoring) must face its quirks: quoted multi-line Unicode descriptions, `t`/`f`
booleans, microsecond timestamps, empty tag strings, unused tags, a growing audience and posts too
young to have collected their favourites. This module reproduces those quirks and plants a known
signal (a hidden per-post ``quality``) so benchmarks can measure how much of it a score recovers.

Generative process for ``fav_count`` (the signal a model may or may not recover)::

    log_mu = BASE_LOG_FAV                            # 2007 audience
           + AUDIENCE_GROWTH * years_since_launch    # audience grows exponentially
           + RATING_EFFECT[rating] + EXT_EFFECT[file_ext]
           + sum(hidden effect of each tag)          # N(0, sd) per tag, sd by category:
                                                     # artist 0.7 >> character/copyright ~0.3
                                                     # > species/lore 0.15 > general/meta 0.08
           + DELETED_EFFECT * is_deleted
           + QUALITY_EFFECT * quality                # quality ~ N(0, 1), hidden
           + log(1 - exp(-age_days / MATURITY_DAYS)) # young posts have not caught up yet
    fav_count ~ Poisson(exp(log_mu) * Gamma(FAV_DISPERSION, 1 / FAV_DISPERSION))

Everything but ``quality`` and the gamma noise is visible in the metadata (tags, rating,
file_ext, created_at, is_deleted; deletion is a little likelier for low quality). up_score,
down_score, score and comment_count are drawn *from* fav_count: outcomes, not inputs.
``truth-DATE.parquet`` records ``quality`` and ``expected_log_fav`` (= ``log_mu``) per post id.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date as Date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from e6score_dagster.schema import (
    POOLS_COLUMNS,
    POSTS_COLUMNS,
    RATINGS,
    SITE_LAUNCH,
    TAG_CATEGORIES,
    TAGS_COLUMNS,
    dump_file_name,
)

CHUNK_ROWS = 50_000  # fixed, so the bytes never depend on anything but the arguments
MAX_TAGS = 1_500_000
TRUTH_SCHEMA = pa.schema(
    [("id", pa.int64()), ("quality", pa.float64()), ("expected_log_fav", pa.float64())]
)

# --- the hidden generative process (documented so model authors know what signal exists) ---
BASE_LOG_FAV = np.log(0.5)
AUDIENCE_GROWTH = 0.26  # per year: ~140x more favourites for a 2026 post than a 2007 one
MATURITY_DAYS = 7.0  # favourites saturate over ~3 weeks
QUALITY_EFFECT = 0.7
FAV_DISPERSION = 2.5  # gamma shape of the Poisson mixing (negative binomial)
DELETED_EFFECT = -0.7
RATING_PROBS = (0.4, 0.2, 0.4)
RATING_EFFECT = {"s": 0.0, "q": 0.3, "e": 0.55}
EXTS = ("jpg", "png", "gif", "webm", "mp4", "swf", "webp")
EXT_EFFECT = dict(zip(EXTS, (0.0, 0.05, 0.1, 0.3, 0.3, -0.2, 0.0), strict=True))
UPLOAD_GROWTH = 0.24  # per year: upload volume grows exponentially too

# Per tag category: share of the vocabulary, sd of the hidden effect, Zipf offset (flattens the
# head: no single artist owns 8% of the site), and per-post count distribution (see _tag_counts).
CATEGORY_SHARE = {0: 0.45, 1: 0.30, 3: 0.05, 4: 0.14, 5: 0.04, 7: 0.01, 8: 0.01}
CATEGORY_EFFECT_SD = {0: 0.08, 1: 0.7, 3: 0.25, 4: 0.3, 5: 0.15, 7: 0.08, 8: 0.15}
CATEGORY_ZIPF_OFFSET = {0: 2.0, 1: 60.0, 3: 3.0, 4: 25.0, 5: 1.0, 7: 1.0, 8: 3.0}
assert set(CATEGORY_SHARE) <= set(TAG_CATEGORIES)  # no "invalid" (6) tags are generated
ZIPF_EXPONENT = 1.05
UNUSED_TAG_SHARE = 0.02

_SEED_NAMES: dict[int, tuple[str, ...]] = {
    cat: tuple(names.split())
    for cat, names in {
        0: "anthro male female solo fur hair clothing smile tail open_mouth looking_at_viewer "
        "simple_background white_background text duo blush standing feral eyes_closed teeth "
        "tongue group english_text dialogue outside sitting :3 <3 ... 2_tails",
        1: "unknown_artist conditional_dnp anonymous_artist third-party_edit",
        3: "nintendo pokemon my_little_pony sonic_the_hedgehog_(series) disney star_fox "
        "zootopia undertale_(series)",
        4: "fan_character pikachu krystal_(star_fox) nick_wilde judy_hopps sonic_the_hedgehog "
        "rainbow_dash_(mlp)",
        5: "mammal canid canine felid feline fox wolf dragon equid domestic_dog avian bird "
        "reptile scalie lagomorph",
        7: "hi_res absurd_res digital_media_(artwork) animated comic sketch 2021 2022 2023 16:9 "
        "4k sound low_res alpha_channel",
        8: "male_(lore) female_(lore) trans_woman_(lore) gay_(lore)",
    }.items()
}  # well-known names take the top popularity ranks of their category
_NAME_SUFFIXES: dict[int, tuple[tuple[str, ...], float]] = {
    0: (("_(object)", "_(action)"), 0.02),
    1: (("_(artist)",), 0.06),
    3: (("_(series)", "_(franchise)", "_(game)"), 0.3),
    4: (("_(character)",), 0.3),
    5: (("_(species)",), 0.1),
    7: (("_(artwork)", "_(meta)"), 0.3),
    8: (("_(lore)",), 1.0),
}

_CONSONANTS = "b c d f g h j k l m n p r s t v w z br ch cr dr fl gr kr pl sh sk st th tr"
_ONSETS = ("", *_CONSONANTS.split(" "))
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "oo", "ou", "y")
_CODAS = ("", "", "n", "r", "s", "t", "l", "x", "ck", "ng", "rd", "m")

_EMOJI = ("🦊", "🐺", "✨", "❤️", "😂", "🔥", "👀", "🐉", "🌈", "💜", "👨‍👩‍👧", "🏳️‍🌈", "🙏🏽")
_FOREIGN = (
    "日本語の説明です。",
    "狐の絵",
    "커미션 감사합니다",
    "Спасибо за просмотр!",
    "¡Gracias por ver!",
    "Ça marche, café crème",
    "naïve façade",
    "Zürich: ö ä ü ß",
    "مرحبا بالجميع",
    "שלום",
    "ελληνικά",
    "Ñandú",
    "ありがとう〜",
    "中文描述，带逗号",
    "Tiếng Việt",
    "ḡ̸̛l̵̨i̷̢t̶c̵h̴",
)
_FREE_SOURCES = (
    "Commissioned by a friend, thanks!",
    "Drawn by me, 2012",
    "my sketchbook 📓",
    "Twitter (deleted)",
    "https://www.pixiv.net/ 作品",
    'from the "Winter" set',
)
_URL_TEMPLATES: tuple[tuple[str, bool, str, str], ...] = (
    # prefix, uses a user name, middle, suffix; the number goes between middle and suffix
    ("https://www.furaffinity.net/view/", False, "", "/"),
    ("https://twitter.com/", True, "/status/", ""),
    ("https://x.com/", True, "/status/", ""),
    ("https://www.deviantart.com/", True, "/art/Piece-", ""),
    ("https://inkbunny.net/s/", False, "", ""),
    ("https://www.pixiv.net/en/artworks/", False, "", ""),
    ("https://", True, ".tumblr.com/post/", ""),
    ("https://www.patreon.com/posts/", True, "-", ""),
    ("https://d.furaffinity.net/art/", True, "/", ".png"),
)
_STR = np.dtypes.StringDType()


@dataclass(frozen=True)
class Vocabulary:
    """The tag universe, indexed by alphabetical rank (tag_string is sorted by name)."""

    names: np.ndarray  # object[str], alphabetical
    ids: np.ndarray  # int64 tag id (creation order, unrelated to popularity)
    category: np.ndarray  # int64
    effect: np.ndarray  # float64 hidden effect on log favourites
    members: dict[int, np.ndarray]  # category -> alphabetical ranks of its tags
    cum_prob: dict[int, np.ndarray]  # category -> cumulative Zipf probabilities over members


@dataclass(frozen=True)
class TextPools:
    """Pre-built free text, drawn by index so the bulk of the work stays vectorised."""

    words: np.ndarray  # StringDType pseudo-words
    descriptions: np.ndarray  # object[str]
    pool_descriptions: np.ndarray  # object[str]


@dataclass(frozen=True)
class Chunk:
    """One CHUNK_ROWS slice of the dump: CSV-ready string columns plus the hidden truth."""

    posts: dict[str, list[str]]
    pools: dict[str, list[str]]
    tag_counts: np.ndarray  # per alphabetical rank
    truth: pa.Table


@dataclass
class _State:
    """Running values carried across chunks so ids stay ascending and globally consistent."""

    last_post_id: int = 0
    last_pool_id: int = 0


# ----------------------------------------------------------------------------- time helpers


def _day_us(day: str) -> int:
    """Microseconds since the Unix epoch at midnight of an ISO date."""
    return int(np.datetime64(Date.fromisoformat(day), "us").astype(np.int64))


def _format_ts(us: np.ndarray) -> np.ndarray:
    """e621 writes `2019-03-04 17:22:10.123456`, always with microseconds."""
    text = np.datetime_as_string(us.astype("datetime64[us]"), unit="us")
    return np.strings.replace(text, "T", " ")


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sort-based unique: numpy 2.4's hash-based np.unique is ~50x slower on int64 keys."""
    values = np.sort(values)
    keep = np.ones(values.size, bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _bools(mask: np.ndarray) -> list[str]:
    return np.where(mask, "t", "f").tolist()


def _ints(values: np.ndarray, present: np.ndarray | None = None) -> list[str]:
    """Integers as text; where not ``present`` the field is empty (null)."""
    text = values.astype(np.int64).astype(str)
    if present is not None:
        text = np.where(present, text, "")
    return text.tolist()


# ------------------------------------------------------------------------------ vocabulary


def _pseudo_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pronounceable lowercase words, unique, as a StringDType array."""
    syllables = np.array([o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS], _STR)
    syllables = np.unique(syllables)
    out = np.empty(0, _STR)
    while out.size < n:
        m = 2 * n
        k = rng.choice(3, size=m, p=(0.4, 0.5, 0.1)) + 1
        word = syllables[rng.integers(0, syllables.size, m)]
        for extra in (2, 3):
            more = syllables[rng.integers(0, syllables.size, m)]
            word = np.where(k >= extra, np.strings.add(word, more), word)
        word = word[np.strings.str_len(word) >= 3]
        out = np.concatenate([out, word])
        _, first = np.unique(out, return_index=True)
        out = out[np.sort(first)]
    return out[:n]


_ALL_SUFFIXES = ("", *dict.fromkeys(x for sufs, _ in _NAME_SUFFIXES.values() for x in sufs))


def _candidate_keys(rng: np.random.Generator, n_words: int, cat: int, n: int) -> np.ndarray:
    """Names as integer codes (word, word, word, suffix), so de-duplication is a cheap sort.

    Words hold no `_` and suffixes start with `_(`, so equal codes <=> equal strings.
    """
    base = n_words + 1  # word code 0 = absent
    parts = rng.choice(3, size=n, p=(0.25, 0.55, 0.2)) + 1
    w = rng.integers(0, n_words, (3, n)) + 1
    w[1, parts < 2] = 0
    w[2, parts < 3] = 0
    suffixes, share = _NAME_SUFFIXES[cat]
    codes = np.array([_ALL_SUFFIXES.index(x) for x in suffixes])
    suffix = np.where(rng.random(n) < share, codes[rng.integers(0, codes.size, n)], 0)
    return ((w[0] * base + w[1]) * base + w[2]) * len(_ALL_SUFFIXES) + suffix


def _key_names(keys: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Decode _candidate_keys codes into `word_word_(suffix)` strings (object array)."""
    base = words.size + 1
    suffix = keys % len(_ALL_SUFFIXES)
    rest = keys // len(_ALL_SUFFIXES)
    w2, rest = rest % base, rest // base
    w1, w0 = rest % base, rest // base
    plain = np.concatenate([[""], words.astype(object)])
    joined = np.concatenate([[""], "_" + words.astype(object)])
    return plain[w0] + joined[w1] + joined[w2] + np.array(_ALL_SUFFIXES, dtype=object)[suffix]


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
    return {c: _SEED_NAMES[c][: max(1, n // 3)] for c, n in sizes.items()}


def _tag_names(
    rng: np.random.Generator, words: np.ndarray, sizes: dict[int, int]
) -> dict[int, np.ndarray]:
    """Unique names per category: well-known seed names first, then generated ones."""
    seeds = _category_seeds(sizes)
    taken = {x for names in seeds.values() for x in names}
    factor = 1.6
    while True:
        keys = [_candidate_keys(rng, words.size, c, int(n * factor) + 20) for c, n in sizes.items()]
        labels = np.concatenate([np.full(k.size, c) for k, c in zip(keys, sizes, strict=True)])
        allkeys = np.concatenate(keys)
        keep = _first_occurrence(allkeys)
        out = {}
        for c, n in sizes.items():
            need = n - len(seeds[c])
            cand = allkeys[keep & (labels == c)][: need + 50]
            names = _key_names(cand, words)
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


def build_vocabulary(seed: int, n_tags: int) -> Vocabulary:
    """The tag universe: names, categories, popularity and hidden effects."""
    rng = np.random.default_rng([seed, 0])
    words = _pseudo_words(rng, max(4000, min(n_tags // 4, 200_000)))
    sizes = _category_sizes(n_tags)
    by_cat = _tag_names(rng, words, sizes)
    seeds = _category_seeds(sizes)
    names = np.concatenate([by_cat[c] for c in sizes])
    cats = np.concatenate([np.full(sizes[c], c) for c in sizes])
    effect = np.concatenate([rng.normal(0.0, CATEGORY_EFFECT_SD[c], sizes[c]) for c in sizes])
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
    return Vocabulary(
        names=names[order],
        ids=ids[order],
        category=cats[order],
        effect=effect[order],
        members=members,
        cum_prob=cum,
    )


# ------------------------------------------------------------------------------ free text


def _sentence(rng: np.random.Generator, words: np.ndarray) -> str:
    picked = [str(w) for w in words[rng.integers(0, words.size, rng.integers(3, 12))]]
    for i in range(1, len(picked)):
        if rng.random() < 0.15:
            picked[i - 1] += ","
    picked[0] = picked[0].capitalize()
    return " ".join(picked) + str(rng.choice([".", "!", "?", "...", " :3"]))


def _description(rng: np.random.Generator, words: np.ndarray) -> str:
    """One description with the quirks that break naive CSV readers."""
    parts = [_sentence(rng, words) for _ in range(rng.integers(1, 4))]
    roll = rng.random(8)
    if roll[0] < 0.3:
        parts.append(f'He said "{_sentence(rng, words)}" and left')
    if roll[1] < 0.25:
        parts.insert(0, f"[b]{_sentence(rng, words)}[/b]")
    if roll[2] < 0.25:
        parts.append(str(rng.choice(_EMOJI)) * int(rng.integers(1, 4)))
    if roll[3] < 0.25:
        parts.append(str(rng.choice(_FOREIGN)))
    if roll[4] < 0.15:
        parts.append(f"Commissioned, see https://example.org/{rng.integers(1, 10**6)}?a=1,b=2")
    if roll[5] < 0.05:
        parts.insert(0, '"Quoted opening," she wrote')
    if roll[6] < 0.05:
        parts.append("N/A\tpath\\to\\file")
    sep = str(rng.choice(["\n", "\r\n", "\n\n", " ", " "]))
    text = sep.join(parts)
    return text[:500].removesuffix("\r")  # a bare CR would not be quoted by csv


def build_text_pools(seed: int) -> TextPools:
    """Small per-seed pools of descriptions; the posts draw from them by index."""
    rng = np.random.default_rng([seed, 1])
    words = _pseudo_words(rng, 4000)
    descriptions = [_description(rng, words) for _ in range(3000)]
    pool_desc = [_description(rng, words) for _ in range(500)]
    return TextPools(
        words=words,
        descriptions=np.array(descriptions, dtype=object),
        pool_descriptions=np.array(pool_desc, dtype=object),
    )


def _urls(rng: np.random.Generator, words: np.ndarray, n: int) -> np.ndarray:
    """One plausible source URL per row, vectorised over templates."""
    t = rng.integers(0, len(_URL_TEMPLATES), n)
    pick = np.array([[p, m, s] for p, _, m, s in _URL_TEMPLATES], _STR)[t]
    uses_user = np.array([u for _, u, _, _ in _URL_TEMPLATES])[t]
    user = np.where(uses_user, words[rng.integers(0, words.size, n)], "")
    num = rng.integers(10**5, 10**12, n).astype(_STR)
    url = np.strings.add(np.strings.add(pick[:, 0], user), pick[:, 1])
    return np.strings.add(np.strings.add(url, num), pick[:, 2])


def _sources(rng: np.random.Generator, words: np.ndarray, n: int) -> list[str]:
    """Empty, one URL, or several URLs separated by newlines (quoted multi-line fields)."""
    k = rng.choice(4, size=n, p=(0.25, 0.45, 0.22, 0.08))
    out = _urls(rng, words, n)
    for extra in (2, 3):
        more = np.strings.add("\n", _urls(rng, words, n))
        out = np.where(k >= extra, np.strings.add(out, more), out)
    free = np.array(_FREE_SOURCES, _STR)[rng.integers(0, len(_FREE_SOURCES), n)]
    out = np.where(rng.random(n) < 0.01, free, out)
    return np.where(k == 0, "", out).tolist()


# -------------------------------------------------------------------------------- posts


def _creation_times(
    rng: np.random.Generator, lo: int, hi: int, total: int, span: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified inverse-CDF draws of an exponentially growing upload rate: sorted by row."""
    start_us, end_us = span
    years = (end_us - start_us) / (365.25 * 86400e6)
    u = (np.arange(lo, hi) + rng.random(hi - lo)) / total
    t_years = np.log1p(u * np.expm1(UPLOAD_GROWTH * years)) / UPLOAD_GROWTH
    created = start_us + np.minimum(t_years * 365.25 * 86400e6, end_us - start_us - 1)
    return created.astype(np.int64), u


def _post_ids(rng: np.random.Generator, n: int, state: _State) -> np.ndarray:
    """Ascending ids with gaps (deleted/destroyed posts), so id != row number."""
    gaps = 1 + np.where(rng.random(n) < 0.08, rng.geometric(0.15, n), 0)
    ids = state.last_post_id + np.cumsum(gaps)
    state.last_post_id = int(ids[-1])
    return ids


def _file_ext(rng: np.random.Generator, year: np.ndarray) -> np.ndarray:
    """Format mix that shifts with time (flash dies, webm/mp4/webp arrive)."""
    n = year.size
    p = np.zeros((n, len(EXTS)))
    p[:, 1] = 0.2 + 0.015 * year  # png
    p[:, 2] = 0.04  # gif
    p[:, 3] = np.where(year > 7.5, 0.05, 0.0)  # webm
    p[:, 4] = np.where(year > 15, 0.03, 0.0)  # mp4
    p[:, 5] = np.where(year < 5, 0.04, np.where(year < 14, 0.005, 0.0))  # swf
    p[:, 6] = np.where(year > 16, 0.015, 0.0)  # webp
    p[:, 0] = 1.0 - p[:, 1:].sum(axis=1)  # jpg
    cum = np.cumsum(p, axis=1)
    idx = (rng.random(n)[:, None] > cum).sum(axis=1)
    return np.array(EXTS)[np.minimum(idx, len(EXTS) - 1)]


def _media(rng: np.random.Generator, ext: np.ndarray, year: np.ndarray) -> dict[str, list[str]]:
    """Image size, file size and duration, consistent with the format."""
    n = ext.size
    video = np.isin(ext, ("webm", "mp4"))
    width = np.exp(rng.normal(np.log(800) + 0.06 * year, 0.45)).clip(50, 12000)
    height = (width * np.exp(rng.normal(0.1, 0.3, n))).clip(50, 15000)
    video_w = np.array([640, 1280, 1920, 3840])[rng.choice(4, n, p=(0.2, 0.4, 0.35, 0.05))]
    width = np.where(video, video_w, width).round()
    height = np.where(video, (video_w * 9) // 16, height).round()
    duration = np.where(video, np.exp(rng.normal(np.log(15), 1.0, n)).clip(0.5, 3600), 0.0)
    duration = np.where(
        ext == "gif", np.exp(rng.normal(np.log(3), 0.8, n)).clip(0.1, 120), duration
    )
    bpp = np.select(
        [ext == "jpg", ext == "png", ext == "gif", ext == "webp"], [0.35, 1.2, 2, 0.2], 0
    )
    size = width * height * bpp + np.where(video, duration * 5e5, 0) + (ext == "swf") * 2e6
    size = (size * np.exp(rng.normal(0, 0.4, n))).clip(1000, 1e9)
    has_duration = video | (ext == "gif")
    return {
        "image_width": _ints(width),
        "image_height": _ints(height),
        "file_size": _ints(size),
        "duration": np.where(has_duration, np.char.mod("%.3f", duration), "").tolist(),
    }


def _md5(rng: np.random.Generator, n: int) -> list[str]:
    hexes = rng.bytes(16 * n).hex().encode("ascii")
    return np.frombuffer(hexes, dtype="S32").astype(str).tolist()


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


def _draw_tags(
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
    uniq = _sorted_unique(np.concatenate(keys))
    return uniq // n_tags, uniq % n_tags


def _tag_strings(vocab: Vocabulary, rows: np.ndarray, ranks: np.ndarray, n: int) -> list[str]:
    tokens = vocab.names[ranks].tolist()
    bounds = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).tolist()
    return [" ".join(tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _locked_tags(rng: np.random.Generator, vocab: Vocabulary, n: int) -> list[str]:
    """Mostly empty; a few posts lock one or two popular tags (sometimes as removals)."""
    popular = vocab.names[vocab.members[0][:30]].astype(str).astype(_STR)
    first = popular[rng.integers(0, popular.size, n)]
    first = np.where(rng.random(n) < 0.3, np.strings.add("-", first), first)
    second = np.strings.add(" ", popular[rng.integers(0, popular.size, n)])
    out = np.where(rng.random(n) < 0.3, np.strings.add(first, second), first)
    return np.where(rng.random(n) < 0.015, out, "").tolist()


def _parent_ids(rng: np.random.Generator, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """About 8% of posts point at an earlier post of the same chunk (always a real id)."""
    n = ids.size
    j = np.arange(n) - rng.geometric(0.3, n)
    present = (rng.random(n) < 0.08) & (j >= 0)
    return ids[np.maximum(j, 0)], present


def _expected_log_fav(
    *,
    years: np.ndarray,
    age_days: np.ndarray,
    rating: np.ndarray,
    ext: np.ndarray,
    tag_effect: np.ndarray,
    deleted: np.ndarray,
    quality: np.ndarray,
) -> np.ndarray:
    """The noiseless log-mean of fav_count: see the module docstring."""
    rating_eff = np.select([rating == r for r in RATINGS], [RATING_EFFECT[r] for r in RATINGS])
    ext_eff = np.select([ext == e for e in EXTS], [EXT_EFFECT[e] for e in EXTS])
    maturity = np.log(-np.expm1(-np.maximum(age_days, 1e-4) / MATURITY_DAYS))
    return (
        BASE_LOG_FAV
        + AUDIENCE_GROWTH * years
        + rating_eff
        + ext_eff
        + tag_effect
        + DELETED_EFFECT * deleted
        + QUALITY_EFFECT * quality
        + maturity
    )


def _engagement(rng: np.random.Generator, log_mu: np.ndarray, rating: np.ndarray) -> dict:
    """fav_count around log_mu (negative binomial); votes and comments follow favourites."""
    n = log_mu.size
    lam = np.exp(log_mu) * rng.gamma(FAV_DISPERSION, 1.0 / FAV_DISPERSION, n)
    fav = rng.poisson(lam)
    up = rng.poisson(0.8 * fav * np.exp(rng.normal(0, 0.3, n)) + 0.3)
    down = -rng.poisson(0.02 * up + 0.05 + 0.15 * (rating == "e"))
    comments = rng.poisson(0.015 * fav * np.exp(rng.normal(0, 0.5, n)) + 0.2)
    return {
        "fav_count": _ints(fav),
        "up_score": _ints(up),
        "down_score": _ints(down),
        "score": _ints(up + down),
        "comment_count": _ints(comments),
    }


def _pools(
    rng: np.random.Generator,
    text: TextPools,
    ids: np.ndarray,
    created: np.ndarray,
    state: _State,
    end_us: int,
    uploader: np.ndarray,
) -> dict[str, list[str]]:
    """Pools (comics, series) of a few nearby posts of this chunk; post_ids like `{1,2,3}`."""
    n = ids.size
    m = int(rng.binomial(n, 1 / 120)) if n > 2 else 0
    starts = np.sort(rng.integers(0, max(1, n - 2), m))  # pool ids follow creation
    sizes = np.minimum(2 + rng.geometric(0.25, m), 40)
    pool_ids = state.last_pool_id + np.cumsum(1 + np.where(rng.random(m) < 0.1, 3, 0))
    state.last_pool_id = int(pool_ids[-1]) if m else state.last_pool_id
    members, first, last = [], np.empty(m, np.int64), np.empty(m, np.int64)
    for i, (s, k) in enumerate(zip(starts.tolist(), sizes.tolist(), strict=True)):
        idx = _sorted_unique(np.minimum(s + np.cumsum(rng.integers(1, 4, k)) - 1, n - 1))
        members.append("{" + ",".join(map(str, ids[idx].tolist())) + "}")
        first[i], last[i] = idx[0], idx[-1]
    first_created = created[first]
    updated = np.minimum(
        created[last] + rng.exponential(30 * 86400e6, m).astype(np.int64), end_us - 1
    )
    name_parts = [
        np.strings.capitalize(text.words[rng.integers(0, text.words.size, m)]) for _ in range(3)
    ]
    name = np.strings.add(np.strings.add(name_parts[0], "_"), name_parts[1])
    name = np.where(
        rng.random(m) < 0.5, np.strings.add(np.strings.add(name, "_"), name_parts[2]), name
    )
    name = np.where(rng.random(m) < 0.05, np.strings.add(name, ",_Part_2_🦊"), name)
    desc_pick = text.pool_descriptions[rng.integers(0, text.pool_descriptions.size, m)]
    return {
        "id": _ints(pool_ids),
        "name": name.tolist(),
        "created_at": _format_ts(first_created).tolist(),
        "updated_at": _format_ts(np.maximum(updated, first_created)).tolist(),
        "creator_id": _ints(uploader[first]),
        "description": np.where(rng.random(m) < 0.5, desc_pick, "").tolist(),
        "is_active": _bools(rng.random(m) < 0.8),
        "category": np.where(rng.random(m) < 0.7, "series", "collection").tolist(),
        "post_ids": members,
    }


def _make_chunk(
    lo: int,
    hi: int,
    total: int,
    seed: int,
    span: tuple[int, int],
    vocab: Vocabulary,
    text: TextPools,
    state: _State,
) -> Chunk:
    """Rows [lo, hi) of the dump; everything vectorised over the chunk."""
    rng = np.random.default_rng([seed, 2, lo // CHUNK_ROWS])
    n = hi - lo
    start_us, end_us = span
    created, u = _creation_times(rng, lo, hi, total, span)
    years = (created - start_us) / (365.25 * 86400e6)
    age_days = (end_us - created) / 86400e6
    ids = _post_ids(rng, n, state)
    rating = np.array(RATINGS)[rng.choice(3, size=n, p=RATING_PROBS)]
    ext = _file_ext(rng, years)
    quality = rng.normal(0.0, 1.0, n)
    empty = rng.random(n) < 0.0008
    if lo == 0 and n > 13:
        empty[13] = True  # every dump has at least one post with an empty tag_string
    rows, ranks = _draw_tags(rng, vocab, n, empty)
    tag_effect = np.bincount(rows, weights=vocab.effect[ranks], minlength=n)
    deleted = rng.random(n) < 0.05 * np.exp(-0.5 * quality - 0.125)
    pending = ~deleted & (rng.random(n) < np.where(age_days < 3, 0.5, 0.0005))
    log_mu = _expected_log_fav(
        years=years,
        age_days=age_days,
        rating=rating,
        ext=ext,
        tag_effect=tag_effect,
        deleted=deleted,
        quality=quality,
    )
    updated = created + np.where(
        rng.random(n) < 0.15, 0, rng.exponential(60 * 86400e6, n).astype(np.int64)
    )
    updated = np.maximum(np.minimum(updated, end_us - 1), created)
    uploader = np.where(
        rng.random(n) < 0.3,
        1 + np.minimum(rng.zipf(1.3, n), 2000) * 37,
        1 + (50 + 1.6e6 * u * rng.random(n)).astype(np.int64),
    )
    parent, has_parent = _parent_ids(rng, ids)
    approver = 1 + rng.integers(0, 300, n) * 113
    has_approver = ~pending & (rng.random(n) < 0.65)
    desc = text.descriptions[rng.integers(0, text.descriptions.size, n)]
    posts = {
        "id": _ints(ids),
        "uploader_id": _ints(uploader),
        "created_at": _format_ts(created).tolist(),
        "md5": _md5(rng, n),
        "source": _sources(rng, text.words, n),
        "rating": rating.tolist(),
        "tag_string": _tag_strings(vocab, rows, ranks, n),
        "locked_tags": _locked_tags(rng, vocab, n),
        "file_ext": ext.tolist(),
        "parent_id": _ints(parent, has_parent),
        "change_seq": _ints(ids * 8 + rng.integers(0, 8, n)),
        "approver_id": _ints(approver, has_approver),
        "description": np.where(rng.random(n) < 0.3, desc, "").tolist(),
        "updated_at": _format_ts(updated).tolist(),
        "is_deleted": _bools(deleted),
        "is_pending": _bools(pending),
        "is_flagged": _bools(rng.random(n) < 0.002),
        "is_rating_locked": _bools(rng.random(n) < 0.03),
        "is_status_locked": _bools(rng.random(n) < 0.005),
        "is_note_locked": _bools(rng.random(n) < 0.001),
        **_media(rng, ext, years),
        **_engagement(rng, log_mu, rating),
    }
    truth = pa.table(
        {"id": ids.astype(np.int64), "quality": quality, "expected_log_fav": log_mu},
        schema=TRUTH_SCHEMA,
    )
    pools = _pools(rng, text, ids, created, state, end_us, uploader)
    counts = np.bincount(ranks, minlength=vocab.names.size)
    return Chunk(
        posts={c: posts[c] for c in POSTS_COLUMNS}, pools=pools, tag_counts=counts, truth=truth
    )


def default_n_tags(posts: int) -> int:
    """Vocabulary size scaling with the dump, like e621's (~1M tags for ~6M posts)."""
    return min(MAX_TAGS, max(2000, posts // 5))


def iter_chunks(
    posts: int, date: str, seed: int = 0, n_tags: int | None = None
) -> tuple[Vocabulary, Iterator[Chunk]]:
    """The vocabulary and a lazy stream of chunks; tests compare parsed CSVs against these."""
    if posts < 1:
        raise ValueError("posts must be >= 1")
    end_us = _day_us(date)
    start_us = _day_us(SITE_LAUNCH)
    if end_us <= start_us:
        raise ValueError(f"dump date {date} is before the site launch {SITE_LAUNCH}")
    n_tags = default_n_tags(posts) if n_tags is None else n_tags
    if not 100 <= n_tags <= MAX_TAGS:
        raise ValueError(f"n_tags must be in [100, {MAX_TAGS}]")
    vocab = build_vocabulary(seed, n_tags)
    text = build_text_pools(seed)
    state = _State()

    def chunks() -> Iterator[Chunk]:
        for lo in range(0, posts, CHUNK_ROWS):
            hi = min(posts, lo + CHUNK_ROWS)
            yield _make_chunk(lo, hi, posts, seed, (start_us, end_us), vocab, text, state)

    return vocab, chunks()


# ------------------------------------------------------------------------------- writing


_CSV_BATCH = 5000


class _CsvGz:
    """Deterministic gzip (mtime 0, no file name) CSV writer with Python csv conventions.

    Compression runs on one background thread (zlib releases the GIL), overlapping the next
    chunk's generation; at most one chunk waits, so memory stays bounded and order is kept.
    """

    def __init__(self, path: Path, header: tuple[str, ...]) -> None:
        self._raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=4
        )
        self._header = header
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None
        self.write({c: [c] for c in header})

    def write(self, columns: dict[str, list[str]]) -> None:
        rows = list(zip(*(columns[c] for c in self._header), strict=True))
        parts = []
        for lo in range(0, len(rows), _CSV_BATCH):  # small StringIOs: they hold 4 bytes/char
            buf = io.StringIO()
            writer = csv.writer(
                buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL, doublequote=True
            )
            writer.writerows(rows[lo : lo + _CSV_BATCH])
            parts.append(buf.getvalue().encode("utf-8"))
        data = b"".join(parts)
        self._wait()
        self._pending = self._pool.submit(self._gz.write, data)

    def __enter__(self) -> _CsvGz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self._wait()
        self._pool.shutdown()
        self._gz.close()
        self._raw.close()


def _tags_columns(vocab: Vocabulary, counts: np.ndarray) -> dict[str, list[str]]:
    order = np.argsort(vocab.ids)
    return {
        "id": _ints(vocab.ids[order]),
        "name": vocab.names[order].tolist(),
        "category": _ints(vocab.category[order]),
        "post_count": _ints(counts[order]),
    }


def generate_dump(
    out_dir: Path, posts: int, date: str, seed: int = 0, n_tags: int | None = None
) -> dict[str, Path]:
    """Write posts/tags/pools CSV.gz files and the truth parquet; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "posts": out_dir / dump_file_name("posts", date),
        "tags": out_dir / dump_file_name("tags", date),
        "pools": out_dir / dump_file_name("pools", date),
        "truth": out_dir / f"truth-{date}.parquet",
    }
    vocab, chunks = iter_chunks(posts, date, seed, n_tags)
    counts = np.zeros(vocab.names.size, np.int64)
    with (
        _CsvGz(paths["posts"], POSTS_COLUMNS) as posts_out,
        _CsvGz(paths["pools"], POOLS_COLUMNS) as pools_out,
        pq.ParquetWriter(paths["truth"], TRUTH_SCHEMA) as truth_out,
    ):
        for chunk in chunks:
            posts_out.write(chunk.posts)
            pools_out.write(chunk.pools)
            truth_out.write_table(chunk.truth)
            counts += chunk.tag_counts
    with _CsvGz(paths["tags"], TAGS_COLUMNS) as tags_out:  # post_count needs every chunk first
        tags_out.write(_tags_columns(vocab, counts))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, required=True)
    parser.add_argument("--date", required=True, help="dump date, YYYY-MM-DD")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tags", type=int, default=None, help="vocabulary size")
    args = parser.parse_args(argv)
    paths = generate_dump(args.out, args.posts, args.date, args.seed, args.tags)
    for kind, path in paths.items():
        print(f"{kind}\t{path}\t{path.stat().st_size}")


if __name__ == "__main__":
    main()
