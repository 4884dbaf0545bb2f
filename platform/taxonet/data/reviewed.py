"""``taxonet prepare --add-reviewed``: the next dataset version, a base dataset plus the crops experts reviewed.

Inputs are the review records of :mod:`taxonet.review.records`: the queue (crops serving was unsure about, or
audited) and the labels (reviewers' decisions). Each reviewed crop's *current* label (the reviewers' latest
decisions, an undo withdrawing one) decides what becomes of it:

- named to the deepest rank (a species of the taxonomy) → joins that class;
- named to a higher rank (family, order) → a partial label, the deeper ranks unspecified: the bycatch that
  ``loss.outlier_weight`` learns from;
- "new species in PARENT" with a provisional name (``Apidae sp. A``) and PARENT at the rank just above the deepest
  → a new class under PARENT once at least ``min_new_species_images`` crops carry that name; below that the crops
  join as partial labels (PARENT known) and the name is listed as pending. Without a provisional name the crops are
  partial labels at PARENT (one can not tell whether two unnamed crops are one species). A provisional name that
  an earlier round made a class under the same PARENT joins that class;
- rejected ("not an insect / unusable"), disputed (reviewers disagree), unknown taxa and crops missing from the
  queue are left out and listed.

Crops are named by the sha256 of the bytes a client sent (:mod:`taxonet.review.queue`), and the base dataset's
``sha256`` column hashes original files the same way: a crop whose hash is already in the base is left out as a
duplicate. The base's shards are copied unchanged (no second JPEG encode of its images, its splits kept); the
reviewed crops are resized to the base's ``max_side`` and split like ``taxonet prepare`` splits (stratified,
seeded by content). ``dataset.json`` records the queue, the labels, the review batches the dataset includes, what
was added per kind, and every crop left out with its reason. It is written last, as by ``taxonet prepare``.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from taxonet import __version__, storage
from taxonet.data.dataset import (
    DATASET_JSON,
    SHARDS_DIR,
    CountAccumulator,
    DatasetInfo,
    ShardInfo,
    format_table,
    parquet_schema,
    rank_columns,
)
from taxonet.data.prepare import (
    MAX_LISTED,
    PrepareOptions,
    ProcessedImage,
    _check_destination,
    _remove_orphan_shards,
    assign_splits,
    process_image,
    write_shard,
)
from taxonet.errors import DatasetError
from taxonet.review import records
from taxonet.review.records import Decision, QueueItem
from taxonet.taxonomy import Taxonomy

log = logging.getLogger(__name__)

#: the ``source`` of reviewed rows when the client gave none, and the prefix of their ``origin``
REVIEW_SOURCE = "review"
#: reasons a reviewed crop is left out of the new dataset
LEFT_OUT_REASONS = ("rejected", "disputed", "duplicate", "unknown_taxon", "missing_crop", "undecodable")


@dataclass(frozen=True)
class ReviewedOptions:
    """Knobs of ``--add-reviewed`` on top of :class:`PrepareOptions` (the split fractions and seed apply to the
    reviewed crops; ``max_side`` and ``jpeg_quality`` are taken from the base dataset)."""

    #: crops with the same provisional name needed before a provisional species becomes a class
    min_new_species_images: int = 10

    def __post_init__(self) -> None:
        if self.min_new_species_images < 1:
            raise DatasetError(f"--min-new-species must be at least 1, got {self.min_new_species_images}")


@dataclass
class ReviewedRow:
    crop_id: str
    batch_id: str
    labels: tuple[str | None, ...]
    kind: str  # "class" (deepest rank), "partial", "new_species"
    item: QueueItem = field(repr=False)


@dataclass
class ReviewPlan:
    """What the reviewed crops become: rows to add, new classes, pending provisional species and crops left out."""

    rows: list[ReviewedRow]
    new_classes: list[tuple[str, ...]]
    pending: dict[str, int]
    left_out: list[dict[str, Any]]
    batches: list[str]

    def added_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(row.kind for row in self.rows).items()))


@dataclass
class ReviewedResult:
    info: DatasetInfo
    plan: ReviewPlan

    def format_summary(self, max_listed: int = 20) -> str:
        left = Counter(entry["reason"] for entry in self.plan.left_out)
        rows: list[list[Any]] = [["dataset", self.info.uri], ["rows", self.info.num_rows()],
                                 ["review batches", len(self.plan.batches)]]
        rows += [[f"added ({kind})", n] for kind, n in self.plan.added_by_kind().items()]
        rows += [[f"left out ({reason})", n] for reason, n in sorted(left.items())]
        rows += [["new classes", ", ".join(" > ".join(chain) for chain in self.plan.new_classes) or "-"]]
        rows += [["pending new species", ", ".join(f"{name} ({n})" for name, n in self.plan.pending.items()) or "-"]]
        text = format_table(["add-reviewed", "result"], rows)
        if self.plan.left_out:
            listed = [[e["reason"], e["crop_id"], e.get("detail", "")] for e in self.plan.left_out[:max_listed]]
            text += "\n\nleft out:\n" + format_table(["reason", "crop", "detail"], listed)
        return text + "\n\n" + self.info.format_counts()


def _base_hashes(info: DatasetInfo) -> set[str]:
    hashes: set[str] = set()
    for uri in info.shard_uris():
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["sha256"])
        hashes.update(table.column("sha256").to_pylist())
    return hashes


def _chain(taxonomy: Taxonomy, rank: str, name: str) -> tuple[str | None, ...] | None:
    """The label chain of taxon ``name`` at ``rank``, deeper ranks unspecified; None when the taxonomy lacks it."""
    if rank not in taxonomy.ranks or (rank, name) not in taxonomy:
        return None
    level = taxonomy.level(rank)
    names = taxonomy.chain_names(rank, taxonomy.index(rank, name))
    return tuple(names) + (None,) * (taxonomy.depth - level - 1)


def plan_reviewed(queue: str, labels: str, taxonomy: Taxonomy, base_hashes: set[str],
                  options: ReviewedOptions) -> ReviewPlan:
    """Decide, per reviewed crop, whether and how it joins the next dataset (nothing is written)."""
    crops: dict[str, tuple[str, QueueItem]] = {}
    for batch in records.list_queue_batches(queue):
        for item in records.read_queue_batch(queue, batch):
            crops.setdefault(item.crop_id, (batch, item))
    current = records.current_labels(records.read_decisions(labels))
    left_out: list[dict[str, Any]] = []
    rows: list[ReviewedRow] = []
    provisional: dict[tuple[tuple[str, ...], str], list[tuple[str, str, QueueItem]]] = {}
    deepest = taxonomy.depth - 1
    for crop_id in sorted(current):
        by_reviewer = current[crop_id]
        if records.is_disputed(by_reviewer):
            labels_by = {reviewer: _describe(d) for reviewer, d in sorted(by_reviewer.items())}
            left_out.append({"crop_id": crop_id, "reason": "disputed", "detail": labels_by})
            continue
        decision = next(iter(by_reviewer.values()))
        if crop_id not in crops:
            left_out.append({"crop_id": crop_id, "reason": "missing_crop", "detail": f"not in the queue {queue}"})
            continue
        batch, item = crops[crop_id]
        if crop_id in base_hashes:
            left_out.append({"crop_id": crop_id, "reason": "duplicate", "detail": "already in the base dataset"})
            continue
        if decision.kind == "reject":
            left_out.append({"crop_id": crop_id, "reason": "rejected", "detail": ""})
            continue
        if decision.kind == "taxon":
            chain = _chain(taxonomy, str(decision.rank), str(decision.taxon))
            if chain is None:
                left_out.append({"crop_id": crop_id, "reason": "unknown_taxon", "detail": _describe(decision)})
                continue
            kind = "class" if chain[deepest] is not None else "partial"
            rows.append(ReviewedRow(crop_id, batch, chain, kind, item))
            continue
        chain = _chain(taxonomy, str(decision.rank), str(decision.parent))  # new_species under a known parent
        if chain is None:
            left_out.append({"crop_id": crop_id, "reason": "unknown_taxon", "detail": _describe(decision)})
            continue
        name = (decision.provisional or "").strip()
        if name and taxonomy.level(str(decision.rank)) == deepest - 1:
            parent_chain = tuple(n for n in chain if n is not None)
            existing = _chain(taxonomy, taxonomy.ranks[deepest], name)
            if existing is not None and existing[:-1] == parent_chain:  # named in an earlier round: now a class
                rows.append(ReviewedRow(crop_id, batch, existing, "class", item))
                continue
            if existing is not None:
                left_out.append({"crop_id": crop_id, "reason": "unknown_taxon",
                                 "detail": f"provisional name {name!r} is a species under {existing[-2]} already"})
                continue
            provisional.setdefault((parent_chain, name), []).append((crop_id, batch, item))
        else:
            rows.append(ReviewedRow(crop_id, batch, chain, "partial", item))
    new_classes: list[tuple[str, ...]] = []
    pending: dict[str, int] = {}
    owners: dict[str, tuple[str, ...]] = {}
    for (parent_chain, name), members in sorted(provisional.items()):
        if name in owners:  # one provisional name under two parents: a reviewer's slip, keep neither silently
            for crop_id, _, _ in members:
                left_out.append({"crop_id": crop_id, "reason": "unknown_taxon",
                                 "detail": f"provisional {name!r} is also used under {' > '.join(owners[name])}"})
            continue
        owners[name] = parent_chain
        if len(members) >= options.min_new_species_images:
            new_classes.append((*parent_chain, name))
            rows += [ReviewedRow(c, b, (*parent_chain, name), "new_species", i) for c, b, i in members]
        else:
            pending[name] = len(members)
            rows += [ReviewedRow(c, b, (*parent_chain, None), "partial", i) for c, b, i in members]
    batches = sorted({row.batch_id for row in rows})
    return ReviewPlan(rows=rows, new_classes=new_classes, pending=pending, left_out=left_out, batches=batches)


def _describe(decision: Decision) -> str:
    if decision.kind == "new_species":
        return f"new species {decision.provisional or ''} in {decision.rank} {decision.parent}".replace("  ", " ")
    if decision.kind == "taxon":
        return f"{decision.rank} {decision.taxon}"
    return decision.kind


def add_reviewed(base: str, dst: str, *, queue: str, labels: str, options: PrepareOptions | None = None,
                 reviewed: ReviewedOptions | None = None) -> ReviewedResult:
    """Write the dataset ``dst``: the base dataset's shards plus the reviewed crops (see the module docstring)."""
    options = options or PrepareOptions()
    reviewed = reviewed or ReviewedOptions()
    dst = str(dst).rstrip("/") if storage.is_s3(dst) else str(dst)
    info = DatasetInfo.load(base)
    if storage.join(dst, DATASET_JSON) == storage.join(info.uri, DATASET_JSON):
        raise DatasetError("the new dataset must go to another prefix than the base dataset (datasets are versions)")
    _check_destination(dst, options)
    plan = plan_reviewed(queue, labels, info.taxonomy, _base_hashes(info), reviewed)
    if not plan.rows:
        reasons = Counter(entry["reason"] for entry in plan.left_out)
        raise DatasetError(f"no reviewed crop can be added from {labels} (queue {queue}): "
                           f"{dict(reasons) or 'no decisions'}; nothing was written")
    taxonomy = Taxonomy.from_rows([*info.taxonomy.rows(), *plan.new_classes], info.taxonomy.ranks)
    ranks = rank_columns(taxonomy)
    prepare = info.metadata.get("prepare", {})
    max_side = int(prepare.get("max_side", options.max_side))
    quality = int(prepare.get("jpeg_quality", options.jpeg_quality))
    run_id = uuid.uuid4().hex[:8]
    counts = CountAccumulator(ranks)
    shards: list[ShardInfo] = []
    for shard in info.shards:  # the base, unchanged: same bytes, same splits
        data = storage.read_bytes(info.shard_uri(shard))
        storage.write_bytes(storage.join(dst, shard.path), data)
        shards.append(shard)
        table = pq.read_table(io.BytesIO(data), columns=ranks)
        for labels_row in zip(*(table.column(rank).to_pylist() for rank in ranks)):
            counts.add(labels_row, shard.split)
    processed: list[tuple[ReviewedRow, ProcessedImage]] = []
    for row in plan.rows:
        result = process_image(f"{REVIEW_SOURCE}:{row.batch_id}/{row.crop_id}", row.item.jpeg, max_side, quality,
                               options.max_pixels)
        if isinstance(result, ProcessedImage):
            processed.append((row, result))
        else:
            plan.left_out.append({"crop_id": row.crop_id, "reason": "undecodable", "detail": result.message})
    plan.rows = [row for row, _ in processed]
    splits = assign_splits(["/".join(n or "" for n in row.labels) for row, _ in processed],
                           [row.crop_id for row, _ in processed], [None] * len(processed),
                           options.val_fraction, options.test_fraction, options.seed)
    schema = parquet_schema(taxonomy)
    for split in sorted(set(splits)):
        members = [pair for pair, s in zip(processed, splits) if s == split]
        for number, start in enumerate(range(0, len(members), options.shard_size)):
            part = members[start:start + options.shard_size]
            relative = f"{SHARDS_DIR}/part-{split}-reviewed-{number:05d}-{run_id}.parquet"
            columns: dict[str, Any] = {"image": [image.jpeg for _, image in part]}
            for level, rank in enumerate(ranks):
                columns[rank] = [row.labels[level] for row, _ in part]
            columns.update({
                "split": [split] * len(part),
                "source": [row.item.source or REVIEW_SOURCE for row, _ in part],
                "sha256": [row.crop_id for row, _ in part],  # the crop's hash: what the next round dedups against
                "width": [image.width for _, image in part],
                "height": [image.height for _, image in part],
                "origin": [f"{REVIEW_SOURCE}:{row.batch_id}/{row.crop_id}" for row, _ in part],
            })
            size = write_shard(storage.join(dst, relative), pa.table(columns, schema=schema), options.row_group_size)
            shards.append(ShardInfo(path=relative, split=split, rows=len(part), bytes=size))
            for row, _ in part:
                counts.add(row.labels, split)
    left = Counter(entry["reason"] for entry in plan.left_out)
    review = {
        "queue": queue, "labels": labels, "base": info.uri, "batches": plan.batches,
        "added": plan.added_by_kind(), "new_classes": [list(chain) for chain in plan.new_classes],
        "pending_new_species": plan.pending, "min_new_species_images": reviewed.min_new_species_images,
        "left_out": {"count": len(plan.left_out), "by_reason": dict(sorted(left.items())),
                     "crops": plan.left_out[:MAX_LISTED]},
        "splits": dict(sorted(Counter(splits).items())),
    }
    metadata = {**info.metadata, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "taxonet_version": __version__, "source": f"{info.uri} + reviewed {labels}", "review": review}
    metadata["prepare"] = {**prepare, "run_id": run_id, "reviewed_seed": options.seed,
                           "reviewed_val_fraction": options.val_fraction,
                           "reviewed_test_fraction": options.test_fraction}
    new_info = DatasetInfo(uri=dst, taxonomy=taxonomy, shards=tuple(shards), counts=counts.to_dict(),
                           report=info.report, metadata=metadata)
    storage.write_bytes(storage.join(dst, DATASET_JSON), new_info.to_json().encode("utf-8"))  # last: now visible
    _remove_orphan_shards(dst, {s.path for s in shards})
    log.info("wrote %s: base %s + %d reviewed crops (%d left out)", dst, info.uri, len(plan.rows),
             len(plan.left_out))
    return ReviewedResult(info=DatasetInfo.load(dst), plan=plan)


def reviewed_rows(info: DatasetInfo, splits: Sequence[str]) -> list[dict[str, Any]]:
    """The reviewed crops (``origin`` review:…) of ``splits`` of a dataset: image bytes and label chain per row."""
    ranks = list(info.taxonomy.ranks)
    out = []
    for split in splits:
        if split not in info.splits:
            continue
        for uri in info.shard_uris(split):
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image", "origin", "sha256", *ranks])
            for row in table.to_pylist():
                if str(row["origin"] or "").startswith(f"{REVIEW_SOURCE}:"):
                    out.append({"image": row["image"], "crop_id": row["sha256"],
                                "labels": tuple(row[rank] for rank in ranks)})
    return out
