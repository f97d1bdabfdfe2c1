"""The additive candidates fitted exactly: a Gaussian-prior (ridge) solve with empirical-Bayes
prior scales per group of tags.

Stochastic gradient descent with early stopping fits the additive model badly: Adam moves a
rare tag's effect as fast as a common one's, so the stopping step, not the data, decides how
much each tag is shrunk. This module solves the same model (`network.LinearNet`'s parameters)
exactly instead. The prior on a tag effect is N(0, tau_g^2), with one tau per group: the tag's
e621 category crossed with dense (own row) or hashed (long tail). Each tau is re-estimated from
the fit (MacKay's evidence update, with the diagonal of the posterior precision): artists get a
wide prior and general tags a narrow one *because the data says so*, in every world, with no
tuned per-category constant. Each solve is a conjugate-gradient run on the normal equations
over a sparse design (scipy), warm-started from the previous round, preconditioned by the
inverse of the Gram matrix's blocks of nested columns (`_GramBlocks`) and its diagonal.

The linear baseline is the same solve with one group for all tags (a plain ridge whose penalty
is still chosen by the evidence, not by hand).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from scipy.sparse import _sparsetools
from scipy.sparse.linalg import LinearOperator, cg

from e6score_dagster.memory import release_memory
from e6score_dagster.model import sparse_ops, spill
from e6score_dagster.model.config import ModelConfig
from e6score_dagster.model.data import Batch, FeatureLayout, ParquetBatches
from e6score_dagster.model.network import (
    CATEGORY_CODES,
    LINK_KNOTS,
    SPREAD_FEATURES,
    UPLOADER_CATEGORY,
    effect_rows,
    gaussian_nll,
    interaction_rows,
    interaction_terms,
    link_features,
    long_tail,
    metadata_features,
    scale_features,
)
from e6score_dagster.model.train import (
    Log,
    TrainResult,
    calibrate_scale,
    init_params,
    predict_rows,
)
from e6score_dagster.schema import TAG_CATEGORIES

ENCODE_CHUNK = 65536  # posts per chunk when hashing tag codes into effect rows
LINK_CHUNK = 4 * ENCODE_CHUNK  # posts per slice of the link's and metadata's passes
CHUNKS_PER_BLOCK = 4  # chunks a block holds where no split decides (bounds the build's copy)
ENCODE_AHEAD = 4  # chunks encoded at once at most (bounds the build's transients)
PIECE_ROWS = 1 << 17  # rows per task of the threaded products (views of a block)
# A design larger than this (estimated from its first chunk) lives in a spill file beside the
# feature matrix instead of the heap (`spill.py`): at 6M posts it is 2.8 GB.
SPILL_BYTES = 1 << 30
METADATA_PRIOR = 1.0  # precision on the (standardised) metadata weights: nearly flat
LAMBDA_RANGE = (1e-2, 1e6)  # bounds of a group's prior precision, in units of the noise
ROUND_REDUCTION = 0.1  # each solve cuts its starting residual at least this much
MIN_ROUND_GAIN = 2e-4  # validation NLL further rounds must be expected to gain to run
# Evidence rounds extrapolate each group's precision along its last two steps, at most
# doubling a step (`_extrapolated`). Measured with linear and additive candidates, hold-out
# NLL before / after: 1M classic 1.44924 / 1.44902 with 6 rounds instead of 8 (the additive
# candidate 17.5 s to 13.5 s); 100k: classic 1.44535 / 1.44519, heavy_tails 1.57102 /
# 1.57113, interactions 1.52896 / 1.52887, long_tail 1.56219 / 1.56060, uploaders 1.47113 /
# 1.47139. Uncapped (up to 3x) it was faster still but 0.0017 worse in heavy_tails.
EXTRAPOLATION_RATIO = 0.5
SCALE_PRIOR = 1e-4  # a whisper of L2 on the log-scale coefficients (one-hots are collinear)
SCALE_NEWTON_STEPS = 30
SCALE_FIT_POSTS = 200_000
# Tag effects are often heavy-tailed (a few tags with huge effects): after the Gaussian
# evidence rounds, up to TAIL_ROUNDS EM rounds of a Student-t prior with TAIL_DOF degrees of
# freedom, kept where they score better on validation.
TAIL_DOF = 4.0
TAIL_ROUNDS = 3
INITIAL_PRECISION = 10.0
# Kinds of design columns (`Design.row_kind`), and the prior group of columns a model leaves
# out (the plain linear baseline has no interactions): a precision that pins them at 0.
ROW_EFFECT, ROW_BY_RATING, ROW_BY_TIME = 0, 1, 2
EXCLUDED = -2
EXCLUDED_PRECISION = 1e8  # a tag effect of about 0.3 standard deviations of log1p(favs)


@dataclass
class Block:
    """Rows of a design stored together: dense metadata features `z` [n, d], the sparse tag
    part `s` [n, R] (a hashed tag's P probe columns at 1/P each, a dense tag's own column at
    1, then its interaction columns), and the rows' targets (log1p(favs), standardised),
    ratings, file types, ids and `network.long_tail` columns."""

    z: np.ndarray
    s: sp.csr_matrix
    y: np.ndarray
    rating: np.ndarray
    ext: np.ndarray
    ids: np.ndarray
    tail: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @functools.cached_property
    def used_bits(self) -> np.ndarray:
        """The tag columns these rows have entries in, as packed bits: counted once per block
        (every candidate and fold shares the pool's blocks), not once per fit."""
        used = np.bincount(self.s.indices, minlength=self.s.shape[1]) > 0
        self.let_go()
        return np.packbits(used)

    @property
    def nbytes(self) -> int:
        """The bulk of the block: its metadata features and tag entries."""
        return self.z.nbytes + self.s.data.nbytes + self.s.indices.nbytes

    def let_go(self) -> None:
        """Hand back the resident pages of a spilled block's bulk (no-op in the heap)."""
        spill.release(self.z, self.s.data, self.s.indices)

    def rows(self, a: int, b: int) -> Block:
        """Rows a..b as views of this block's arrays (no copy)."""
        lo, hi = self.s.indptr[a], self.s.indptr[b]
        # Assigned, not passed to the constructor: its format check copies a slice that is
        # less than half of its base (at 6M posts, a second copy of the design).
        s = sp.csr_matrix((b - a, self.s.shape[1]), dtype=self.s.dtype)
        s.data, s.indices = self.s.data[lo:hi], self.s.indices[lo:hi]
        s.indptr = self.s.indptr[a : b + 1] - lo
        return Block(self.z[a:b], s, self.y[a:b], self.rating[a:b], self.ext[a:b],
                     self.ids[a:b], self.tail[a:b])

    def take(self, keep: np.ndarray) -> Block:
        """The rows where `keep` holds (copied)."""
        idx = np.flatnonzero(keep)
        out = Block(self.z[idx], self.s[idx], self.y[idx], self.rating[idx], self.ext[idx],
                    self.ids[idx], self.tail[idx])
        self.let_go()
        return out


ROW_FIELDS = ("y", "rating", "ext", "ids", "tail")


class _SpilledRows:
    """One class's rows while a spilled design is built: the bulk (metadata features, tag
    entries' values and columns) appended to spill files as the chunks come, so the design is
    written once and never held; the per-row arrays (entries per row, `ROW_FIELDS`) in
    memory."""

    def __init__(self, folder: Path) -> None:
        self.bulk = [spill.SpillArray(folder) for _ in range(3)]
        self.counts: list[np.ndarray] = []
        self.rows: dict[str, list[np.ndarray]] = defaultdict(list)
        self.width = 0

    def add(self, b: Block) -> None:
        for f, x in zip(self.bulk, (b.z, b.s.data, b.s.indices), strict=True):
            f.append(x)
        self.counts.append(np.diff(b.s.indptr))
        for k in ROW_FIELDS:
            self.rows[k].append(getattr(b, k))
        self.width = b.s.shape[1]

    def block(self) -> Block:
        """The rows as one block whose bulk is read through the files' mappings."""
        z, data, indices = (f.mapped() for f in self.bulk)
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(self.counts))])
        s = sp.csr_matrix((len(indptr) - 1, self.width), dtype=np.float32)
        s.data, s.indices = data, indices
        s.indptr = indptr.astype(np.int32 if indptr[-1] < 2**31 else np.int64)
        return Block(z=z, s=s, **{k: np.concatenate(v) for k, v in self.rows.items()})


