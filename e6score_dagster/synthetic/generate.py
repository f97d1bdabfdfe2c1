"""Posts, pools and the hidden truth, chunk by chunk; the dump files written from them."""

from __future__ import annotations

from collections.abc import Iterator
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
    TAGS_COLUMNS,
    dump_file_name,
)
from e6score_dagster.synthetic import process
from e6score_dagster.synthetic.csv_writer import CsvGz, bools, format_ts, ints, md5
from e6score_dagster.synthetic.names import TextPools, build_text_pools, sources
from e6score_dagster.synthetic.oracle import Oracle
from e6score_dagster.synthetic.tags import (
    Vocabulary,
    build_vocabulary,
    draw_tags,
    locked_tags,
    sorted_unique,
    tag_effects,
    tag_strings,
)
from e6score_dagster.synthetic.worlds import DEFAULT_WORLD, EXTS, World, get_world

CHUNK_ROWS = 50_000  # fixed, so the bytes never depend on anything but the arguments
MAX_TAGS = 1_500_000
TRUTH_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("quality", pa.float64()),  # hidden, N(0, 1)
        ("expected_log_fav", pa.float64()),  # log_mu: log-mean of fav_count given quality
        ("oracle_mean", pa.float64()),  # E[log1p(fav_count) | metadata]
        ("oracle_sd", pa.float64()),  # sd of log1p(fav_count) given metadata
        ("oracle_score", pa.float64()),  # P(fav_count <= observed | metadata)
    ]
)
RATING_PROBS = (0.4, 0.2, 0.4)
UPLOAD_GROWTH = 0.24  # per year: upload volume grows exponentially


@dataclass(frozen=True)
class Hidden:
    """Per post, what the hidden log-mean is made of: the part every learner can pin down
    (audience, recency, rating, file type, deletion) and the entities whose effects are hidden
    (tags, their rating and trend interactions, the uploader). `synthetic.reference` fits the
    latter knowing only the world's priors."""

    known: np.ndarray  # visible log-mean minus the entities' effects
    group: np.ndarray  # noise group
    deleted: np.ndarray
    rating: np.ndarray  # rating index
    years: np.ndarray  # upload time in years since launch
    uploader: np.ndarray
    tag_rows: np.ndarray  # (post row, alphabetical rank) pairs of the chunk's tags
    tag_ranks: np.ndarray


@dataclass(frozen=True)
class Chunk:
    """One CHUNK_ROWS slice of the dump: CSV-ready string columns plus the hidden truth."""

    posts: dict[str, list[str]]
    pools: dict[str, list[str]]
    tag_counts: np.ndarray  # per alphabetical rank
    truth: pa.Table
    hidden: Hidden


@dataclass
class _State:
    """Running values carried across chunks so ids stay ascending and globally consistent."""

    last_post_id: int = 0
    last_pool_id: int = 0


# ----------------------------------------------------------------------------- time helpers


def _day_us(day: str) -> int:
    """Microseconds since the Unix epoch at midnight of an ISO date."""
    return int(np.datetime64(Date.fromisoformat(day), "us").astype(np.int64))


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
        "image_width": ints(width),
        "image_height": ints(height),
        "file_size": ints(size),
        "duration": np.where(has_duration, np.char.mod("%.3f", duration), "").tolist(),
    }


