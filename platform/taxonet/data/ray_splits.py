"""A prepared dataset's splits as Ray Data datasets, for Ray Train (``TorchTrainer(datasets=...)``).

The same shards and columns as :func:`taxonet.data.pipeline.iter_parquet_batches` reads without Ray; the training
workers decode them with the pipeline's :class:`~taxonet.data.pipeline.Collator`, so Ray Data tasks only read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq
import ray.data

from taxonet import storage
from taxonet.data.dataset import DatasetInfo
from taxonet.data.pipeline import default_columns
from taxonet.errors import DatasetError


def read_split(uri: str, split: str, *, columns: Sequence[str] | None = None, shuffle_files: bool = False,
               num_cpus: float | None = None, override_num_blocks: int | None = None) -> ray.data.Dataset:
    """A ``ray.data.Dataset`` of one split (columns ``image`` + one per rank by default), local or S3.

    Reads exactly the shards that dataset.json lists for the split (each shard holds one split, so no row filter is
    needed). ``num_cpus`` sets the CPU reserved per read task; when training workers hold all CPUs of a node, pass a
    fraction (e.g. 0.25) so that reading can still be scheduled.
    """
    info = DatasetInfo.load(uri)
    shard_uris = info.shard_uris(split)
    filesystem, _ = storage.pyarrow_filesystem(uri)
    paths = [storage.pyarrow_filesystem(u)[1] for u in shard_uris]
    kwargs: dict[str, Any] = {}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if override_num_blocks is not None:
        kwargs["override_num_blocks"] = override_num_blocks
    try:
        return ray.data.read_parquet(
            paths,
            filesystem=filesystem,
            columns=list(columns) if columns is not None else default_columns(info.taxonomy),
            partitioning=None,  # a "key=value" folder in the dataset URI must not become a column
            shuffle="files" if shuffle_files else None,
            **kwargs,
        )
    except OSError as exc:
        if storage.is_s3(uri):
            raise storage.storage_error(exc, "read", uri) from None
        raise


def load_split(uri: str, split: str, *, columns: Sequence[str] | None = None) -> ray.data.Dataset:
    """A split read whole into the object store, as a materialized ``ray.data.Dataset`` (same columns and rows as
    :func:`read_split`), for splits small enough to keep in memory (``data.cache``).

    The shards are read in this process with pyarrow and handed to Ray with ``ray.data.from_arrow`` (``ray.put``):
    no Ray task runs. ``read_split(...).materialize()`` did the same through Ray Data's read tasks, and in a driver
    that then went on to read the next split, a task submitted after that execution was twice seen never to be
    scheduled (clean-clone CI, 2026-11-26: nothing running, nothing pending, the driver waiting forever).
    """
    info = DatasetInfo.load(uri)
    wanted = list(columns) if columns is not None else default_columns(info.taxonomy)
    tables = []
    for shard_uri in info.shard_uris(split):
        filesystem, path = storage.pyarrow_filesystem(shard_uri)
        try:
            tables.append(pq.read_table(path, filesystem=filesystem, columns=wanted))
        except OSError as exc:
            if storage.is_s3(shard_uri):
                raise storage.storage_error(exc, "read", shard_uri) from None
            raise
    if not tables:
        raise DatasetError(f"dataset {uri} has no shard for split {split!r}")
    return ray.data.from_arrow(tables)  # one block per shard