def _stack(blocks: list[Block]) -> Block:
    """One block of `blocks`' rows in order (the list is emptied as it goes, so the pieces
    are let go while the whole is built)."""
    if len(blocks) == 1:
        return blocks.pop()
    whole = {k: np.concatenate([getattr(b, k) for b in blocks])
             for k in ("z", *ROW_FIELDS)}
    s = _csr([b.s.indices for b in blocks], [b.s.data for b in blocks],
             [np.diff(b.s.indptr) for b in blocks], len(whole["y"]), blocks[0].s.shape[1])
    blocks.clear()
    return Block(s=s, **whole)


class _Joined:
    """A per-row array of a design's blocks, joined in order (a copy)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, design: Design, owner: type | None = None) -> np.ndarray:
        return np.concatenate([getattr(b, self.name) for b in design.blocks])


@dataclass
class Design:
    """The additive model's design on a set of posts, in blocks of rows (`Block`), so the
    prediction of (a, b, w) is z @ a + b + s @ w in units of y_std. A design over all fit rows
    keeps each fold x validation class in its own block, so the design of any fold's training
    or validation rows is a list of the same blocks: taken without a copy."""

    blocks: list[Block]
    row_category: np.ndarray = field(repr=False)  # [R] e621 category code of each row's tags
    row_dense: np.ndarray = field(repr=False)  # [R] whether the row is one dense tag's own
    # [R] ROW_EFFECT (a tag's effect), ROW_BY_RATING or ROW_BY_TIME (its interactions)
    row_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    @classmethod
    def of(cls, z: np.ndarray, s: sp.csr_matrix, y: np.ndarray, **rows) -> Design:
        """A design of one block (`rating`, `ext`, `ids` and `tail` default to zeros)."""
        n = len(y)
        extra = {k: rows.pop(k, np.zeros(n, np.int64)) for k in ("rating", "ext", "ids")}
        extra["tail"] = rows.pop("tail", np.zeros((n, 2), np.float32))
        return cls([Block(z=z, s=s.tocsr(), y=y, **extra)], **rows)

    @property
    def n_metadata(self) -> int:
        return self.blocks[0].z.shape[1]

    @property
    def width(self) -> int:
        return self.blocks[0].s.shape[1]

    @property
    def n_params(self) -> int:
        return self.n_metadata + 1 + self.width

    @property
    def nnz(self) -> int:
        return sum(b.s.nnz for b in self.blocks)

    # Every row's target, rating, file type, id, long tail and metadata features: the
    # blocks' joined (a copy each time; the solver works block by block).
    y, rating, ext, ids, tail, z = _Joined(), _Joined(), _Joined(), _Joined(), _Joined(), _Joined()

    @property
    def s(self) -> sp.csr_matrix:
        """Every row's tag part (a copy: for inspection)."""
        return sp.vstack([b.s for b in self.blocks], format="csr")

    def take(self, keep: np.ndarray) -> Design:
        """The design of the rows where `keep` holds: the blocks whole where they are kept
        whole (shared, not copied), copied rows where a block is split; the tag rows'
        categories stay those of the whole, so every part groups its prior the same way."""
        out, at = [], 0
        for b in self.blocks:
            part = keep[at : at + len(b)]
            at += len(b)
            if part.all():
                out.append(b)
            elif part.any():
                out.append(b.take(part))
        return dataclasses.replace(self, blocks=out or [self.blocks[0].take(keep[:0])])

    def used_columns(self) -> np.ndarray:
        """Whether any row has an entry in each tag column."""
        packed = functools.reduce(np.bitwise_or, (b.used_bits for b in self.blocks))
        return np.unpackbits(packed, count=self.width).astype(bool)

    def metadata(self, a: np.ndarray) -> np.ndarray:
        """z @ a over every row."""
        out = []
        for b in self.blocks:
            for at in range(0, len(b), PIECE_ROWS):
                z = b.z[at : at + PIECE_ROWS]
                out.append(z @ a)
                spill.release(z)
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def predict(self, theta: np.ndarray) -> np.ndarray:
        return _Products(self).forward(theta)


@dataclass
class _Tally:
    """The categories of a chunk's tags, by effect row: a dense row's is its tag's (`rows`
    get `categories`), a hashed row's the most common of its entries' (`hashed`, counts per
    hashed row x category, added up over the chunks)."""

    rows: np.ndarray
    categories: np.ndarray
    hashed: np.ndarray


def _encode(rows: Batch, config: ModelConfig, layout: FeatureLayout) -> tuple[Block, _Tally]:
    """A chunk of rows as a block in `LinearNet`'s parametrisation, with its tags' `_Tally`.
    Pure, so chunks are encoded on several threads at once."""
    n = len(rows["y"])
    n_dense = int(layout.extra.get("dense_tags", 0))
    n_rows = n_dense + 2**config.hash_bits
    p = config.num_probes
    z = metadata_features(
        {k: np.asarray(rows[k]) for k in ("numeric", "rating", "ext", "t_years")},
        layout.n_rating,
        layout.n_ext,
        config.time_frequencies,
    ).astype(np.float32, copy=False)
    tags = np.asarray(rows["tags"])
    flat = tags.reshape(-1)
    pos = np.flatnonzero(flat > 0)  # the tag entries alone: about half the slots are padding
    codes, post = flat[pos], pos // tags.shape[1]
    r = effect_rows(codes, config.hash_bits, p, n_dense)
    dense = r[:, 0] < n_dense
    # Each entry's columns, in order: its P effect probes (a dense tag's all name its own
    # row: one entry of 1, the others 0; a hashed tag's P rows at 1/P each), then its two
    # interaction columns (`network.Interactions`: its effect for this rating, at 1, and its
    # slope over the upload date) after the effect rows; entries of 0 are left out.
    cols = np.empty((len(codes), p + 2), np.int32)
    vals = np.empty((len(codes), p + 2), np.float32)
    cols[:, :p] = r
    vals[:, :p] = np.where(dense[:, None], np.eye(1, p, dtype=np.float32), np.float32(1.0 / p))
    if n_dense > 0:
        inter_rows, inter_values = interaction_terms(
            codes[:, None], np.asarray(rows["rating"])[post],
            np.asarray(rows["t_years"])[post], n_dense, layout.n_rating,
        )
        cols[:, p:] = inter_rows[:, 0] + n_rows
        vals[:, p:] = inter_values[:, 0]
    else:
        vals[:, p:] = 0.0
    keep = vals != 0
    width = n_rows + (interaction_rows(n_dense, layout.n_rating) if n_dense > 0 else 0)
    s = _csr([cols[keep]], [vals[keep]], [np.bincount(post, keep.sum(axis=1), n)], n, width)
    cat = (codes % CATEGORY_CODES).astype(np.int64)
    hashed = r[~dense].astype(np.int64) - n_dense
    tally = _Tally(
        rows=r[dense, 0], categories=cat[dense],
        hashed=np.bincount((hashed * CATEGORY_CODES + cat[~dense, None]).reshape(-1),
                           minlength=2**config.hash_bits * CATEGORY_CODES),
    )
    block = Block(
        z=z,
        s=s,
        y=((rows["y"] - layout.y_mean) / layout.y_std).astype(np.float32),
        rating=np.asarray(rows["rating"]).astype(np.int8),
        ext=np.asarray(rows["ext"]).astype(np.int8),
        ids=np.asarray(rows["id"], np.int64),
        tail=long_tail(tags, n_dense),
    )
    return block, tally


