"""Prepare: turn an image folder tree or a labelled table (local or S3) into a validated, sharded dataset.

Steps, in this order, so that bad input never leaves anything behind:

1. scan the source: ``ORDER/FAMILY/SPECIES/*`` folders (one level per rank; fewer levels = a partial label), folders
   named ``"Order Family Genus species"`` (the paper's data; fewer words = a partial label), or a CSV/Parquet table
   ``path, <one column per rank>[, split, source]`` with paths relative to the table;
2. check every label against the taxonomy, or infer the taxonomy from the labels: unknown labels and taxa under two
   parents are one error that lists them all, before anything is written;
3. check the destination (bucket, credentials, an existing dataset) — still before any work;
4. in parallel over the cores: read, hash (sha256), decode, resize the longer side to ``max_side``, re-encode JPEG;
   unreadable files are skipped and listed, exact duplicates dropped and counted;
5. a seeded split stratified by species (deepest known label), then Parquet shards, one split per shard, rows in a
   seeded random order, and ``dataset.json`` last. Leftover shards of an interrupted run are removed afterwards.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from taxonet import __version__, storage
from taxonet.data.dataset import (
    DATASET_JSON,
    SHARDS_DIR,
    STANDARD_SPLITS,
    CountAccumulator,
    DatasetInfo,
    ShardInfo,
    check_split_name,
    format_table,
    parquet_schema,
    rank_columns,
)
from taxonet.data.synthetic import SyntheticInsects, SyntheticSample, unseen_species
from taxonet.data.transforms import ImageDecodeError, decode_image
from taxonet.errors import DatasetError, StorageError
from taxonet.taxonomy import DEFAULT_RANKS, Taxonomy, TaxonomyError, UnknownTaxonError, is_unspecified

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
#: reasons a file is skipped (counted per reason in the report)
SKIP_REASONS = ("empty", "corrupt", "unsupported", "too_large", "missing", "unreadable", "unlabelled")
#: at most this many skipped/duplicate files are listed in dataset.json (all of them are counted)
MAX_LISTED = 10_000
_CHUNK = 8  # images per task sent to a worker process: amortises the pickling round trip
_SPOOL_SCHEMA = pa.schema([("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32())])
_SPOOL_BATCH = 256  # rows per record batch of the spool


@dataclass(frozen=True)
class PrepareOptions:
    """Knobs of ``taxonet prepare`` (defaults suit the paper's 128 px input: stored images keep 2× headroom)."""

    max_side: int = 256
    #: store every crop at exactly N × N pixels, the training input size (squashed and resized bilinear as the eval
    #: transform does), so that training only decodes; 0 = keep the aspect ratio, longer side ≤ ``max_side``
    train_size: int = 0
    shard_size: int = 1000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    #: worker processes for decode/resize/encode; None = all cores, 0 or 1 = in this process
    workers: int | None = None
    jpeg_quality: int = 90
    #: images larger than this (in pixels, read from the header) are skipped as too large
    max_pixels: int = 100_000_000
    row_group_size: int = 128
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_side < 8:
            raise DatasetError(f"--max-side must be at least 8 pixels, got {self.max_side}")
        if self.train_size != 0 and self.train_size < 8:
            raise DatasetError(f"--train-size must be at least 8 pixels (or 0 = off), got {self.train_size}")
        if self.shard_size < 1:
            raise DatasetError(f"--shard-size must be positive, got {self.shard_size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DatasetError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DatasetError("--val-fraction plus --test-fraction must leave room for a training split (< 1)")
        if not 1 <= self.jpeg_quality <= 100:
            raise DatasetError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if self.workers is not None and self.workers < 0:
            raise DatasetError(f"--workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class SourceItem:
    """One input image: where it comes from, its labels (one per rank, None = unspecified) and optional split."""

    origin: str
    labels: tuple[str | None, ...]
    split: str | None = None
    source: str | None = None
    #: the image bytes themselves (synthetic data); otherwise read from ``origin``
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why (one of :data:`SKIP_REASONS`)."""

    path: str
    reason: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason, "message": self.message}


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for a shard: the hash of the bytes read, and the re-encoded JPEG with its size."""

    sha256: str
    jpeg: bytes = field(repr=False)
    width: int
    height: int


@dataclass
class PrepareResult:
    """What a prepare did: the dataset written and the files it skipped or dropped."""

    info: DatasetInfo
    skipped: list[Skipped]
    duplicates: list[dict[str, Any]]
    files_found: int
    seconds: float

    @property
    def written(self) -> int:
        return self.info.num_rows()

    def format_summary(self, max_listed: int = 20) -> str:
        rate = self.files_found / self.seconds if self.seconds > 0 else 0.0
        reasons = Counter(s.reason for s in self.skipped)
        rows = [["dataset", self.info.uri], ["files found", self.files_found], ["written", self.written]]
        rows += [[f"  {split}", self.info.num_rows(split)] for split in self.info.splits]
        rows += [["duplicates dropped", len(self.duplicates)], ["skipped", len(self.skipped)]]
        rows += [[f"  {reason}", n] for reason, n in sorted(reasons.items())]
        rows += [["shards", len(self.info.shards)], ["taxonomy", self.info.taxonomy.describe()],
                 ["time", f"{self.seconds:.1f} s ({rate:.0f} images/s)"]]
        text = format_table(["prepare", "result"], rows)
        if self.skipped:
            listed = [[s.reason, s.path, s.message] for s in self.skipped[:max_listed]]
            text += "\n\nskipped files:\n" + format_table(["reason", "file", "detail"], listed)
            if len(self.skipped) > max_listed:
                text += f"\n... and {len(self.skipped) - max_listed} more (all listed in {DATASET_JSON})"
        if self.duplicates:
            listed = [[d["path"], d["duplicate_of"]] for d in self.duplicates[:max_listed]]
            text += "\n\nduplicates dropped:\n" + format_table(["file", "same bytes as"], listed)
            if len(self.duplicates) > max_listed:
                text += f"\n... and {len(self.duplicates) - max_listed} more"
        return text + "\n\n" + self.info.format_counts()


# ---------------------------------------------------------------------------------------------------- taxonomy
def load_taxonomy(reference: str | None) -> Taxonomy | None:
    """``None`` (infer), ``"demo"``, or a YAML/JSON/CSV taxonomy file (local or S3)."""
    if reference is None:
        return None
    if reference == "demo":
        return Taxonomy.demo()
    if not storage.is_s3(reference):
        return Taxonomy.load(storage.local_path(reference))
    return Taxonomy.parse(storage.read_bytes(reference).decode("utf-8"), reference)


# ---------------------------------------------------------------------------------------------------- scanning
def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def labels_from_folder(parts: Sequence[str], depth: int) -> tuple[str | None, ...]:
    """Folder names below the root → labels.

    ``["Diptera", "Syrphidae", "Eristalis tenax"]`` (one folder per rank), or a single folder of words
    ``"Diptera Syrphidae Eristalis tenax"``: one word per rank above the last, the remaining words name the last
    rank (a binomial has two). Fewer levels or words give a partial label.
    """
    if len(parts) == 1 and len(parts[0].split()) > 1 and depth > 1:
        words = parts[0].split()
        names = words[: depth - 1]
        if len(words) >= depth:
            names.append(" ".join(words[depth - 1:]))
    else:
        names = [p.strip() for p in parts]
    if len(names) > depth:
        raise ValueError(f"{len(names)} folder levels but the taxonomy has {depth} ranks")
    labels = [None if is_unspecified(n) else n for n in names]
    return tuple(labels + [None] * (depth - len(labels)))


def scan_folder(src: str, ranks: Sequence[str]) -> tuple[list[SourceItem], list[Skipped], list[tuple[str, str]]]:
    """Every non-hidden file below ``src`` with its folder labels; files at the root are unlabelled."""
    files = storage.list_files(src)
    if not files:
        raise DatasetError(f"{src}: no files found (expected ORDER/FAMILY/SPECIES/* folders or a CSV/Parquet table)")
    source_name = os.path.basename(str(src).rstrip("/")) or None
    items: list[SourceItem] = []
    skipped: list[Skipped] = []
    problems: list[tuple[str, str]] = []
    for uri in files:
        relative = storage.relative_to(uri, src)
        if _hidden(relative):
            continue
        parts = relative.split("/")[:-1]
        if not parts:
            skipped.append(Skipped(uri, "unlabelled", "file at the top of the source folder has no label folder"))
            continue
        try:
            labels = labels_from_folder(parts, len(ranks))
        except ValueError as exc:
            problems.append((f"folder {'/'.join(parts)!r}: {exc}", uri))
            continue
        items.append(SourceItem(origin=uri, labels=labels, source=source_name))
    return items, skipped, problems


def read_table(src: str, ranks: Sequence[str]) -> list[SourceItem]:
    """Rows of a CSV/Parquet table ``path, <ranks...>[, split, source]``; relative paths are relative to the table."""
    data = storage.read_bytes(src)
    if src.lower().endswith(".csv"):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{src}: not UTF-8 text ({exc})") from None
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
    else:
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:
            raise DatasetError(f"{src}: not a readable Parquet table ({type(exc).__name__}: {exc})") from None
        columns = table.column_names
        rows = table.to_pylist()
    required = ["path", *ranks]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(f"{src}: missing column(s) {missing}; expected {required} (+ optional split, source)")
    base = src.rsplit("/", 1)[0] if storage.is_s3(src) else os.path.dirname(os.path.abspath(storage.local_path(src)))
    items = []
    for number, row in enumerate(rows, start=2 if src.lower().endswith(".csv") else 1):
        path = str(row.get("path") or "").strip()
        if not path:
            raise DatasetError(f"{src}: row {number} has an empty path")
        if not (storage.is_s3(path) or path.startswith(storage.FILE_SCHEME) or os.path.isabs(path)):
            path = storage.join(base, path)
        labels = tuple(None if is_unspecified(row.get(rank)) else str(row[rank]).strip() for rank in ranks)
        split = row.get("split")
        split = None if is_unspecified(split) else str(split).strip().lower()
        source = row.get("source")
        items.append(SourceItem(origin=path, labels=labels, split=split,
                                source=None if is_unspecified(source) else str(source)))
    if not items:
        raise DatasetError(f"{src}: the table has no rows")
    return items


def scan_source(src: str, ranks: Sequence[str]) -> tuple[list[SourceItem], list[Skipped], list[tuple[str, str]]]:
    """A folder tree or a table (by suffix) → items, files skipped while scanning, structural label problems."""
    if str(src).lower().endswith(TABLE_SUFFIXES):
        return read_table(str(src), ranks), [], []
    if not storage.is_s3(src) and not storage.local_path(src).exists():
        raise FileNotFoundError(f"source {src} does not exist")
    return scan_folder(str(src), ranks)


# ---------------------------------------------------------------------------------------------------- labels
def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _listing(groups: dict[str, list[str]], limit: int = 50) -> list[str]:
    lines = [f"{what} ({_plural(len(files), 'file')}, e.g. {files[0]})" for what, files in list(groups.items())[:limit]]
    if len(groups) > limit:
        lines.append(f"... and {len(groups) - limit} more")
    return lines


def resolve_labels(items: Sequence[SourceItem], taxonomy: Taxonomy | None, ranks: Sequence[str],
                   structural: Sequence[tuple[str, str]] = ()) -> tuple[Taxonomy, list[SourceItem]]:
    """Check every label (or infer the taxonomy); return the taxonomy and items with complete parent chains.

    All problems are collected and raised together as one DatasetError, so one run shows everything to fix.
    """
    problems: dict[str, list[str]] = {}
    for what, origin in structural:
        problems.setdefault(what, []).append(origin)
    bad_splits: dict[str, list[str]] = {}
    for item in items:
        if item.split is not None:
            try:
                check_split_name(item.split)
            except DatasetError:
                bad_splits.setdefault(f"split {item.split!r}", []).append(item.origin)
    if taxonomy is None:
        taxonomy = _infer_taxonomy(items, ranks, problems)
    resolved: list[SourceItem] = []
    unknown: dict[str, list[str]] = {}
    conflicts: dict[str, list[str]] = {}
    unlabelled: list[str] = []
    for item in items:
        if all(name is None for name in item.labels):
            unlabelled.append(item.origin)
            continue
        missing = [f"{taxonomy.ranks[lv]} {name!r}" for lv, name in enumerate(item.labels)
                   if name is not None and (lv, name) not in taxonomy]
        if missing:
            for what in missing:
                unknown.setdefault(what, []).append(item.origin)
            continue
        try:
            indices = taxonomy.encode(item.labels)
        except UnknownTaxonError as exc:
            conflicts.setdefault(str(exc), []).append(item.origin)
            continue
        resolved.append(replace(item, labels=tuple(taxonomy.decode(indices))))
    messages = []
    if problems:
        messages.append("bad folders:\n  " + "\n  ".join(_listing(problems)))
    if unknown:
        messages.append(f"{_plural(len(unknown), 'label')} not in the taxonomy ({taxonomy.describe()}):\n  "
                        + "\n  ".join(_listing(unknown)))
    if conflicts:
        messages.append("labels that contradict the taxonomy (a taxon under the wrong parent):\n  "
                        + "\n  ".join(_listing(conflicts)))
    if bad_splits:
        messages.append("invalid split names (use e.g. train, val, test):\n  " + "\n  ".join(_listing(bad_splits)))
    if unlabelled:
        messages.append(f"{_plural(len(unlabelled), 'file')} without any label, e.g. {unlabelled[0]}")
    if messages:
        raise DatasetError("invalid labels, nothing was written:\n" + "\n".join(messages))
    return taxonomy, resolved


def _infer_taxonomy(items: Sequence[SourceItem], ranks: Sequence[str], problems: dict[str, list[str]]) -> Taxonomy:
    """A taxonomy from the fully labelled items; a taxon seen under two parents is recorded in ``problems``."""
    parents: list[dict[str, dict[str, list[str]]]] = [{} for _ in ranks]
    rows: set[tuple[str, ...]] = set()
    for item in items:
        for level in range(1, len(ranks)):
            name, parent = item.labels[level], item.labels[level - 1]
            if name is not None and parent is not None:
                parents[level].setdefault(name, {}).setdefault(parent, []).append(item.origin)
        if all(name is not None for name in item.labels):
            rows.add(tuple(item.labels))  # type: ignore[arg-type]
    lines = _listing(problems)
    for level, by_name in enumerate(parents):
        for name, by_parent in sorted(by_name.items()):
            if len(by_parent) > 1:
                listed = ", ".join(f"{p!r} ({_plural(len(f), 'file')}, e.g. {f[0]})"
                                   for p, f in sorted(by_parent.items()))
                lines.append(f"{ranks[level]} {name!r} is under {len(by_parent)} {ranks[level - 1]} taxa: {listed}")
    if lines:
        raise DatasetError("invalid labels, nothing was written:\n  " + "\n  ".join(lines))
    if not rows:
        raise DatasetError(f"no file is labelled down to the last rank ({ranks[-1]}): cannot infer a taxonomy; "
                           f"pass --taxonomy FILE")
    try:
        return Taxonomy.from_rows(sorted(rows), ranks)
    except TaxonomyError as exc:
        raise DatasetError(f"cannot infer a taxonomy from the labels: {exc}") from None


# ---------------------------------------------------------------------------------------------------- splits
def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def assign_splits(strata: Sequence[str], keys: Sequence[str], given: Sequence[str | None], val_fraction: float,
                  test_fraction: float, seed: int) -> list[str]:
    """A seeded split stratified by ``strata`` (e.g. the species): per stratum, ``round(n·f)`` rows go to val and test,
    at least one stays in train. ``keys`` (content hashes) fix the order, so the split does not depend on the order
    the files were listed in. Rows with a ``given`` split keep it."""
    out: list[str | None] = list(given)
    groups: dict[str, list[int]] = {}
    for i, (stratum, split) in enumerate(zip(strata, given)):
        if split is None:
            groups.setdefault(stratum, []).append(i)
    for stratum, members in groups.items():
        members.sort(key=lambda i: keys[i])
        order = np.random.default_rng([seed & 0xFFFFFFFF, _stable_seed(stratum)]).permutation(len(members))
        n = len(members)
        n_test, n_val = math.floor(n * test_fraction + 0.5), math.floor(n * val_fraction + 0.5)
        while n_test + n_val > n - 1 and (n_test or n_val):  # keep at least one training example per stratum
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        for rank, position in enumerate(order):
            index = members[position]
            out[index] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [s or "train" for s in out]


# ---------------------------------------------------------------------------------------------------- images
def process_image(origin: str, data: bytes | None, max_side: int, quality: int,
                  max_pixels: int, train_size: int = 0) -> ProcessedImage | Skipped:
    """Read, hash, decode, resize (longer side ≤ ``max_side``, or exactly ``train_size`` × ``train_size`` when that
    is set) and re-encode one image (runs in a worker).

    A file that cannot be used is :class:`Skipped`. Storage failures (wrong credentials, endpoint down) are raised:
    they are not a property of the file and must stop the run.
    """
    if data is None:
        try:
            data = storage.read_bytes(origin)
        except FileNotFoundError:
            return Skipped(origin, "missing", "file not found")
        except IsADirectoryError:
            return Skipped(origin, "unreadable", "is a directory")
        except PermissionError as exc:
            return Skipped(origin, "unreadable", f"permission denied ({exc.strerror})")
    if not data:
        return Skipped(origin, "empty", "zero-byte file")
    sha = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, max_pixels=max_pixels, draft_size=train_size or max_side)
    except ImageDecodeError as exc:
        return Skipped(origin, exc.code, exc.message)
    width, height = image.size
    if train_size:  # what the eval transform does at the input size (transforms.build_eval_resize), done once
        if image.size != (train_size, train_size):
            image = image.resize((train_size, train_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    elif max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return ProcessedImage(sha, buffer.getvalue(), image.size[0], image.size[1])


def _process_chunk(tasks: list[tuple]) -> list[ProcessedImage | Skipped]:
    return [process_image(*task) for task in tasks]


def _ordered_results(chunks: Iterable[list[tuple]], workers: int) -> Iterator[list[ProcessedImage | Skipped]]:
    """Run ``_process_chunk`` over chunks in worker processes, yielding results in input order with a bounded
    number of chunks in flight (memory stays flat whatever the dataset size)."""
    if workers <= 1:
        for chunk in chunks:
            yield _process_chunk(chunk)
        return
    # fork: the workers inherit the imported modules (no second torch import per worker); they use only PIL and
    # their own boto3 client (storage resets its client cache after a fork).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    pending: deque[Future] = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_process_chunk, chunk))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(items: Sequence[SourceItem], options: PrepareOptions) -> Iterator[list[tuple]]:
    for start in range(0, len(items), _CHUNK):
        yield [(item.origin, item.data, options.max_side, options.jpeg_quality, options.max_pixels,
                options.train_size)
               for item in items[start:start + _CHUNK]]


# ---------------------------------------------------------------------------------------------------- writing
def write_shard(uri: str, table: pa.Table, row_group_size: int) -> int:
    """Write one Parquet shard (JPEG column stored uncompressed: it is compressed already); returns its size."""
    buffer = pa.BufferOutputStream()
    compression = {name: ("none" if name == "image" else "zstd") for name in table.column_names}
    pq.write_table(table, buffer, row_group_size=row_group_size, compression=compression,
                   write_statistics=[n for n in table.column_names if n != "image"])
    data = buffer.getvalue().to_pybytes()
    storage.write_bytes(uri, data)
    return len(data)


def _split_order(splits: Iterable[str]) -> list[str]:
    return sorted(set(splits), key=lambda s: (STANDARD_SPLITS.index(s) if s in STANDARD_SPLITS else 99, s))


class _Spool:
    """The processed images, the first of each content hash, in a local Arrow file (memory-mapped later): the split
    needs every row's label before shards can be written, and the images need not stay in memory meanwhile.
    Results are added in item order."""

    def __init__(self, path: str, items: Sequence[SourceItem]) -> None:
        self.path, self.items = path, items
        #: item index, and content hash, of each spooled row
        self.kept: list[int] = []
        self.sha: list[str] = []
        self.duplicates: list[dict[str, Any]] = []
        self.skipped: list[Skipped] = []
        self._first_by_sha: dict[str, int] = {}
        self._rows: list[ProcessedImage] = []
        self._sink = pa.OSFile(path, "wb")
        self._writer = pa.ipc.new_file(self._sink, _SPOOL_SCHEMA)

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()

    def add(self, result: ProcessedImage | Skipped) -> None:
        index = len(self.kept) + len(self.duplicates) + len(self.skipped)
        item = self.items[index]
        if isinstance(result, Skipped):
            self.skipped.append(result)
        elif result.sha256 in self._first_by_sha:
            first = self.items[self._first_by_sha[result.sha256]]
            self.duplicates.append({"path": item.origin, "duplicate_of": first.origin,
                                    "same_labels": first.labels == item.labels})
        else:
            self._first_by_sha[result.sha256] = index
            self.kept.append(index)
            self.sha.append(result.sha256)
            self._rows.append(result)
            if len(self._rows) >= _SPOOL_BATCH:
                self._flush()

    def item(self, row: int) -> SourceItem:
        """The source item of spooled row ``row``."""
        return self.items[self.kept[row]]

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.table({"image": [r.jpeg for r in self._rows],
                                               "width": [r.width for r in self._rows],
                                               "height": [r.height for r in self._rows]}, schema=_SPOOL_SCHEMA))
            self._rows = []


def build_dataset(items: Sequence[SourceItem], dst: str, taxonomy: Taxonomy, options: PrepareOptions, *,
                  source_description: str, skipped: Sequence[Skipped] = (),
                  extra_metadata: dict[str, Any] | None = None) -> PrepareResult:
    """Process validated items and write the dataset at ``dst`` (shards first, dataset.json last)."""
    started = time.perf_counter()
    dst = str(dst).rstrip("/") if storage.is_s3(dst) else str(dst)
    _check_destination(dst, options)
    with tempfile.TemporaryDirectory(prefix="taxonet-prepare-") as scratch:
        spool = _spool_images(items, options, os.path.join(scratch, "images.arrow"))
        skipped = [*skipped, *spool.skipped]
        if not spool.kept:
            raise DatasetError(f"no usable image among {len(items)} files ({len(skipped)} skipped, "
                               f"{len(spool.duplicates)} duplicates): nothing was written")
        splits = assign_splits(["/".join(n or "" for n in spool.item(row).labels) for row in range(len(spool.kept))],
                               spool.sha, [spool.item(row).split for row in range(len(spool.kept))],
                               options.val_fraction, options.test_fraction, options.seed)
        run_id = uuid.uuid4().hex[:8]
        shards, counts = _write_shards(dst, spool, splits, taxonomy, options, run_id)
    report = {
        "files_found": len(items) + sum(1 for s in skipped if s.reason == "unlabelled"),
        "written": len(spool.kept),
        "duplicates": {"count": len(spool.duplicates), "files": spool.duplicates[:MAX_LISTED]},
        "skipped": {"count": len(skipped), "by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
                    "files": [s.to_dict() for s in skipped[:MAX_LISTED]]},
    }
    metadata = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "taxonet_version": __version__,
        "source": source_description,
        "prepare": {"max_side": options.max_side, "train_size": options.train_size,
                    "jpeg_quality": options.jpeg_quality,
                    "shard_size": options.shard_size, "val_fraction": options.val_fraction,
                    "test_fraction": options.test_fraction, "seed": options.seed, "run_id": run_id},
        **(extra_metadata or {}),
    }
    info = DatasetInfo(uri=dst, taxonomy=taxonomy, shards=tuple(shards), counts=counts.to_dict(), report=report,
                       metadata=metadata)
    # dataset.json last: from this moment (an atomic PUT / rename) the dataset is visible, and not before.
    storage.write_bytes(storage.join(dst, DATASET_JSON), info.to_json().encode("utf-8"))
    _remove_orphan_shards(dst, {s.path for s in shards})
    result = PrepareResult(info=DatasetInfo.load(dst), skipped=skipped, duplicates=spool.duplicates,
                           files_found=report["files_found"], seconds=time.perf_counter() - started)
    logger.info("wrote %s: %d images in %d shards (%d skipped, %d duplicates) in %.1f s", dst, len(spool.kept),
                len(shards), len(skipped), len(spool.duplicates), result.seconds)
    return result


def _spool_images(items: Sequence[SourceItem], options: PrepareOptions, path: str) -> _Spool:
    """Every item read, hashed, decoded, resized and re-encoded (in worker processes), into a spool at ``path``."""
    workers = options.workers if options.workers is not None else _available_cores()
    workers = min(workers, max(1, math.ceil(len(items) / _CHUNK)))
    progress = _progress(len(items), "prepare", options.progress)
    with _Spool(path, items) as spool:
        for results in _ordered_results(_chunks(items, options), workers):
            for result in results:
                spool.add(result)
            progress.update(len(results))
    progress.close()
    return spool


def _write_shards(dst: str, spool: _Spool, splits: Sequence[str], taxonomy: Taxonomy, options: PrepareOptions,
                  run_id: str) -> tuple[list[ShardInfo], CountAccumulator]:
    """Parquet shards of the spooled rows, one split per shard, each split's rows in a seeded random order."""
    ranks = rank_columns(taxonomy)
    schema = parquet_schema(taxonomy)
    shards: list[ShardInfo] = []
    counts = CountAccumulator(ranks)
    by_split: dict[str, list[int]] = {}
    for row, split in enumerate(splits):
        by_split.setdefault(split, []).append(row)
    progress = _progress(len(spool.kept), "write shards", options.progress)
    with pa.memory_map(spool.path, "r") as source:
        images = pa.ipc.open_file(source).read_all()
        for split in _split_order(by_split):
            rng = np.random.default_rng([options.seed & 0xFFFFFFFF, _stable_seed("rows", split)])
            rows = [by_split[split][p] for p in rng.permutation(len(by_split[split]))]
            for number, start in enumerate(range(0, len(rows), options.shard_size)):
                part = rows[start:start + options.shard_size]
                relative = f"{SHARDS_DIR}/part-{split}-{number:05d}-{run_id}.parquet"
                size = write_shard(storage.join(dst, relative), _shard_table(images, spool, part, split, ranks, schema),
                                   options.row_group_size)
                shards.append(ShardInfo(path=relative, split=split, rows=len(part), bytes=size))
                for row in part:
                    counts.add(spool.item(row).labels, split)
                progress.update(len(part))
        del images  # release the memory map before the scratch directory goes
    progress.close()
    return shards, counts


def _shard_table(images: pa.Table, spool: _Spool, rows: Sequence[int], split: str, ranks: Sequence[str],
                 schema: pa.Schema) -> pa.Table:
    """The shard of spooled ``rows``: image bytes and size from the spool, labels and provenance from the items."""
    taken = images.take(pa.array(rows, type=pa.int64()))
    sources = [spool.item(row) for row in rows]
    columns: dict[str, Any] = {"image": taken.column("image")}
    for level, rank in enumerate(ranks):
        columns[rank] = [item.labels[level] for item in sources]
    columns["split"] = [split] * len(rows)
    columns["source"] = [item.source for item in sources]
    columns["sha256"] = [spool.sha[row] for row in rows]
    columns["width"] = taken.column("width")
    columns["height"] = taken.column("height")
    columns["origin"] = [item.origin for item in sources]
    return pa.table(columns, schema=schema)


def _available_cores() -> int:
    """Cores this process may run on (the affinity mask, which container CPU sets restrict), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _check_destination(dst: str, options: PrepareOptions) -> None:
    """Before any work: the destination is reachable and writable and holds no dataset (unless overwriting)."""
    storage.check_writable(dst)
    if storage.exists(storage.join(dst, DATASET_JSON)) and not options.overwrite:
        raise DatasetError(f"{dst} already holds a dataset ({DATASET_JSON}); pass --overwrite to replace it "
                           f"(the old one stays readable until the new one is complete)")


def _remove_orphan_shards(dst: str, keep: set[str]) -> None:
    """Delete shard files no dataset.json lists: leftovers of an interrupted run or of the dataset replaced."""
    try:
        existing = storage.list_files(storage.join(dst, SHARDS_DIR))
        orphans = [uri for uri in existing if os.path.basename(uri).startswith("part-")
                   and uri.endswith(".parquet") and storage.relative_to(uri, dst) not in keep]
        if orphans:
            logger.info("removing %d shard file(s) not listed in %s (interrupted or replaced run)", len(orphans),
                        DATASET_JSON)
            storage.delete_files(orphans)
    except (OSError, StorageError) as exc:  # the dataset is complete already; leftovers are only clutter
        logger.warning("could not remove leftover shards below %s: %s", dst, exc)


def _progress(total: int, description: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


# ---------------------------------------------------------------------------------------------------- entry points
def prepare_dataset(src: str, dst: str, *, taxonomy: Taxonomy | None = None,
                    options: PrepareOptions | None = None) -> PrepareResult:
    """``taxonet prepare SRC DST``: validate, process and write; see the module docstring for the order of steps."""
    options = options or PrepareOptions()
    src, dst = str(src), str(dst)
    ranks = tuple(taxonomy.ranks) if taxonomy is not None else DEFAULT_RANKS
    items, skipped, structural = scan_source(src, ranks)
    taxonomy, items = resolve_labels(items, taxonomy, ranks, structural)
    rank_columns(taxonomy)
    return build_dataset(items, dst, taxonomy, options, source_description=src, skipped=skipped)


def write_synthetic_dataset(dst: str, taxonomy: Taxonomy, *, per_species: int = 20, image_size: int = 48,
                            seed: int = 0, unseen_per_family: int = 0, unseen_out: str | None = None,
                            options: PrepareOptions | None = None,
                            outliers_per_family: int = 0) -> tuple[PrepareResult, PrepareResult | None]:
    """Render a synthetic dataset in the standard format (train/val/test of the known species).

    ``outliers_per_family`` adds that many "bycatch" species per family (``SyntheticInsects.outlier_species``:
    marks of known species of other families, never the unseen species' marks) labelled down to the family only,
    ``per_species // outliers_per_family`` images each (at least 1), so each family gets about one species' worth:
    material for outlier exposure (``loss.outlier_weight``). Their labels stop at the family, so the taxonomy of
    the dataset is unchanged.

    Unseen species (``unseen_per_family`` per family) go to a second dataset at ``unseen_out`` (default
    ``DST/unseen``) whose taxonomy extends the known one, all in split ``unseen``: the known dataset's taxonomy,
    and so the model trained on it, never names them.
    """
    options = options or PrepareOptions(workers=1)
    if per_species < 1:
        raise DatasetError(f"--per-species must be positive, got {per_species}")
    try:
        generator = SyntheticInsects(taxonomy, image_size=image_size, seed=seed)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"synthetic data: {exc}") from None
    description = f"synthetic(seed={seed}, image_size={image_size}, per_species={per_species})"
    if isinstance(outliers_per_family, bool) or not isinstance(outliers_per_family, int) or outliers_per_family < 0:
        raise DatasetError(f"--outliers-per-family must be a non-negative integer, got {outliers_per_family!r}")
    if outliers_per_family and taxonomy.depth < 2:
        raise DatasetError("--outliers-per-family needs a taxonomy with at least two ranks")
    items = _synthetic_items(generator.samples(per_species))
    extra_metadata = None
    if outliers_per_family:
        outliers = generator.outlier_species(outliers_per_family)
        count = max(1, per_species // outliers_per_family)
        items += _synthetic_items(generator.samples(count, chains=outliers, start_index=per_species), partial=True)
        description += f", outliers_per_family={outliers_per_family}"
        extra_metadata = {"outlier_species": [list(c) for c in outliers]}
    known = build_dataset(items, dst, taxonomy, options, source_description=description,
                          extra_metadata=extra_metadata)
    if not unseen_per_family:
        return known, None
    chains = unseen_species(taxonomy, per_family=unseen_per_family, seed=seed)
    extended = Taxonomy.from_rows([*taxonomy.rows(), *chains], taxonomy.ranks)
    samples = generator.samples(per_species, chains=chains)
    unseen_out = unseen_out or storage.join(dst, "unseen")
    unseen = build_dataset(_synthetic_items(samples, split="unseen"), unseen_out, extended, options,
                           source_description=description,
                           extra_metadata={"unseen_of": dst, "unseen_species": [list(c) for c in chains]})
    return known, unseen


def _synthetic_items(samples: Iterable[SyntheticSample], split: str | None = None,
                     partial: bool = False) -> list[SourceItem]:
    """``partial``: the last rank's label is left unspecified (outlier species, known to their parent only)."""
    items = []
    for sample in samples:
        labels = tuple(sample.labels[:-1]) + (None,) if partial else tuple(sample.labels)
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")  # lossless here: the single JPEG encode happens in build_dataset
        items.append(SourceItem(origin=f"synthetic:{'/'.join(sample.labels)}/{sample.index}",
                                labels=labels, split=split, source="synthetic",
                                data=buffer.getvalue()))
    return items

