"""Streaming, fixed-shape batches from the feature-matrix Parquet file.

The file is written pre-shuffled (ordered by a hash of the post id), so shuffling row-group
order plus rows within a group gives well-mixed batches while only a few row groups are ever
in memory. Every batch has the same shape (padding rows carry weight 0) so JAX compiles once.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

Batch = dict[str, np.ndarray]
RowSet = Literal["fit", "train", "validation", "holdout", "all"]
TIME_COLUMN = "t_upload_years"  # raw years since site launch; the model encodes it itself


@dataclass(frozen=True)
class FeatureLayout:
    """What the feature matrix holds; written next to it as JSON and stored in the params."""

    numeric: tuple[str, ...]
    max_tags: int
    n_ext: int
    n_rating: int
    y_mean: float
    y_std: float
    numeric_mean: tuple[float, ...]
    numeric_std: tuple[float, ...]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["numeric"] = list(self.numeric)
        d["numeric_mean"] = list(self.numeric_mean)
        d["numeric_std"] = list(self.numeric_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureLayout:
        return cls(
            numeric=tuple(d["numeric"]),
            max_tags=int(d["max_tags"]),
            n_ext=int(d["n_ext"]),
            n_rating=int(d["n_rating"]),
            y_mean=float(d["y_mean"]),
            y_std=float(d["y_std"]),
            numeric_mean=tuple(float(x) for x in d["numeric_mean"]),
            numeric_std=tuple(float(x) for x in d["numeric_std"]),
            extra=dict(d.get("extra", {})),
        )

    @classmethod
    def read(cls, path: Path) -> FeatureLayout:
        return cls.from_dict(json.loads(Path(path).read_text()))


def validation_mask(ids: np.ndarray, fraction: float) -> np.ndarray:
    """A slice of the training posts for early stopping and calibration, by a hash of the id
    independent of the hold-out hash (so it is stable across dumps and never held-out)."""
    x = ids.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(40)).astype(np.float64) < fraction * float(1 << 24)


def fold_of(ids: np.ndarray, num_folds: int) -> np.ndarray:
    """Cross-fitting fold of each post, by a third hash of the id (a splitmix64 finaliser),
    independent of the hold-out and validation hashes, so a post stays in its fold in every
    dump."""
    x = np.asarray(ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return ((x >> np.uint64(32)) % np.uint64(max(num_folds, 1))).astype(np.int64)


def _table_to_batch(table: pa.Table, layout: FeatureLayout) -> Batch:
    n = table.num_rows
    tags = pc.list_flatten(table.column("tags")).to_numpy(zero_copy_only=False)
    if tags.size != n * layout.max_tags:
        raise ValueError(f"tags column is not fixed-width {layout.max_tags}")
    numeric = np.stack(
        [table.column(c).to_numpy(zero_copy_only=False) for c in layout.numeric], axis=1
    ).astype(np.float32)
    mean = np.asarray(layout.numeric_mean, np.float32)
    std = np.asarray(layout.numeric_std, np.float32)
    return {
        "id": table.column("id").to_numpy(zero_copy_only=False).astype(np.int64),
        "fav_count": table.column("fav_count").to_numpy(zero_copy_only=False).astype(np.int64),
        "y": table.column("y").to_numpy(zero_copy_only=False).astype(np.float32),
        "tags": tags.astype(np.int32).reshape(n, layout.max_tags),
        "rating": table.column("rating_idx").to_numpy(zero_copy_only=False).astype(np.int32),
        "ext": table.column("ext_idx").to_numpy(zero_copy_only=False).astype(np.int32),
        "numeric": (numeric - mean) / std,
        "t_years": table.column(TIME_COLUMN).to_numpy(zero_copy_only=False).astype(np.float32),
        "weight": np.ones(n, np.float32),
    }


def _take(batch: Batch, idx: np.ndarray) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


def _concat(a: Batch | None, b: Batch) -> Batch:
    if a is None:
        return b
    return {k: np.concatenate([a[k], b[k]]) for k in b}


class ParquetBatches:
    """Iterates fixed-size batches of one row set; prefetches row groups on a thread."""

    def __init__(
        self,
        path: Path,
        layout: FeatureLayout,
        batch_size: int,
        rows: RowSet = "all",
        shuffle_seed: int | None = None,
        prefetch: int = 4,
        validation_fraction: float = 0.0,
        exclude_fold: tuple[int, int] | None = None,
        only_fold: tuple[int, int] | None = None,
        pool: ParquetBatches | None = None,
    ) -> None:
        """`rows`: "fit" is every trainable non-held-out post; "train" and "validation" split
        it by `validation_fraction`; "holdout" is never trained on; "all" is every post.
        `exclude_fold=(k, K)` drops fold k of K (a cross-fitting model's own fold);
        `only_fold=(k, K)` keeps only fold k. `pool`: the "fit" rows of the same file, from
        which a "fit", "train" or "validation" set takes what is derived once for them all
        (e.g. `ridge.design_of`) instead of deriving its own."""
        if pool is not None and (pool.rows != "fit" or rows not in ("fit", "train", "validation")
                                 or pool.exclude_fold or pool.only_fold):
            raise ValueError(f"rows {rows!r} cannot be taken from a pool of {pool.rows!r} rows")
        self.path = Path(path)
        self.layout = layout
        self.batch_size = batch_size
        self.rows = rows
        self.shuffle_seed = shuffle_seed
        self.prefetch = prefetch
        self.validation_fraction = validation_fraction
        self.exclude_fold = exclude_fold
        self.only_fold = only_fold
        self.pool = pool
        self.wait_seconds = 0.0
        self._columns = [
            "id",
            "fav_count",
            "y",
            "tags",
            "rating_idx",
            "ext_idx",
            "holdout",
            "trainable",
            *dict.fromkeys([*layout.numeric, TIME_COLUMN]),
        ]
        self._num_rows: int | None = None
        self._ids: np.ndarray | None = None
        self._loaded: Batch | None = None
        self._derived: dict = {}  # what fits computed from the rows (e.g. a design)

    def _mask(self, table: pa.Table) -> np.ndarray | None:
        rows = self._row_mask(table)
        by_fold = self.exclude_fold is not None or self.only_fold is not None
        if self.rows in ("train", "validation") or by_fold:
            by_id = self.id_mask(table.column("id").to_numpy(zero_copy_only=False))
            rows = by_id if rows is None else rows & by_id
        return rows

    def _row_mask(self, table: pa.Table) -> np.ndarray | None:
        """The rows of the row set by their flags (held out, trainable)."""
        if self.rows == "all":
            return None
        holdout = table.column("holdout").to_numpy(zero_copy_only=False)
        trainable = table.column("trainable").to_numpy(zero_copy_only=False)
        # Held-out rows are judged like training rows (e.g. no deleted posts), only unseen.
        return holdout & trainable if self.rows == "holdout" else ~holdout & trainable

    def id_mask(self, ids: np.ndarray) -> np.ndarray:
        """Which of the posts `ids` the row set keeps by id alone (the validation split and
        the folds): of a pool's "fit" rows, exactly this set's rows."""
        keep = np.ones(len(ids), bool)
        if self.rows in ("train", "validation"):
            val = validation_mask(ids, self.validation_fraction)
            keep &= val if self.rows == "validation" else ~val
        for folds, want in ((self.exclude_fold, False), (self.only_fold, True)):
            if folds is not None:
                keep &= (fold_of(ids, folds[1]) == folds[0]) == want
        return keep

    def num_rows(self) -> int:
        if self._num_rows is None:
            if self.pool is not None:  # counted on the pool's ids, without reading the file
                self._num_rows = int(self.id_mask(self.pool.ids()).sum())
            elif self.rows == "all" and self.exclude_fold is None and self.only_fold is None:
                self._num_rows = pq.ParquetFile(self.path).metadata.num_rows
            else:
                self._num_rows = len(self.ids())
        return self._num_rows

    def ids(self) -> np.ndarray:
        """The ids of the row set's posts, in file order (read once)."""
        if self._ids is None:
            if self._loaded is not None:
                self._ids = self._loaded["id"]
            else:
                t = pq.ParquetFile(self.path).read(columns=["id", "holdout", "trainable"])
                ids = t.column("id").to_numpy(zero_copy_only=False)
                mask = self._mask(t)
                self._ids = ids if mask is None else ids[mask]
        return self._ids

    def steps(self) -> int:
        return -(-self.num_rows() // self.batch_size)

    def _row_groups(self, epoch: int, shuffle: bool = True) -> Iterator[Batch]:
        pf = pq.ParquetFile(self.path)
        order = np.arange(pf.num_row_groups)
        rng = None
        if shuffle and self.shuffle_seed is not None:
            rng = np.random.default_rng([self.shuffle_seed, epoch])
            rng.shuffle(order)
        for g in order:
            table = pf.read_row_group(int(g), columns=self._columns)
            mask = self._mask(table)
            if mask is not None:
                table = table.filter(pa.array(mask))
            if table.num_rows == 0:
                continue
            batch = _table_to_batch(table, self.layout)
            if rng is not None:
                batch = _take(batch, rng.permutation(table.num_rows))
            yield batch

    def _batches(self, epoch: int, num_folds: int = 1) -> Iterator[Batch]:
        """Full batches of the epoch's rows, the last padded with weight-0 rows. With
        `num_folds` > 1, one read regrouped: each batch holds one fold's rows, named by its
        "fold" column (so each fold's model scores only its own posts, from one pass)."""
        carry: list[Batch | None] = [None] * num_folds
        bs = self.batch_size
        for group in self._row_groups(epoch):
            if num_folds > 1:
                fold = fold_of(group["id"], num_folds)
                group["fold"] = fold.astype(np.int8)
                parts = [_take(group, fold == k) for k in range(num_folds)]
            else:
                parts = [group]
            for k, part in enumerate(parts):
                carry[k] = _concat(carry[k], part)
                rows = carry[k]
                n_full = len(rows["id"]) // bs
                for i in range(n_full):
                    yield {key: v[i * bs : (i + 1) * bs] for key, v in rows.items()}
                carry[k] = {key: v[n_full * bs :] for key, v in rows.items()}
        for rows in carry:
            if rows is not None and len(rows["id"]):
                n = len(rows["id"])
                padded = _take(rows, np.concatenate([np.arange(n), np.zeros(bs - n, np.int64)]))
                padded["weight"][n:] = 0.0
                yield padded

    def row_bytes(self) -> int:
        """Host bytes one row takes once loaded (model inputs, target, id, weight)."""
        return 4 * (self.layout.max_tags + len(self.layout.numeric) + 5) + 16

    def load(self) -> Batch:
        """Every row of the row set, in file order, as one batch (no padding): for fits and
        scorings that keep the rows resident instead of re-reading the file each pass. Read
        once per instance, so the candidates fitted on one row set share it."""
        if self._loaded is None:
            self._loaded = self.read()
        return self._loaded

    def _from_pool(self) -> Batch | None:
        """A validation set's rows, taken from every fold's validation rows, which its pool
        reads once (each fit's validation slice is small, but reading it scans the whole file:
        8 s a fit at 6M posts)."""
        if self.pool is None or self.rows != "validation":
            return None
        fraction = self.validation_fraction
        every = self.pool.derived(
            ("validation rows", fraction),
            lambda: ParquetBatches(self.path, self.layout, self.batch_size, rows="validation",
                                   validation_fraction=fraction).read(),
        )
        return _take(every, self.id_mask(every["id"]))

    def read(self) -> Batch:
        """Every row of the row set as one batch, like `load`, but not kept (the loaded rows
        where they are)."""
        if self._loaded is not None:
            return self._loaded
        if (pooled := self._from_pool()) is not None:
            return pooled
        parts = list(self.chunks()) or [self.empty()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def empty(self) -> Batch:
        """A batch of no rows, with the columns and shapes of this set's batches."""
        empty = pq.ParquetFile(self.path).schema_arrow.empty_table()
        return _table_to_batch(empty.select(self._columns), self.layout)

    def chunks(self) -> Iterator[Batch]:
        """The row set's rows in file order, a row group at a time (nothing kept resident)."""
        return self._row_groups(0, shuffle=False)

    def split_class(self, ids: np.ndarray) -> np.ndarray:
        """Which part of a pool each of `ids` falls in under this set's split: fold x
        validation. Every set taken from the pool with the same split is a union of parts."""
        folds = self.exclude_fold or self.only_fold
        fold = fold_of(ids, folds[1]) if folds is not None else np.zeros(len(ids), np.int64)
        return fold * 2 + validation_mask(ids, self.validation_fraction)

    def derived(self, key: object, make: Callable[[], object]) -> object:
        """`make()`, computed once per key and kept until `release` (e.g. the exact fits'
        design, shared by the linear and additive candidates, or a pool's for every fold)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def release(self) -> None:
        """Forget the loaded rows and what was derived from them (the next load re-reads)."""
        self._loaded = None
        self._derived = {}

    def epoch(self, epoch: int = 0, num_folds: int = 1) -> Iterator[Batch]:
        """Batches of one epoch (with `num_folds` > 1: each of one fold, see `_batches`),
        produced on a background thread while the caller computes."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for b in self._batches(epoch, num_folds):
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True, name="e6score-batches")
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_seconds += time.perf_counter() - t0
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