def _encoded(chunks: Iterator[Batch], encode: Callable) -> Iterator[tuple[Block, _Tally]]:
    """`encode` of each chunk, in order, several chunks at a time (one per core, at most
    ENCODE_AHEAD: each holds about 250 MB of transients): the hashing and the sorting are
    NumPy's and release the GIL, and the next chunk is read meanwhile."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(_product_pool().submit(encode, chunk))
        if len(pending) >= min(PRODUCT_THREADS, ENCODE_AHEAD):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def build_design(
    data: ParquetBatches,
    config: ModelConfig,
    layout: FeatureLayout,
    split: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Design:
    """The design of `data`'s rows, streamed: a row group at a time, so the rows are never
    resident together beside it. `split` (ids -> class, e.g. fold x validation) stores each
    class's rows in a block of their own; without it, blocks follow the file."""
    n_dense = int(layout.extra.get("dense_tags", 0))
    n_rows = n_dense + 2**config.hash_bits
    parts: dict[int, list[Block]] = defaultdict(list)
    category = np.zeros(n_rows, np.int64)
    hashed_counts = np.zeros((n_rows - n_dense) * CATEGORY_CODES, np.int64)

    def add(tally: _Tally) -> None:
        category[tally.rows] = tally.categories
        hashed_counts[:] += tally.hashed

    encode = functools.partial(_encode, config=config, layout=layout)
    spilled: dict[int, _SpilledRows] | None = None  # when the design is too big for the heap
    for i, (block, tally) in enumerate(_encoded(data.chunks(), encode)):
        add(tally)
        if i == 0 and len(block) and block.nbytes / len(block) * data.num_rows() > SPILL_BYTES:
            spilled = {}
        classes = split(block.ids) if split else np.full(len(block), i // CHUNKS_PER_BLOCK)
        for k in np.unique(classes):
            part = block if len(block) == 0 or (classes == k).all() else block.take(classes == k)
            if spilled is None:
                parts[int(k)].append(part)
            else:
                spilled.setdefault(int(k), _SpilledRows(data.path.parent)).add(part)
        block = part = None
        release_memory(collect=False)  # the chunk's transients, or the heap only grows
    if not parts and not spilled:  # no rows: one empty block
        block, tally = encode(data.empty())
        add(tally)
        parts[0].append(block)
    if spilled:
        blocks = [spilled.pop(k).block() for k in sorted(spilled)]
    else:
        blocks = []
        for k in sorted(parts):
            blocks.append(_stack(parts.pop(k)))
            release_memory(collect=False)
    row_category = category
    row_category[n_dense:] = hashed_counts.reshape(-1, CATEGORY_CODES).argmax(axis=1)
    row_kind = np.zeros(n_rows, np.int64)
    if n_dense > 0:
        per_tag = row_category[:n_dense]
        row_category = np.concatenate(
            [row_category, np.repeat(per_tag, layout.n_rating), per_tag]
        )
        row_kind = np.concatenate([
            row_kind,
            np.full(n_dense * layout.n_rating, ROW_BY_RATING),
            np.full(n_dense, ROW_BY_TIME),
        ])
    return Design(
        blocks=blocks,
        row_category=row_category,
        row_dense=(np.arange(len(row_kind)) < n_dense) | (row_kind != ROW_EFFECT),
        row_kind=row_kind,
    )


def _csr(cols: list, vals: list, per_post: list, n: int, width: int) -> sp.csr_matrix:
    """A CSR matrix from per-chunk column and value arrays in post order, and per-post counts."""
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(per_post or [np.zeros(0)]))])
    return sp.csr_matrix(
        (
            np.concatenate(vals or [np.zeros(0, np.float32)]),
            np.concatenate(cols or [np.zeros(0, np.int32)]).astype(np.int32, copy=False),
            indptr.astype(np.int32 if indptr[-1] < 2**31 else np.int64),
        ),
        shape=(n, width),
    )


def design_of(data: ParquetBatches, config: ModelConfig, layout: FeatureLayout) -> Design:
    """The design of `data`'s rows, built once (streamed from its file), or taken from its
    pool's: one design over all fit rows, built once for every candidate's and fold's fits,
    in blocks by `data`'s split so each fit's rows are whole blocks."""
    key = ("ridge design", config.hash_bits, config.num_probes, config.time_frequencies)
    if data.pool is None:
        return data.derived(key, lambda: build_design(data, config, layout))
    pool = data.pool
    whole = pool.derived(
        key, lambda: build_design(pool, config, layout, data.split_class)
    )
    return data.derived(key, lambda: whole.take(data.id_mask(whole.ids)))


def tag_groups(d: Design, by_category: bool) -> np.ndarray:
    """The prior group of each tag row: category x (dense or hashed), or one group for all
    (the plain ridge); -1 for rows no post uses."""
    used = d.used_columns()
    kind = d.row_kind if len(d.row_kind) else np.zeros(len(used), np.int64)
    if by_category:
        group = (kind * CATEGORY_CODES + d.row_category) * 2 + d.row_dense
    else:  # the plain ridge: no interactions
        group = np.where(kind == ROW_EFFECT, 0, EXCLUDED)
    return np.where(used, group, -1)


def group_name(group: int) -> str:
    """A prior group in words: the e621 category (or the uploader), hashed or not."""
    code, dense = divmod(int(group), 2)
    row_kind, code = divmod(code, CATEGORY_CODES)
    kind = "uploader" if code == UPLOADER_CATEGORY else TAG_CATEGORIES.get(code - 1, "other")
    if row_kind != ROW_EFFECT:
        return f"{kind} x {'rating' if row_kind == ROW_BY_RATING else 'upload date'}"
    return kind if dense or code == UPLOADER_CATEGORY else f"{kind} (hashed)"


@dataclass
class RidgeFit:
    theta: np.ndarray  # metadata weights, bias, tag rows (units of y_std)
    residual: np.ndarray  # on the training posts (units of y_std)
    leverage: np.ndarray  # of each training post (at most 0.95)
    row_variance: np.ndarray  # each tag row's posterior variance, in units of the noise
    prior_precision: dict[int, float]  # per group, in units of the noise variance
    rounds: list[dict]  # per evidence round: cg iterations, validation NLL, seconds
    best_round: int
    seconds: float
    tail_dof: float = 0.0  # the Student-t prior's degrees of freedom; 0: Gaussian


