"""The prepared dataset format: Parquet shards plus ``dataset.json``, and :class:`DatasetInfo` to read and verify it.

A dataset is a prefix (local directory or ``s3://bucket/prefix``) holding::

    shards/part-<split>-<run>-<n>.parquet   columns: image (JPEG bytes), one string column per rank of the taxonomy
                                            (null = unspecified), split, source, sha256, width, height, origin
    dataset.json                            schema_version, taxonomy, counts, shards (path, split, rows), report

``dataset.json`` is written last and names every shard, so a reader trusts nothing else: an interrupted prepare
leaves shards that no dataset.json lists, and :meth:`DatasetInfo.load` refuses a prefix without one. Every shard
holds rows of a single split, so a reader of one split opens only that split's shards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from taxonet import storage
from taxonet.errors import DatasetError, StorageError
from taxonet.taxonomy import Taxonomy, TaxonomyError

SCHEMA_VERSION = 1
DATASET_JSON = "dataset.json"
SHARDS_DIR = "shards"
IMAGE_COLUMN = "image"
#: columns every shard has besides one string column per rank
FIXED_COLUMNS = ("image", "split", "source", "sha256", "width", "height", "origin")
#: split names are short identifiers (they appear in file names)
SPLIT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
STANDARD_SPLITS = ("train", "val", "test", "unseen")


def rank_columns(taxonomy: Taxonomy) -> list[str]:
    """The rank columns of a shard (the taxonomy's rank names), refusing names that clash with fixed columns."""
    clash = sorted(set(taxonomy.ranks) & set(FIXED_COLUMNS))
    if clash:
        raise DatasetError(f"rank name(s) {clash} clash with the dataset columns {list(FIXED_COLUMNS)}; "
                           f"rename the ranks")
    return list(taxonomy.ranks)


def parquet_schema(taxonomy: Taxonomy) -> pa.Schema:
    """The Arrow schema of a shard for ``taxonomy``."""
    fields = [pa.field("image", pa.binary(), nullable=False)]
    fields += [pa.field(rank, pa.string()) for rank in rank_columns(taxonomy)]
    fields += [
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("origin", pa.string()),
    ]
    return pa.schema(fields)


def check_split_name(name: str) -> str:
    if not isinstance(name, str) or not SPLIT_NAME.match(name):
        raise DatasetError(f"invalid split name {name!r}: use lowercase letters, digits, '-' or '_' (e.g. train, val)")
    return name


class CountAccumulator:
    """Counts rows per split, per (rank, class, split) and unspecified labels per (rank, split)."""

    def __init__(self, ranks: Sequence[str]) -> None:
        self.ranks = tuple(ranks)
        self.total = 0
        self.splits: dict[str, int] = {}
        self.classes: dict[str, dict[str, dict[str, int]]] = {rank: {} for rank in self.ranks}
        self.unspecified: dict[str, dict[str, int]] = {rank: {} for rank in self.ranks}

    def add(self, labels: Sequence[str | None], split: str, n: int = 1) -> None:
        self.total += n
        self.splits[split] = self.splits.get(split, 0) + n
        for rank, name in zip(self.ranks, labels):
            if name is None:
                per_split = self.unspecified[rank]
            else:
                per_split = self.classes[rank].setdefault(name, {})
            per_split[split] = per_split.get(split, 0) + n

    def to_dict(self) -> dict[str, Any]:
        """Plain, key-sorted dict (so two countings of the same rows compare equal)."""

        def ordered(mapping: dict) -> dict:
            return {k: ordered(v) if isinstance(v, dict) else v for k, v in sorted(mapping.items())}

        return {
            "total": self.total,
            "splits": ordered(self.splits),
            "classes": {rank: ordered(self.classes[rank]) for rank in self.ranks},
            "unspecified": {rank: ordered(self.unspecified[rank]) for rank in self.ranks},
        }


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file of the dataset: its path relative to the dataset prefix, its split and row count."""

    path: str
    split: str
    rows: int
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "split": self.split, "rows": self.rows, "bytes": self.bytes}


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says about a prepared dataset. Load with :meth:`load`; check with :meth:`verify`."""

    uri: str
    taxonomy: Taxonomy
    shards: tuple[ShardInfo, ...]
    counts: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, uri: str) -> "DatasetInfo":
        """Read ``URI/dataset.json``; a prefix without one is not a dataset (possibly an interrupted prepare)."""
        uri = str(uri)
        if uri.endswith("/" + DATASET_JSON) or uri == DATASET_JSON:
            uri = uri[: -len(DATASET_JSON)].rstrip("/") or "."
        location = storage.join(uri, DATASET_JSON)
        try:
            text = storage.read_bytes(location)
        except FileNotFoundError:
            raise DatasetError(
                f"no dataset at {uri}: {DATASET_JSON} is missing (not a prepared dataset, or a prepare that did not "
                f"finish; run `taxonet prepare` again)"
            ) from None
        except IsADirectoryError:
            raise DatasetError(f"no dataset at {uri}: {location} is a directory") from None
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{location} is not valid JSON: {exc}") from None
        return cls.from_dict(uri, data)

    @classmethod
    def from_dict(cls, uri: str, data: Any) -> "DatasetInfo":
        if not isinstance(data, dict):
            raise DatasetError(f"{uri}/{DATASET_JSON}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetError(f"{uri}/{DATASET_JSON}: schema_version {version!r} is not supported "
                               f"(this taxonet reads version {SCHEMA_VERSION})")
        try:
            taxonomy = Taxonomy.from_dict(data["taxonomy"])
            shards = tuple(ShardInfo(path=str(s["path"]), split=check_split_name(str(s["split"])), rows=int(s["rows"]),
                                     bytes=int(s.get("bytes", 0))) for s in data["shards"])
            counts = dict(data["counts"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (TaxonomyError, DatasetError)):
                raise DatasetError(f"{uri}/{DATASET_JSON}: {exc}") from None
            raise DatasetError(f"{uri}/{DATASET_JSON} is incomplete or malformed "
                               f"({type(exc).__name__}: {exc})") from None
        rank_columns(taxonomy)
        known = {"schema_version", "taxonomy", "shards", "counts", "report"}
        return cls(uri=uri, taxonomy=taxonomy, shards=shards, counts=counts, report=dict(data.get("report", {})),
                   metadata={k: v for k, v in data.items() if k not in known}, schema_version=version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            **self.metadata,
            "taxonomy": self.taxonomy.to_dict(),
            "columns": [*FIXED_COLUMNS[:1], *self.taxonomy.ranks, *FIXED_COLUMNS[1:]],
            "counts": self.counts,
            "shards": [s.to_dict() for s in self.shards],
            "report": self.report,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    # ------------------------------------------------------------------ lookups
    @property
    def splits(self) -> tuple[str, ...]:
        """Split names present, in a friendly order (train, val, test, unseen, then others)."""
        names = set(self.counts.get("splits", {})) | {s.split for s in self.shards}
        return tuple(sorted(names, key=lambda s: (STANDARD_SPLITS.index(s) if s in STANDARD_SPLITS else 99, s)))

    def num_rows(self, split: str | None = None) -> int:
        return sum(s.rows for s in self.shards if split is None or s.split == split)

    def shards_for(self, split: str | None = None) -> list[ShardInfo]:
        """Shards of one split (all shards when ``split`` is None); an unknown split is an error."""
        if split is None:
            return list(self.shards)
        if split not in self.splits:
            raise DatasetError(f"dataset {self.uri} has no split {split!r}; splits are {list(self.splits)}")
        return [s for s in self.shards if s.split == split]

    def shard_uri(self, shard: ShardInfo) -> str:
        return storage.join(self.uri, shard.path)

    def shard_uris(self, split: str | None = None) -> list[str]:
        return [self.shard_uri(s) for s in self.shards_for(split)]

    # ------------------------------------------------------------------ checks
    def verify(self) -> dict[str, Any]:
        """Check the shards against dataset.json: every shard exists, has the schema, the listed row count, only its
        split, and the label columns recount to ``counts``. Raises DatasetError listing every problem; returns a
        short summary on success. Reads Parquet footers and the small label columns, never the images."""
        problems: list[str] = []
        ranks = rank_columns(self.taxonomy)
        expected_columns = set(FIXED_COLUMNS) | set(ranks)
        recount = CountAccumulator(ranks)
        for shard in self.shards:
            uri = self.shard_uri(shard)
            try:
                filesystem, path = storage.pyarrow_filesystem(uri)
                with filesystem.open_input_file(path) as handle:
                    parquet = pq.ParquetFile(handle)
                    columns = set(parquet.schema_arrow.names)
                    missing = sorted(expected_columns - columns)
                    if missing:
                        problems.append(f"{shard.path}: missing columns {missing}")
                        continue
                    if parquet.metadata.num_rows != shard.rows:
                        problems.append(f"{shard.path}: {parquet.metadata.num_rows} rows, "
                                        f"dataset.json says {shard.rows}")
                    table = parquet.read(columns=[*ranks, "split"])
            except FileNotFoundError:
                problems.append(f"{shard.path}: missing")
                continue
            except StorageError:
                raise
            except OSError as exc:
                if storage.is_s3(uri) and not isinstance(exc, FileNotFoundError):
                    raise storage.storage_error(exc, "read", uri) from None
                problems.append(f"{shard.path}: unreadable ({exc})")
                continue
            except Exception as exc:  # ArrowInvalid and friends: a damaged file
                problems.append(f"{shard.path}: not a valid Parquet file ({type(exc).__name__}: {exc})")
                continue
            splits = table.column("split").to_pylist()
            others = sorted(set(splits) - {shard.split})
            if others:
                problems.append(f"{shard.path}: holds split(s) {others} besides {shard.split!r}")
            label_columns = [table.column(rank).to_pylist() for rank in ranks]
            for row, split in enumerate(splits):
                recount.add([column[row] for column in label_columns], split)
        if not problems:
            recounted = recount.to_dict()
            for key in ("total", "splits", "classes", "unspecified"):
                if recounted.get(key) != self.counts.get(key):
                    problems.append(f"counts[{key!r}] in dataset.json do not match the shards")
        if problems:
            raise DatasetError(f"dataset {self.uri} failed verification:\n  " + "\n  ".join(problems))
        return {"shards": len(self.shards), "rows": recount.total, "splits": recount.to_dict()["splits"]}

    # ------------------------------------------------------------------ display
    def format_counts(self) -> str:
        """Per-rank tables: one row per class (all classes of the taxonomy), one column per split."""
        splits = list(self.splits)
        blocks = [format_table(["split", "rows"], [[s, self.counts.get("splits", {}).get(s, 0)] for s in splits]
                               + [["total", self.counts.get("total", 0)]])]
        classes = self.counts.get("classes", {})
        unspecified = self.counts.get("unspecified", {})
        for level, rank in enumerate(self.taxonomy.ranks):
            rows = []
            for name in self.taxonomy.names[level]:
                per_split = classes.get(rank, {}).get(name, {})
                rows.append([name, *(per_split.get(s, 0) for s in splits), sum(per_split.values())])
            per_split = unspecified.get(rank, {})
            if per_split:
                rows.append(["(unspecified)", *(per_split.get(s, 0) for s in splits), sum(per_split.values())])
            blocks.append(format_table([rank, *splits, "total"], rows))
        return "\n\n".join(blocks)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    rows = [[str(c) for c in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]
    widths = [max([len(str(h)), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return "\n".join([line([str(h) for h in headers]), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False
