"""The input pipeline: read a prepared dataset's shards (local or S3) and turn record batches into training tensors.

Two readers feed one consumer:

* :func:`iter_parquet_batches` — plain pyarrow, no Ray: evaluation, the threshold fit and the benchmarks use it;
* :func:`taxonet.data.ray_splits.read_split` — a Ray Data dataset over the same shards, for Ray Train
  (``ray.train.get_dataset_shard("train").iter_batches(batch_format="numpy")``).

Both yield column batches (``image`` = JPEG bytes, one label column per rank); :class:`Collator` decodes and
transforms in the consumer (the training worker), so Ray Data tasks only read. A record that fails to decode is
counted and skipped, never ends an epoch. This module does not import ray.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from taxonet import storage
from taxonet.data.dataset import DatasetInfo, ShardInfo
from taxonet.data.transforms import (DEFAULT_MAX_PIXELS, ImageDecodeError, TransformSpec, build_eval_transform,
                                     build_train_transform, decode_image)
from taxonet.taxonomy import Taxonomy, UnknownTaxonError, is_unspecified

logger = logging.getLogger(__name__)

#: row groups mixed together by the in-memory shuffle (rows are also stored in a seeded random order)
SHUFFLE_WINDOW = 4
_MAX_OPEN_FILES = 16
_MAX_WARNINGS = 50


# ---------------------------------------------------------------------------------------------------- plain reader
def default_columns(taxonomy: Taxonomy) -> list[str]:
    """What training needs: the image and one label column per rank."""
    return ["image", *taxonomy.ranks]


def _row_groups(info: DatasetInfo, shards: Sequence[ShardInfo], opener: "_FileCache") -> list[tuple[int, int, int]]:
    """``(shard number, row group, rows)`` for every row group of the given shards (reads only the footers)."""
    units = []
    for number, shard in enumerate(shards):
        metadata = opener.get(info.shard_uri(shard)).metadata
        units.extend((number, group, metadata.row_group(group).num_rows) for group in range(metadata.num_row_groups))
    return units


class _FileCache:
    """A few open Parquet files (LRU), so shuffled row-group reads do not reopen a file (a footer fetch on S3)."""

    def __init__(self, capacity: int = _MAX_OPEN_FILES) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, tuple[pa.NativeFile, pq.ParquetFile]] = OrderedDict()

    def get(self, uri: str) -> pq.ParquetFile:
        if uri in self._open:
            self._open.move_to_end(uri)
            return self._open[uri][1]
        filesystem, path = storage.pyarrow_filesystem(uri)
        try:
            handle = filesystem.open_input_file(path)
            parquet = pq.ParquetFile(handle)
        except OSError as exc:
            if storage.is_s3(uri):
                raise storage.storage_error(exc, "read", uri) from None
            raise
        self._open[uri] = (handle, parquet)
        while len(self._open) > self.capacity:
            _, (old_handle, _) = self._open.popitem(last=False)
            old_handle.close()
        return parquet

    def close(self) -> None:
        for handle, _ in self._open.values():
            handle.close()
        self._open.clear()


def _to_batch(table: pa.Table) -> dict[str, list | np.ndarray]:
    batch: dict[str, list | np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            batch[name] = column.to_numpy()
        else:
            batch[name] = column.to_pylist()
    return batch


def iter_parquet_batches(
    uri: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    columns: Sequence[str] | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, list | np.ndarray]]:
    """Column batches of one split, read with pyarrow (no Ray).

    Row groups are the unit of work: with ``num_shards`` workers, worker ``shard_index`` reads every
    ``num_shards``-th row group of a seeded order, so workers read disjoint rows that together cover the split
    (their row counts may differ by up to one row group: DDP loops should agree on a step count). ``shuffle``
    permutes the row groups and the rows inside a window of :data:`SHUFFLE_WINDOW` row groups; pass
    ``seed=base + epoch`` for a new order every epoch. Binary/string columns come as lists (``None`` = null),
    numeric ones as NumPy arrays.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in 0..{num_shards - 1}, got {shard_index}")
    info = DatasetInfo.load(uri)
    shards = info.shards_for(split)
    columns = list(columns) if columns is not None else default_columns(info.taxonomy)
    files = _FileCache()
    try:
        units = _row_groups(info, shards, files)
        order = np.random.default_rng(seed).permutation(len(units)) if shuffle else np.arange(len(units))
        mine = [units[i] for i in order[shard_index::num_shards]]
        rng = np.random.default_rng([seed, shard_index, 1])
        window = SHUFFLE_WINDOW if shuffle else 1
        pending = None  # rows read but not yet yielded
        for start in range(0, len(mine), window):
            tables = []
            for number, group, _ in mine[start:start + window]:
                shard_uri = info.shard_uri(shards[number])
                try:
                    tables.append(files.get(shard_uri).read_row_group(group, columns=columns))
                except OSError as exc:
                    if storage.is_s3(shard_uri) and not isinstance(exc, FileNotFoundError):
                        raise storage.storage_error(exc, "read", shard_uri) from None
                    raise
            table = pa.concat_tables(tables if pending is None else [pending, *tables])
            if shuffle:
                table = table.take(pa.array(rng.permutation(table.num_rows)))
            full = table.num_rows - table.num_rows % batch_size
            for offset in range(0, full, batch_size):
                yield _to_batch(table.slice(offset, batch_size))
            pending = table.slice(full) if full < table.num_rows else None
        if pending is not None and pending.num_rows and not drop_last:
            yield _to_batch(pending)
    finally:
        files.close()