@dataclass
class _GramBlocks:
    """A design's Gram diagonal with the blocks of nested columns (`_Products.gram_blocks`),
    from which each solve's block-Jacobi preconditioner is made."""

    diag: np.ndarray  # [P] every column's sum of squares
    zz: np.ndarray  # [dz + 1, dz + 1] the metadata features' and the bias's Gram matrix
    cols: np.ndarray  # [m, K + 2] each identity tag's own, per-rating and slope columns (tag part)
    g: np.ndarray  # [m, K + 2, K + 2] their Gram blocks, diagonals left out

    def preconditioner(self, lam: np.ndarray) -> _BlockInverse:
        """The inverse of the blocks of (Gram + diag(lam)); the other columns: Jacobi."""
        dz = self.zz.shape[0] - 1
        cols = self.cols + dz + 1
        g = self.g.copy()
        idx = np.arange(g.shape[1])
        g[:, idx, idx] = (self.diag + lam)[cols]
        return _BlockInverse(
            inv_diag=(1.0 / (self.diag + lam)).astype(np.float32),
            z_inv=np.linalg.inv(self.zz + np.diag(lam[: dz + 1])).astype(np.float32),
            cols=cols.astype(np.int32),
            b_inv=np.linalg.inv(g).astype(np.float32),
        )


@dataclass
class _BlockInverse:
    """A block-Jacobi preconditioner: v -> its inverse blocks applied to v (NumPy here; the
    accelerator's solve applies the same arrays in `sparse_ops.pcg`)."""

    inv_diag: np.ndarray  # [P] 1 / (Gram diagonal + lam)
    z_inv: np.ndarray  # [dz + 1, dz + 1] the metadata-and-bias block's inverse
    cols: np.ndarray  # [m, K + 2] each identity tag's nested columns (in theta)
    b_inv: np.ndarray  # [m, K + 2, K + 2] their block's inverse

    def __call__(self, v: np.ndarray) -> np.ndarray:
        out = v * self.inv_diag
        k = self.z_inv.shape[0]
        out[:k] = self.z_inv @ v[:k]
        if len(self.cols):
            out[self.cols] = np.einsum("mij,mj->mi", self.b_inv, v[self.cols])
        return out


# SciPy's sparse products run on one core: split the rows over one thread per core (up to 16:
# each thread adds into its own parameter-sized vector).
PRODUCT_THREADS = max(1, min(os.cpu_count() or 1, 16))


@functools.cache
def _product_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(PRODUCT_THREADS, thread_name_prefix="e6score-ridge")