def _parent_ids(rng: np.random.Generator, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """About 8% of posts point at an earlier post of the same chunk (always a real id)."""
    n = ids.size
    j = np.arange(n) - rng.geometric(0.3, n)
    present = (rng.random(n) < 0.08) & (j >= 0)
    return ids[np.maximum(j, 0)], present


def _engagement(rng: np.random.Generator, fav: np.ndarray, rating: np.ndarray) -> dict:
    """Votes and comments follow favourites: outcomes, never inputs."""
    n = fav.size
    up = rng.poisson(0.8 * fav * np.exp(rng.normal(0, 0.3, n)) + 0.3)
    down = -rng.poisson(0.02 * up + 0.05 + 0.15 * (rating == "e"))
    comments = rng.poisson(0.015 * fav * np.exp(rng.normal(0, 0.5, n)) + 0.2)
    return {
        "fav_count": ints(fav),
        "up_score": ints(up),
        "down_score": ints(down),
        "score": ints(up + down),
        "comment_count": ints(comments),
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
        idx = sorted_unique(np.minimum(s + np.cumsum(rng.integers(1, 4, k)) - 1, n - 1))
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
        "id": ints(pool_ids),
        "name": name.tolist(),
        "created_at": format_ts(first_created).tolist(),
        "updated_at": format_ts(np.maximum(updated, first_created)).tolist(),
        "creator_id": ints(uploader[first]),
        "description": np.where(rng.random(m) < 0.5, desc_pick, "").tolist(),
        "is_active": bools(rng.random(m) < 0.8),
        "category": np.where(rng.random(m) < 0.7, "series", "collection").tolist(),
        "post_ids": members,
    }


@dataclass(frozen=True)
class _Setup:
    """What every chunk shares: the world, its tag universe, text and hidden tables."""

    seed: int
    span: tuple[int, int]  # microseconds: site launch, dump date
    world: World
    vocab: Vocabulary
    text: TextPools
    uploader_effect: np.ndarray
    oracle: Oracle


def _make_chunk(lo: int, hi: int, total: int, setup: _Setup, state: _State) -> Chunk:
    """Rows [lo, hi) of the dump; everything vectorised over the chunk."""
    world, vocab, text = setup.world, setup.vocab, setup.text
    rng = np.random.default_rng([setup.seed, 2, lo // CHUNK_ROWS])
    n = hi - lo
    start_us, end_us = setup.span
    created, u = _creation_times(rng, lo, hi, total, setup.span)
    years = (created - start_us) / (365.25 * 86400e6)
    age_days = (end_us - created) / 86400e6
    ids = _post_ids(rng, n, state)
    rating = np.array(RATINGS)[rng.choice(3, size=n, p=RATING_PROBS)]
    ext = _file_ext(rng, years)
    quality = rng.normal(0.0, 1.0, n)
    empty = rng.random(n) < 0.0008
    if lo == 0 and n > 13:
        empty[13] = True  # every dump has at least one post with an empty tag_string
    rows, ranks = draw_tags(rng, vocab, n, empty)
    deleted = rng.random(n) < process.deletion_probability(world, quality)
    pending = ~deleted & (rng.random(n) < np.where(age_days < 3, 0.5, 0.0005))
    updated = created + np.where(
        rng.random(n) < 0.15, 0, rng.exponential(60 * 86400e6, n).astype(np.int64)
    )
    updated = np.maximum(np.minimum(updated, end_us - 1), created)
    uploader = process.uploader_ids(rng, world, u)
    parent, has_parent = _parent_ids(rng, ids)
    approver = 1 + rng.integers(0, 300, n) * 113
    has_approver = ~pending & (rng.random(n) < 0.65)
    desc = text.descriptions[rng.integers(0, text.descriptions.size, n)]
    posts = {
        "id": ints(ids),
        "uploader_id": ints(uploader),
        "created_at": format_ts(created).tolist(),
        "md5": md5(rng, n),
        "source": sources(rng, text.words, n),
        "rating": rating.tolist(),
        "tag_string": tag_strings(vocab, rows, ranks, n),
        "locked_tags": locked_tags(rng, vocab, n),
        "file_ext": ext.tolist(),
        "parent_id": ints(parent, has_parent),
        "change_seq": ints(ids * 8 + rng.integers(0, 8, n)),
        "approver_id": ints(approver, has_approver),
        "description": np.where(rng.random(n) < 0.3, desc, "").tolist(),
        "updated_at": format_ts(updated).tolist(),
        "is_deleted": bools(deleted),
        "is_pending": bools(pending),
        "is_flagged": bools(rng.random(n) < 0.002),
        "is_rating_locked": bools(rng.random(n) < 0.03),
        "is_status_locked": bools(rng.random(n) < 0.005),
        "is_note_locked": bools(rng.random(n) < 0.001),
        **_media(rng, ext, years),
    }
    # the hidden process: everything below but quality and the count noise is visible
    effect = tag_effects(vocab, rows, ranks, process.rating_index(rating), years)
    if world.uploader_effect_sd:
        effect = effect + setup.uploader_effect[uploader % process.UPLOADER_TABLE]
    visible = process.visible_log_mu(
        world, years=years, rating=rating, ext=ext, tag_effect=effect, deleted=deleted
    )
    group = process.noise_group(rating, ext)
    rec = process.recency(world, age_days)
    log_mu = process.log_mu(world, visible, quality, group, rec)
    fav = process.draw_fav_count(rng, world, log_mu, group)
    posts.update(_engagement(rng, fav, rating))
    m = visible + rec
    hidden = Hidden(m - effect, group, deleted, process.rating_index(rating), years, uploader,
                    rows, ranks)
    oracle_mean, oracle_sd = setup.oracle.moments(m, group, deleted)
    truth = pa.table(
        {
            "id": ids.astype(np.int64),
            "quality": quality,
            "expected_log_fav": log_mu,
            "oracle_mean": oracle_mean,
            "oracle_sd": oracle_sd,
            "oracle_score": setup.oracle.cdf(fav, m, group, deleted),
        },
        schema=TRUTH_SCHEMA,
    )
    pools = _pools(rng, text, ids, created, state, end_us, uploader)
    counts = np.bincount(ranks, minlength=vocab.names.size)
    return Chunk(
        posts={c: posts[c] for c in POSTS_COLUMNS},
        pools=pools,
        tag_counts=counts,
        truth=truth,
        hidden=hidden,
    )


def default_n_tags(posts: int, world: str | World = DEFAULT_WORLD) -> int:
    """Vocabulary size scaling with the dump, like e621's (~1M tags for ~6M posts)."""
    return min(MAX_TAGS, max(2000, int(posts // get_world(world).posts_per_tag)))


def iter_chunks(
    posts: int,
    date: str,
    seed: int = 0,
    n_tags: int | None = None,
    world: str | World = DEFAULT_WORLD,
) -> tuple[Vocabulary, Iterator[Chunk]]:
    """The vocabulary and a lazy stream of chunks; tests compare parsed CSVs against these."""
    world = get_world(world)
    if posts < 1:
        raise ValueError("posts must be >= 1")
    end_us = _day_us(date)
    start_us = _day_us(SITE_LAUNCH)
    if end_us <= start_us:
        raise ValueError(f"dump date {date} is before the site launch {SITE_LAUNCH}")
    n_tags = default_n_tags(posts, world) if n_tags is None else n_tags
    if not 100 <= n_tags <= MAX_TAGS:
        raise ValueError(f"n_tags must be in [100, {MAX_TAGS}]")
    vocab = build_vocabulary(seed, n_tags, world)
    setup = _Setup(
        seed=seed,
        span=(start_us, end_us),
        world=world,
        vocab=vocab,
        text=build_text_pools(seed),
        uploader_effect=process.uploader_effects(seed, world),
        oracle=Oracle(world),
    )
    state = _State()

    def chunks() -> Iterator[Chunk]:
        for lo in range(0, posts, CHUNK_ROWS):
            yield _make_chunk(lo, min(posts, lo + CHUNK_ROWS), posts, setup, state)

    return vocab, chunks()


# ------------------------------------------------------------------------------- writing


def _tags_columns(vocab: Vocabulary, counts: np.ndarray) -> dict[str, list[str]]:
    order = np.argsort(vocab.ids)
    return {
        "id": ints(vocab.ids[order]),
        "name": vocab.names[order].tolist(),
        "category": ints(vocab.category[order]),
        "post_count": ints(counts[order]),
    }


def generate_dump(
    out_dir: Path,
    posts: int,
    date: str,
    seed: int = 0,
    n_tags: int | None = None,
    world: str | World = DEFAULT_WORLD,
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
    vocab, chunks = iter_chunks(posts, date, seed, n_tags, world)
    counts = np.zeros(vocab.names.size, np.int64)
    with (
        CsvGz(paths["posts"], POSTS_COLUMNS) as posts_out,
        CsvGz(paths["pools"], POOLS_COLUMNS) as pools_out,
        pq.ParquetWriter(paths["truth"], TRUTH_SCHEMA) as truth_out,
    ):
        for chunk in chunks:
            posts_out.write(chunk.posts)
            pools_out.write(chunk.pools)
            truth_out.write_table(chunk.truth)
            counts += chunk.tag_counts
    with CsvGz(paths["tags"], TAGS_COLUMNS) as tags_out:  # post_count needs every chunk first
        tags_out.write(_tags_columns(vocab, counts))
    return paths