# ---------------------------------------------------------------------------------------------------- collator
class Collator:
    """Column batch → ``(images float32 [N, 3, S, S], targets int64 [N, depth])`` for the model and the loss.

    Decodes the ``image`` bytes (``threads`` > 1 uses a thread pool: PIL releases the GIL while decoding), applies the
    train transform (the paper's augmentations) or the eval transform, and encodes the rank columns with the
    taxonomy (unspecified → -1). A record that cannot be decoded (or whose labels the taxonomy does not know, with
    ``unknown="skip"``) is skipped, counted in :attr:`skipped` and logged; the call never raises for bad records,
    and an all-bad batch gives empty tensors. ``unknown="unspecified"`` instead maps names the taxonomy does not
    know to -1 at their rank (e.g. unseen species evaluated with the known taxonomy).
    """

    def __init__(self, taxonomy: Taxonomy, spec: TransformSpec, train: bool, threads: int = 1, *, augment: bool = True,
                 max_pixels: int | None = None, unknown: str = "skip") -> None:
        if unknown not in ("skip", "unspecified"):
            raise ValueError(f"unknown must be 'skip' or 'unspecified', got {unknown!r}")
        self.taxonomy = taxonomy
        self.spec = spec
        self.train = train
        self.augment = augment
        self.threads = max(1, int(threads))
        self.unknown = unknown
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.transform = build_train_transform(spec, augment) if train else build_eval_transform(spec)
        self.skipped = 0
        self.skipped_by_reason: dict[str, int] = {}
        self._label_cache: dict[tuple, tuple[int, ...] | None] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:  # picklable (e.g. shipped to a Ray worker): rebuilt there
        state = dict(self.__dict__)
        state["_pool"] = None
        state["transform"] = None  # a closure; rebuilt from the spec
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.transform = (build_train_transform(self.spec, self.augment) if self.train
                          else build_eval_transform(self.spec))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _encode(self, labels: tuple) -> tuple[int, ...] | None:
        cached = self._label_cache.get(labels, ...)
        if cached is not ...:
            return cached
        try:
            encoded = self.taxonomy.encode(labels)
        except UnknownTaxonError:
            if self.unknown == "skip":
                encoded = None
            else:  # keep the ranks the taxonomy knows; names it does not know become unspecified
                known = [name if not is_unspecified(name) and (level, str(name).strip()) in self.taxonomy else None
                         for level, name in enumerate(labels)]
                known = known[: next((i for i, n in enumerate(known) if n is None), len(known))]
                try:
                    encoded = self.taxonomy.encode(known + [None] * (self.taxonomy.depth - len(known)))
                except UnknownTaxonError:
                    encoded = None
        self._label_cache[labels] = encoded
        return encoded

    def _decode(self, data: Any) -> torch.Tensor | Exception:
        try:
            if data is None:
                raise ImageDecodeError("corrupt", "null image")
            return self.transform(decode_image(bytes(data), max_pixels=self.max_pixels))
        except ImageDecodeError as exc:
            return exc
        except Exception as exc:  # a transform failing on an odd image must not end the epoch either
            return exc

    def _skip(self, reason: str, message: str) -> None:
        self.skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        if self.skipped <= _MAX_WARNINGS:
            logger.warning("skipping a record: %s (%s)%s", message, reason,
                           "; further skips are only counted" if self.skipped == _MAX_WARNINGS else "")

    def _targets(self, batch: dict[str, Any]) -> tuple[list[int], list[tuple[int, ...] | None]]:
        """The rows whose labels the taxonomy knows (the others are skipped and counted), and every row's targets."""
        n = len(batch["image"])
        missing = [rank for rank in self.taxonomy.ranks if rank not in batch]
        if missing:
            raise KeyError(f"batch has no label column(s) {missing}; columns are {sorted(batch)}")
        columns = [batch[rank] for rank in self.taxonomy.ranks]
        targets: list[tuple[int, ...] | None] = []
        for i in range(n):
            labels = tuple(None if is_unspecified(column[i]) else str(column[i]) for column in columns)
            targets.append(self._encode(labels))
        for i in range(n):
            if targets[i] is None:
                self._skip("unknown_label", f"labels not in the taxonomy: {[c[i] for c in columns]}")
        return [i for i in range(n) if targets[i] is not None], targets

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        size = self.spec.input_size
        todo, targets = self._targets(batch)
        if self.threads > 1 and len(todo) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="taxonet-decode")
            decoded = list(self._pool.map(self._decode, [images[i] for i in todo]))
        else:
            decoded = [self._decode(images[i]) for i in todo]
        tensors, kept = [], []
        for i, result in zip(todo, decoded):
            if isinstance(result, Exception):
                reason = getattr(result, "code", type(result).__name__)
                self._skip(reason, str(result))
            else:
                tensors.append(result)
                kept.append(targets[i])
        if not tensors:
            return (torch.empty((0, 3, size, size), dtype=torch.float32),
                    torch.empty((0, self.taxonomy.depth), dtype=torch.long))
        return torch.stack(tensors), torch.tensor(kept, dtype=torch.long)


def resolve_loader_threads(setting: int | str, cpus: float) -> int:
    """``train.loader_threads``: a number as given, or "auto" = the worker's CPUs rounded down (at least 1)."""
    if setting == "auto":
        return max(1, int(cpus))
    return max(1, int(setting))