class _Products:
    """A design's products with its parameter vector theta = (a, b, w): the rows are cut into
    pieces of at most PIECE_ROWS (views of the blocks: no copy of the design), and the pieces
    into PRODUCT_THREADS runs of about equal rows, one thread each (SciPy and NumPy release
    the GIL in them). The sparse products add into one output per run through SciPy's own
    kernels (`_sparsetools`, what `s @ v` and `s.T @ u` call): a product per piece would
    allocate a parameter-sized vector each, and at 6M posts the heap grew 1.5 GB with them.
    The dense products are einsum loops, not BLAS: OpenBLAS threads its own matrix-vector
    products, and inside these threads (or beside them) that oversubscribed the cores, 0.23 s
    an iteration at 1M posts against 0.16 s now."""

    def __init__(self, d: Design) -> None:
        self.dz = d.n_metadata
        self.n_params = d.n_params
        pieces = [b.rows(a, min(a + PIECE_ROWS, len(b)))
                  for b in d.blocks for a in range(0, len(b), PIECE_ROWS)]
        self.n = sum(len(p) for p in pieces)
        starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]
        threads = PRODUCT_THREADS if self.n >= 4 * ENCODE_CHUNK else 1
        owner = (starts * threads) // max(self.n, 1)
        self.runs = [[p for p, o in zip(pieces, owner, strict=True) if o == k]
                     for k in range(threads)]
        self.runs = [r for r in self.runs if r]
        self.cuts = np.cumsum([0] + [sum(len(p) for p in r) for r in self.runs])

    def _map(self, fn: Callable, *args) -> list:
        if len(self.runs) < 2:
            return [fn(r, *a) for r, *a in zip(self.runs, *args, strict=True)]
        return list(_product_pool().map(fn, self.runs, *args))

    def forward(self, theta: np.ndarray) -> np.ndarray:
        """z @ a + b + s @ w for every row."""
        theta = np.asarray(theta, np.float32)
        a, w = theta[: self.dz], theta[self.dz + 1 :]

        def run(pieces: list[Block]) -> np.ndarray:
            out = []
            for p in pieces:
                y = np.einsum("ij,j->i", p.z, a)  # not BLAS: see the class's docstring
                _sparsetools.csr_matvec(*p.s.shape, p.s.indptr, p.s.indices, p.s.data, w, y)
                out.append(y)
                p.let_go()
            return np.concatenate(out)

        parts = self._map(run)
        return (np.concatenate(parts) if parts else np.zeros(0, np.float32)) + theta[self.dz]

    def transposed(self, u: np.ndarray) -> np.ndarray:
        """(z.T @ u, sum(u), s.T @ u): the design's transpose times a per-row vector."""
        def run(pieces: list[Block], u_run: np.ndarray) -> np.ndarray:
            out = np.zeros(self.n_params, np.float32)
            at = 0
            for p in pieces:
                part = u_run[at : at + len(p)]
                at += len(p)
                out[: self.dz] += np.einsum("ij,i->j", p.z, part)
                out[self.dz] += part.sum()
                # s.T @ part added in place: the CSR arrays read as the transpose's CSC.
                _sparsetools.csc_matvec(p.s.shape[1], p.s.shape[0], p.s.indptr, p.s.indices,
                                        p.s.data, part, out[self.dz + 1 :])
                p.let_go()
            return out

        u = np.asarray(u, np.float32)
        u_runs = [u[a:b] for a, b in itertools.pairwise(self.cuts)]
        return sum(self._map(run, u_runs), np.zeros(self.n_params, np.float32))

    def gram_blocks(self, row_kind: np.ndarray) -> _GramBlocks:
        """The Gram matrix's diagonal, and the blocks of it that a diagonal preconditioner
        misses: the metadata features with the bias (dense), and each identity tag's own
        column with its interaction columns (`row_kind`: its effect per rating and its date
        slope, nested in its own column). One threaded pass over the rows."""
        dz, width = self.dz, self.n_params - self.dz - 1
        by_time = np.flatnonzero(row_kind == ROW_BY_TIME)
        by_rating = np.flatnonzero(row_kind == ROW_BY_RATING)
        n_dense = len(by_time)
        n_rating = len(by_rating) // max(n_dense, 1)
        t_base = int(by_time[0]) if n_dense else width

        def run(pieces: list[Block]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            diag = np.zeros(width, np.float32)
            zz = np.zeros((dz + 1, dz + 1))
            # Each tag's sum of its posts' date values, by their rating: the slope columns'
            # entries counted by the rating of their row.
            s_tr = np.zeros(n_dense * n_rating)
            for p in pieces:
                _sparsetools.csc_matvec(width, len(p), p.s.indptr, p.s.indices,
                                        np.square(p.s.data), np.ones(len(p), np.float32), diag)
                x = np.concatenate([p.z, np.ones((len(p), 1), np.float32)], axis=1)
                zz += x.T @ x
                if n_dense:
                    at = np.flatnonzero(p.s.indices >= t_base)
                    rating = p.rating[np.searchsorted(p.s.indptr, at, side="right") - 1]
                    s_tr += np.bincount((p.s.indices[at] - t_base) * n_rating + rating,
                                        p.s.data[at], len(s_tr))
                p.let_go()
            return diag, zz, s_tr

        parts = self._map(run) or [run([])]
        tag_diag, zz, s_tr = (sum(x[i] for x in parts) for i in range(3))
        diag = np.concatenate([np.diag(zz), tag_diag]).astype(np.float32)
        tags = np.flatnonzero(tag_diag[by_time] > 0)  # identity tags: their slope is used
        s_tr = s_tr.reshape(n_dense, n_rating)[tags]
        cols = np.concatenate([tags[:, None], by_rating.reshape(n_dense, n_rating)[tags],
                               by_time[tags, None]], axis=1)
        g = np.zeros((len(tags), n_rating + 2, n_rating + 2))
        g[:, 0, 1:-1] = g[:, 1:-1, 0] = tag_diag[cols[:, 1:-1]]
        g[:, 0, -1] = g[:, -1, 0] = s_tr.sum(axis=1)
        g[:, 1:-1, -1] = g[:, -1, 1:-1] = s_tr
        return _GramBlocks(diag, zz, cols, g)

    def normal(self, theta: np.ndarray) -> np.ndarray:
        """X.T @ (X @ theta), X the whole design (metadata, bias, tags)."""
        return self.transposed(self.forward(theta))

    def solve(self, lam: np.ndarray, rhs: np.ndarray, theta: np.ndarray, pre: _BlockInverse,
              atol: float, maxiter: int) -> tuple[np.ndarray, int]:
        """(X.T X + diag(lam)) theta = rhs by preconditioned CG from `theta`, until the
        residual's norm is at most `atol`: the solution and the iterations taken."""
        n = self.n_params
        iters = 0

        def count(_):
            nonlocal iters
            iters += 1

        op = LinearOperator((n, n), matvec=lambda v: self.normal(v) + lam * v, dtype=np.float32)
        theta, _ = cg(op, rhs, x0=theta, M=LinearOperator((n, n), matvec=pre, dtype=np.float32),
                      rtol=0.0, atol=atol, maxiter=maxiter, callback=count)
        return theta.astype(np.float32), iters

    def squared_rows(self, per_column: np.ndarray) -> np.ndarray:
        """Each row's sum over its tag entries of value^2 x `per_column` (the leverage)."""
        per_column = np.asarray(per_column, np.float32)
        out = []
        for p in itertools.chain.from_iterable(self.runs):
            y = np.zeros(len(p), np.float32)
            _sparsetools.csr_matvec(*p.s.shape, p.s.indptr, p.s.indices, np.square(p.s.data),
                                    per_column, y)
            out.append(y)
            p.let_go()
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class _DeviceProducts(_Products):
    """The same products and solves with the design resident on an accelerator
    (`sparse_ops`): only parameter- and row-sized vectors cross to the host. The once-a-fit
    sums (the Gram blocks, the leverage) stay on the host's threads."""

    def __init__(self, d: Design) -> None:
        super().__init__(d)
        self.arrays = sparse_ops.resident(
            d.z, *([getattr(b.s, k) for b in d.blocks] for k in ("indptr", "indices", "data"))
        )

    def _rows(self, u: np.ndarray) -> jax.Array:
        """A per-row vector padded to the resident rows."""
        return jnp.zeros(self.arrays[0].shape[0], jnp.float32).at[: self.n].set(u)

    def forward(self, theta: np.ndarray) -> np.ndarray:
        out = sparse_ops.forward(*self.arrays, jnp.asarray(theta, jnp.float32))
        return np.asarray(out[: self.n])

    def transposed(self, u: np.ndarray) -> np.ndarray:
        out = sparse_ops.transposed(*self.arrays, self._rows(u), n_params=self.n_params)
        return np.asarray(out)

    def normal(self, theta: np.ndarray) -> np.ndarray:
        return np.asarray(sparse_ops.normal(*self.arrays, jnp.asarray(theta, jnp.float32)))

    def solve(self, lam: np.ndarray, rhs: np.ndarray, theta: np.ndarray, pre: _BlockInverse,
              atol: float, maxiter: int) -> tuple[np.ndarray, int]:
        x, iters = sparse_ops.pcg(
            self.arrays, lam, rhs, np.asarray(theta, np.float32), pre.inv_diag, pre.z_inv,
            *sparse_ops.padded_blocks(pre.cols, pre.b_inv, self.n_params), np.float32(atol),
            maxiter=maxiter,
        )
        return np.asarray(x), int(iters)


def products_of(d: Design) -> _Products:
    """A design's products where they run fastest: resident on the accelerator when JAX has
    one and the design fits in its memory (a small GPU at 6M posts may not), else SciPy's
    kernels on the CPU's cores."""
    if not (sparse_ops.on_accelerator() and d.nnz):
        return _Products(d)
    size = sparse_ops.resident_bytes(sum(len(b) for b in d.blocks), d.n_metadata, d.nnz)
    return _DeviceProducts(d) if sparse_ops.fits_on_device(size) else _Products(d)


def remaining_gain(nlls: list[float]) -> float:
    """What further evidence rounds can still gain on validation NLL, from the rounds so far:
    the gains shrink about geometrically, so the last gain times r / (1 - r) (r: its ratio to
    the gain before), or the last gain alone while there is no ratio; inf before two rounds
    and while gains grow."""
    if len(nlls) < 2:
        return math.inf
    gain = nlls[-2] - nlls[-1]
    if len(nlls) < 3 or gain <= 0:
        return gain
    ratio = gain / (nlls[-3] - nlls[-2]) if nlls[-3] > nlls[-2] else math.inf
    return gain * ratio / (1.0 - ratio) if ratio < 1.0 else math.inf


def _extrapolated(old: float, new: float, last_step: dict[int, float], group: int) -> float:
    """MacKay's update moves a group's log precision by about the same share of the way each
    round, so it creeps towards its fixed point: at 1M posts several groups still moved a
    fifth of a decade in the eighth round. Where two steps agree in direction, their ratio r
    predicts the rest of the way (the step times 1 / (1 - r)); r is capped at
    EXTRAPOLATION_RATIO, so no step is more than doubled, and a step that reverses is taken
    as it is. `last_step` keeps each group's previous step."""
    step = math.log(new / old)
    prev, last_step[group] = last_step.get(group), step
    if prev is None or step * prev <= 0:
        return new
    ratio = min(step / prev, EXTRAPOLATION_RATIO)
    return float(np.clip(old * math.exp(step / (1.0 - ratio)), *LAMBDA_RANGE))


def fit_ridge(
    d: Design,
    y: np.ndarray,
    groups: np.ndarray,
    validation: tuple[Design, np.ndarray] | None = None,
    rounds: int = 8,
    cg_tol: float = 1e-4,
    cg_iters: int = 200,
    log=print,
    theta0: np.ndarray | None = None,
    prior0: dict[int, float] | None = None,
    tail_dof: float | None = None,
) -> RidgeFit:
    """MAP fit of the additive model to standardised targets `y`, with the prior precision
    of each tag group set by evidence rounds (each a warm-started CG solve, then MacKay's
    update). Keeps the round with the best validation NLL when `validation` is given.
    `theta0` and `prior0` start the solve and the prior precisions from an earlier fit (of
    another fold, another candidate or yesterday's dump). `tail_dof`: None tries a Student-t
    prior (TAIL_DOF) after the Gaussian rounds, judged on validation; 0 keeps the Gaussian
    prior; a number fits only the Student-t prior with those degrees of freedom (the choice
    of an earlier fit)."""
    t0 = time.perf_counter()
    dz = d.n_metadata
    products = products_of(d)
    val_products = products_of(validation[0]) if validation is not None else None
    gram = products.gram_blocks(d.row_kind)
    diag = gram.diag
    h_tags = diag[dz + 1 :]
    names = [int(g) for g in np.unique(groups) if g >= 0]
    lam_of = {g: float((prior0 or {}).get(g, INITIAL_PRECISION)) for g in names}
    member = {g: np.flatnonzero(groups == g) for g in names}
    y = np.asarray(y, np.float32)
    rhs = products.transposed(y)
    # The solves' temporaries come and go in many sizes and glibc keeps what they free: at
    # 6M posts the heap grew 1.5 GB above what was live. Each round gives it back.
    release_memory(collect=False)
    theta = np.zeros(d.n_params, np.float32) if theta0 is None else theta0.astype(np.float32)
    history: list[dict] = []
    best: tuple = (math.inf, -1, theta, np.zeros(0), dict(lam_of), 0.0)
    n = d.n_params

    def solve(lam: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, dict]:
        """One warm-started CG solve under prior precisions `lam`, and how it scores."""
        # Each round cuts its own starting residual (the prior moved) by ROUND_REDUCTION,
        # down to `cg_tol` of the right-hand side: rounds refine one another, so no single
        # solve needs to be exact.
        start = float(np.linalg.norm(rhs - products.normal(theta) - lam * theta))
        atol = max(cg_tol * float(np.linalg.norm(rhs)), ROUND_REDUCTION * start)
        theta, iters = products.solve(lam, rhs, theta, gram.preconditioner(lam), atol, cg_iters)
        noise = float(np.mean(np.square(y - products.forward(theta))))
        entry = {"round": len(history) + 1, "cg_iterations": iters,
                 "train_rmse": math.sqrt(noise), "noise": noise}
        if val_products is not None and len(validation[1]):
            vy = validation[1]
            v_resid = vy - val_products.forward(theta)
            v_sigma = float(np.sqrt(np.mean(np.square(v_resid))))
            entry["validation_nll"] = float(np.mean(gaussian_nll(0.0, v_sigma, v_resid)))
        return theta, entry

    def keep(entry: dict, theta: np.ndarray, lam: np.ndarray, kind: str, dof: float) -> None:
        """Record a round; it becomes the fit if it scores best on validation (or, without
        validation, if it is the last)."""
        nonlocal best
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        release_memory(collect=False)
        entry["prior"] = kind
        history.append(entry)
        nll = entry.get("validation_nll", -math.inf)
        if nll < best[0]:
            best = (max(nll, -1e300), entry["round"] - 1, theta.copy(), lam.copy(),
                    dict(lam_of), dof)
        val_text = f", validation NLL {nll:.4f}" if "validation_nll" in entry else ""
        log(f"{kind} round {entry['round']}: {entry['cg_iterations']} CG iterations, train "
            f"RMSE {entry['train_rmse']:.4f}{val_text}")

    def lam_vector(per_row: np.ndarray | None = None) -> np.ndarray:
        lam = np.full(n, METADATA_PRIOR, np.float32)
        lam[dz] = 0.0  # the bias is free
        for g in names:
            lam[dz + 1 + member[g]] = lam_of[g]
        if per_row is not None:
            lam[dz + 1 :] *= per_row
        lam[dz + 1 :][groups == -1] = 1.0  # unused rows: keep them at 0
        lam[dz + 1 :][groups == EXCLUDED] = EXCLUDED_PRECISION  # rows this model goes without
        return lam

    def tail_step(theta: np.ndarray, lam: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One EM step of a Student-t prior (scale per group, dof `dof`): each tag row's
        precision is its group's times E[1/variance | w], so a tag whose effect stands far
        out of its group is shrunk less, and the group scales are refitted."""
        noise = float(np.mean(np.square(y - products.forward(theta))))
        second = np.square(theta[dz + 1 :]) + noise / (h_tags + lam[dz + 1 :])  # E[w^2]
        for g in names:
            m = member[g]
            u[m] = (dof + 1.0) / (dof + second[m] * lam_of[g] / noise)
            tau2 = float(np.mean(u[m] * second[m]))
            lam_of[g] = float(np.clip(noise / max(tau2, 1e-12), *LAMBDA_RANGE))
        return lam_vector(u)

    dof = TAIL_DOF if tail_dof is None else tail_dof
    last_step: dict[int, float] = {}
    for _ in range(rounds if not tail_dof else 0):  # the Gaussian prior's evidence rounds
        lam = lam_vector()
        theta, entry = solve(lam, theta)
        noise = entry["noise"]
        w = theta[dz + 1 :]
        changed = 0.0
        settled = remaining_gain(
            [h["validation_nll"] for h in (*history, entry) if "validation_nll" in h]
        ) < MIN_ROUND_GAIN
        for g in names:
            m = member[g]
            gamma = float(np.sum(h_tags[m] / (h_tags[m] + lam_of[g])))
            tau2 = float(np.sum(np.square(w[m]))) / max(gamma, 1e-3)
            new = float(np.clip(noise / max(tau2, 1e-12), *LAMBDA_RANGE))
            if LAMBDA_RANGE[0] < new < LAMBDA_RANGE[1]:  # a group at a bound has settled
                changed = max(changed, abs(math.log(new / lam_of[g])))
            lam_of[g] = _extrapolated(lam_of[g], new, last_step, g)
        keep(entry, theta, lam, "evidence", 0.0)
        if changed < 0.05 or settled:  # the prior scales or the validation NLL have settled
            break
    has_val = validation is not None and len(validation[1]) > 0
    # Interactions: the evidence rarely closes a group's prior entirely where there is nothing
    # to find, and a little fitted noise in thousands of interaction weights costs more than
    # it gains. So where a validation slice can judge, one solve without any (their groups
    # pinned at the tightest prior) competes with the fit, and the better one goes on; refits
    # inherit the choice through the prior precisions.
    interacting = [g for g in names if g // 2 // CATEGORY_CODES != ROW_EFFECT]
    if tail_dof is None and has_val and interacting and history:
        kept = dict(lam_of)
        lam_of.update({g: LAMBDA_RANGE[1] for g in interacting})
        before = best[0]
        lam = lam_vector()
        off, entry = solve(lam, best[2])
        keep(entry, off, lam, "without interactions", 0.0)
        if not entry["validation_nll"] < before:
            lam_of.clear()
            lam_of.update(kept)
    # Heavy tails: tried after the Gaussian rounds where a validation slice can judge them
    # (kept only if they score better there), or alone when an earlier fit chose them.
    tail_rounds = rounds if tail_dof else (TAIL_ROUNDS if tail_dof is None and has_val else 0)
    if tail_rounds and dof > 0:
        theta, lam = (best[2], best[3]) if history else (theta, lam_vector())
        u = np.ones(d.width, np.float32)
        for _ in range(tail_rounds):
            before = best[0]
            lam = tail_step(theta, lam, u)
            theta, entry = solve(lam, theta)
            keep(entry, theta, lam, "heavy-tail", dof)
            if has_val and not entry["validation_nll"] < before - MIN_ROUND_GAIN:
                break
    _, best_round, theta, lam, prior, best_dof = best
    # Each post's leverage (diagonal approximation): how much of its own residual the fit
    # absorbed, so the scale is fitted to what the residuals would be out of sample. A tag
    # counts once, through its own column: its interaction columns split that column by
    # rating (and weigh it by date), and counting them again overstated the leverage of every
    # post with an identity tag (hold-out NLL 0.003 worse in two worlds at 100k posts).
    per_row = 1.0 / (diag[dz + 1 :] + lam[dz + 1 :])
    if len(d.row_kind):
        per_row = np.where(d.row_kind == ROW_EFFECT, per_row, 0.0).astype(np.float32)
    leverage = products.squared_rows(per_row)
    return RidgeFit(
        theta=theta,
        residual=y - products.forward(theta),
        leverage=np.clip(leverage, 0.0, 0.95),
        row_variance=per_row,
        prior_precision={g: round(v, 4) for g, v in prior.items()},
        rounds=history,
        best_round=best_round + 1,
        seconds=time.perf_counter() - t0,
        tail_dof=best_dof,
    )


def fit_log_scale(
    resid: np.ndarray, leverage: np.ndarray, features: np.ndarray, used: np.ndarray | None = None
) -> np.ndarray:
    """Coefficients (constant first) of log sigma = c + features @ a, by maximum likelihood
    on the leverage-corrected residuals (a convex problem in (c, a)); features not `used`
    (a mask of columns) get 0. Callers pass the `scale_sample` of their posts."""
    if used is not None:
        features = features * used
    e = np.square(resid) / (1.0 - leverage)
    # A few wild residuals (a post with a million favourites) must not bend the whole curve.
    e = np.minimum(e, np.quantile(e, 0.999)) if len(e) else e
    x = np.concatenate([np.ones((len(e), 1)), features], axis=1).astype(np.float64)

    if not len(e):
        return np.zeros(x.shape[1])
    ridge = np.full(x.shape[1], SCALE_PRIOR)
    ridge[0] = 0.0  # the constant is not shrunk

    def nll(beta: np.ndarray) -> float:
        ls = x @ beta
        return float(np.mean(ls + 0.5 * e * np.exp(-2.0 * ls))) + 0.5 * float(ridge @ beta**2)

    # Newton's method with backtracking (convex; a dozen parameters): a few passes over the
    # posts where a quasi-Newton method took dozens.
    beta = np.zeros(x.shape[1])
    beta[0] = 0.5 * math.log(max(float(np.mean(e)), 1e-12))
    value = nll(beta)
    for _ in range(SCALE_NEWTON_STEPS):
        w = e * np.exp(-2.0 * (x @ beta))
        grad = x.T @ (1.0 - w) / len(e) + ridge * beta
        hess = (x.T * (2.0 * w)) @ x / len(e) + np.diag(ridge)
        step = np.linalg.solve(hess + 1e-12 * np.eye(len(beta)), grad)
        t = 1.0
        while (new := nll(beta - t * step)) > value - 0.25 * t * float(grad @ step) and t > 1e-4:
            t *= 0.5
        beta, value = beta - t * step, new
        if float(grad @ step) < 1e-12:  # the Newton decrement: converged
            break
    return beta


def scale_sample(n: int) -> slice:
    """The posts the log scale is fitted on, of `n`: at most SCALE_FIT_POSTS evenly spaced. A
    dozen coefficients, so these pin them down (standard errors near 0.002), and their
    features are all that is built (at 6M posts, all of them were 0.5 GB of the fit's peak)."""
    return slice(None, None, max(1, -(-n // SCALE_FIT_POSTS)))


def _slices(n: int) -> Iterator[slice]:
    """The rows in slices of LINK_CHUNK: the link's hinge features are 13 floats a post, and
    at 6M posts all at once they were 0.8 GB of temporaries."""
    return (slice(i, i + LINK_CHUNK) for i in range(0, n, LINK_CHUNK))


def fit_link(mean: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The link's coefficients (`network.Link`): least squares of y - mean on the hinges of
    `mean` (out-of-sample predictions), with a whisper of L2 (hinges beyond the data are
    flat)."""
    mean = np.asarray(mean, np.float32)
    gram = SCALE_PRIOR * len(y) * np.eye(len(LINK_KNOTS))
    rhs = np.zeros(len(LINK_KNOTS))
    for rows in _slices(len(mean)):
        x = link_features(mean[rows]).astype(np.float64)
        gram += x.T @ x
        rhs += x.T @ (np.asarray(y[rows], np.float64) - mean[rows])
    return np.linalg.solve(gram, rhs).astype(np.float32)


def fit_link_and_metadata(
    mean: np.ndarray, y: np.ndarray, z: np.ndarray | Design, link: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The link's coefficients, and a shift of the metadata weights and bias (one Gauss-Newton
    step through the link): with the mean bent, a group of posts with few favourites (say a
    rare file type) would otherwise keep an effect fitted without the bend. Refits the link
    after the shift. `mean`: out-of-sample predictions; `link`: `fit_link(mean, y)` if known."""
    link = fit_link(mean, y) if link is None else link
    blocks = [z] if isinstance(z, np.ndarray) else [b.z for b in z.blocks]
    d = blocks[0].shape[1] + 1
    gram = np.zeros((d, d))
    rhs = np.zeros(d)
    i = 0
    for zi in (b[rows] for b in blocks for rows in _slices(len(b))):
        m = np.asarray(mean[i : i + len(zi)], np.float32)  # bounded temporaries on big dumps
        hinges = link_features(m)
        slope = 1.0 - ((hinges > 0) @ link).astype(np.float64)
        bent = (m + hinges @ np.asarray(link, np.float32)).astype(np.float64)  # `linked`
        zb = np.concatenate([zi, np.ones((len(m), 1), np.float32)], axis=1)
        weighted = zb * slope[:, None].astype(np.float32)
        spill.release(zi)
        gram += (weighted.T @ weighted).astype(np.float64)
        rhs += weighted.T.astype(np.float64) @ (y[i : i + len(m)] - bent)
        i += len(m)
    shift = np.linalg.solve(gram + METADATA_PRIOR * np.eye(d), rhs).astype(np.float32)
    metadata = z @ shift[:-1] if isinstance(z, np.ndarray) else z.metadata(shift[:-1])
    moved = mean + metadata + shift[-1]
    return fit_link(moved, y), shift


def linked(link: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """`mean` through the link with coefficients `link` (`network.Link`, in NumPy)."""
    mean, link = np.asarray(mean, np.float32), np.asarray(link, np.float32)
    out = np.empty_like(mean)
    for rows in _slices(len(mean)):
        out[rows] = mean[rows] + link_features(mean[rows]) @ link
    return out


def choose_link(
    loo: np.ndarray,
    y: np.ndarray,
    z: Design,
    theta: np.ndarray,
    validation: tuple[Design, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(link coefficients, metadata shift): none, the link alone, or the link with the
    metadata refitted through it, whichever predicts the validation slice best (on a small
    dump the leave-one-out predictions they are fitted to are rough, and the plain additive
    mean can be the better one)."""
    n_links = len(LINK_KNOTS)
    options = [(np.zeros(n_links, np.float32), np.zeros(z.n_metadata + 1, np.float32))]
    options.append((fit_link(loo, y), options[0][1]))
    options.append(fit_link_and_metadata(loo, y, z, options[1][0]))
    if validation is None or not len(validation[1]):
        return options[-1]
    vd, vy = validation
    predicted = vd.predict(theta)

    def error(option: tuple[np.ndarray, np.ndarray]) -> float:
        link, shift = option
        moved = predicted + vd.metadata(shift[:-1]) + shift[-1]
        return float(np.mean(np.square(vy - linked(link, moved))))

    return min(options, key=error)


def to_params(
    fit: RidgeFit, init: dict, n_metadata: int, log_scale: np.ndarray, link: np.ndarray
) -> dict:
    """`LinearNet` params (from `init`, e.g. zero shrinkage) that predict what `fit` does,
    through the link's coefficients `link`, with the log scale's coefficients `log_scale`
    (constant first)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in init.items()}
    theta = fit.theta
    out["linear"] = {
        "kernel": np.asarray(theta[:n_metadata, None], np.float32),
        "bias": np.asarray(theta[n_metadata : n_metadata + 1], np.float32),
    }
    n_tags = len(init["tag_weight"])
    out["tag_weight"] = np.asarray(theta[n_metadata + 1 : n_metadata + 1 + n_tags], np.float32)
    out["tag_variance"] = np.asarray(fit.row_variance[:n_tags], np.float32)
    inter = np.array(init["interactions"]["weight"], np.float32)  # one zero without dense tags
    rest = theta[n_metadata + 1 + n_tags :]
    inter[: len(rest)] = rest
    out["interactions"] = {"weight": inter}
    out["log_scale"] = np.asarray(log_scale[0], np.float32)
    out["scale"] = {"kernel": np.asarray(log_scale[1:, None], np.float32)}
    out["link"] = {"kernel": np.asarray(link[:, None], np.float32)}
    out["sigma_calibration"] = np.asarray(0.0, np.float32)
    return out


def theta_of(params: dict) -> np.ndarray:
    """The inverse of `to_params`: the solver's vector of a linear or additive fit's params."""
    inter = np.asarray(params["interactions"]["weight"])
    # Without dense tags the table is one unused zero (a multiple of n_rating + 1 otherwise).
    inter = inter[:0] if len(inter) == 1 else inter
    return np.concatenate(
        [
            np.asarray(params["linear"]["kernel"])[:, 0],
            np.asarray(params["linear"]["bias"]),
            np.asarray(params["tag_weight"]),
            inter,
        ]
    ).astype(np.float32)


def _scaled(
    config: ModelConfig,
    layout: FeatureLayout,
    fit: RidgeFit,
    link: np.ndarray,
    resid: np.ndarray,
    features: np.ndarray,
    val_rows: Batch | None,
    n_metadata: int,
    log: Log,
) -> tuple[dict, float]:
    """The fit's params with their log scale, and its calibration factor on the validation
    rows. Two scales compete there: one of the mean, rating and file type alone, and one that
    also widens with each post's spread and long tail (`network.tag_spread`, `long_tail`).
    The spread is the diagonal approximation of a posterior's, and where it overstates how
    little the fit knows of a post's tags the wider scale scores worse, so the validation
    slice decides; without one the plain scale is kept."""
    width = features.shape[1]
    plain = (np.arange(width) < width - SPREAD_FEATURES).astype(np.float32)

    def scaled(used: np.ndarray) -> dict:
        log_scale = fit_log_scale(resid, np.zeros_like(resid), features, used)
        return to_params(fit, init_params(config, layout), n_metadata, log_scale, link)

    if val_rows is None or not len(val_rows["y"]):
        return scaled(plain), 1.0
    options = []  # (calibrated validation NLL, params, factor), the plain scale first
    for used in (plain, np.ones(width, np.float32)):
        params = scaled(used)
        y, mu, sigma = predict_rows(config, layout, params, val_rows)
        factor = calibrate_scale(params, y, mu, sigma)
        options.append((float(np.mean(np.log(sigma))) + math.log(factor) + 0.5, params, factor))
    widened = options[1][0] < options[0][0]
    log(f"scale: {'with' if widened else 'without'} the spread of each post's tags")
    return options[widened][1:]


def train_ridge(
    config: ModelConfig,
    layout: FeatureLayout,
    data: ParquetBatches,
    validation: ParquetBatches | None = None,
    log: Log = print,
    warm: tuple[dict, dict[int, float], float | None] | None = None,
) -> TrainResult:
    """Fit `config.architecture` ("linear": one prior group; "additive": a group per category
    and density) on `data`'s rows by evidence rounds, its sigma calibrated on `validation`.
    `warm` = (params, prior precisions, Student-t dof or None to choose) of an earlier fit in
    the same parametrisation starts the solve near its answer."""
    t_load = time.perf_counter()
    train_design = design_of(data, config, layout)
    y = train_design.y
    val_rows = validation.load() if validation is not None else None
    val = None
    if val_rows is not None and len(val_rows["y"]):
        vd = design_of(validation, config, layout)
        val = (vd, vd.y)
    load_seconds = time.perf_counter() - t_load
    groups = tag_groups(train_design, by_category=config.architecture == "additive")
    log(
        f"ridge: {len(y):,} posts, {train_design.nnz:,} tag entries, "
        f"{len(set(groups.tolist()) - {-1})} prior groups" + (", warm start" if warm else "")
    )
    fit = fit_ridge(
        train_design,
        y,
        groups,
        val,
        rounds=config.evidence_rounds,
        log=log,
        theta0=theta_of(warm[0]) if warm else None,
        prior0=warm[1] if warm else None,
        # The plain linear baseline keeps the Gaussian prior; the additive model may choose
        # heavy tails.
        tail_dof=warm[2] if warm else (None if config.architecture == "additive" else 0.0),
    )
    # Each training post's leave-one-out prediction (the diagonal leverage approximation):
    # what the fit predicts for posts it did not see, so the link and the scale are fitted to
    # out-of-sample behaviour.
    loo = y - fit.residual / (1.0 - fit.leverage)
    release_memory(collect=False)
    link, shift = choose_link(loo, y, train_design, fit.theta, val)
    fit.theta = fit.theta.copy()
    fit.theta[: len(shift)] += shift
    loo = loo + train_design.metadata(shift[:-1]) + shift[-1]
    mean = linked(link, loo)
    # The scale is fitted to leave-one-out residuals, so each post's spread is the one it
    # would have left out (what `network.tag_spread` gives a post the fit never saw): for
    # leverage h, h / (1 - h) (Sherman-Morrison).
    rows = scale_sample(len(y))
    h = fit.leverage[rows]
    features = scale_features(
        {"rating": train_design.rating[rows], "ext": train_design.ext[rows]}, mean[rows],
        layout.n_rating, layout.n_ext, h / (1.0 - h), train_design.tail[rows],
    )
    params, factor = _scaled(config, layout, fit, link, (y - mean)[rows], features, val_rows,
                             train_design.n_metadata, log)
    iterations = sum(r["cg_iterations"] for r in fit.rounds)
    noise = float(np.mean(np.square(fit.residual)))
    prior_sd = {
        group_name(g) if config.architecture == "additive" else "all tags": round(
            layout.y_std * math.sqrt(noise / lam), 4
        )
        for g, lam in sorted(fit.prior_precision.items())
    }
    return TrainResult(
        params=params,
        steps=iterations,
        seconds=fit.seconds,
        data_wait_seconds=load_seconds,
        posts_per_second=iterations * len(y) / max(fit.seconds, 1e-9),
        history=fit.rounds,
        validation=[
            {"step": r["round"], "nll": r["validation_nll"]}
            for r in fit.rounds
            if "validation_nll" in r
        ],
        best_step=fit.best_round,
        sigma_calibration=factor,
        device="cpu (scipy)",
        prior_precision=fit.prior_precision,
        prior_tail_dof=fit.tail_dof,
        prior_sd=prior_sd,
    )
