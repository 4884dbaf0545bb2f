"""The review loop's records on storage: crops queued by serving, and the decisions reviewers make about them.

Both live under a URI of :mod:`taxonet.storage` (a local directory or ``s3://bucket/prefix``)::

    QUEUE/batches/<batch_id>.parquet        one whole Parquet file per batch of queued crops (one PUT: a reader
                                            never sees half a batch); rows are :class:`QueueItem`
    LABELS/decisions/<decision_id>.json     one object per decision (:class:`Decision`), never rewritten: the
                                            history of every crop is kept, and writing the same decision again
                                            (a client retrying) is idempotent because its id names the object

A reviewer's current label for a crop is their latest decision (a ``retract`` decision — an undo — withdraws it);
a crop whose reviewers' current labels differ is *disputed* and keeps all of them (:func:`current_labels`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from taxonet import storage

#: why serving queued a crop: its lowest reliable rank is above the deepest rank, or a random audit of a sure answer
QUEUE_REASONS = ("unsure", "audit")
#: what a decision says: a taxon at some rank; a provisional "new species in <parent>"; "not an insect / unusable";
#: or withdrawing the reviewer's earlier decision on the crop (undo)
DECISION_KINDS = ("taxon", "new_species", "reject", "retract")
#: a client-supplied source id (camera, site) or a reviewer name: short, printable, path-safe
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,63}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")

QUEUE_SCHEMA = pa.schema([
    ("crop_id", pa.string()),
    ("queued_at", pa.string()),
    ("reason", pa.string()),
    ("source", pa.string()),
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("lowest_reliable_rank", pa.string()),
    ("answer", pa.string()),
    ("jpeg", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("embedding", pa.list_(pa.float32())),
])


class RecordError(ValueError):
    """A queue item or a decision that is not well formed (the message names the field)."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def sanitize_source(source: str | None) -> str | None:
    """A client's source id if it is short and safe, else None (a bad header never fails a request)."""
    if source is None:
        return None
    source = source.strip()
    return source if _NAME.match(source) else None


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise RecordError(f"{what} {value!r} must be 1–64 characters of letters, digits and ._:@/+- "
                          "(starting with a letter or digit)")
    return value


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise RecordError(f"{what} {value!r} must be 1–80 characters of letters, digits, _ and -")
    return value


@dataclass(frozen=True)
class QueueItem:
    """One queued crop: the decoded crop as JPEG, the model's full answer (JSON) and where it came from."""

    crop_id: str
    reason: str
    jpeg: bytes
    width: int
    height: int
    answer: str
    model: str = ""
    model_version: str = ""
    lowest_reliable_rank: str | None = None
    source: str | None = None
    queued_at: str = field(default_factory=utc_now)
    embedding: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_id(self.crop_id, "crop_id")
        if self.reason not in QUEUE_REASONS:
            raise RecordError(f"reason {self.reason!r} must be one of {QUEUE_REASONS}")

    def answer_dict(self) -> dict:
        return json.loads(self.answer)


def write_queue_batch(queue: str, items: Sequence[QueueItem], batch_id: str | None = None) -> str:
    """Write ``items`` as one Parquet object ``QUEUE/batches/<batch_id>.parquet`` (one write); returns its URI."""
    if not items:
        raise RecordError("a queue batch needs at least one item")
    batch_id = check_id(batch_id or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}",
                        "batch_id")
    columns = {name: [] for name in QUEUE_SCHEMA.names}
    for item in items:
        for name in QUEUE_SCHEMA.names:
            value = getattr(item, name)
            columns[name].append(list(value) if name == "embedding" else value)
    table = pa.Table.from_pydict(columns, schema=QUEUE_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    uri = storage.join(queue, "batches", f"{batch_id}.parquet")
    storage.write_bytes(uri, sink.getvalue())
    return uri


def list_queue_batches(queue: str) -> list[str]:
    """Batch ids present under ``QUEUE/batches/``, oldest first (ids start with their UTC time)."""
    names = storage.list_children(storage.join(queue, "batches"))
    return sorted(name[: -len(".parquet")] for name, is_dir in names.items() if name.endswith(".parquet") and not is_dir)


def read_queue_batch(queue: str, batch_id: str) -> list[QueueItem]:
    uri = storage.join(queue, "batches", f"{check_id(batch_id, 'batch_id')}.parquet")
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    items = []
    for row in table.to_pylist():
        row["embedding"] = tuple(row["embedding"] or ())
        items.append(QueueItem(**row))
    return items


def read_queue(queue: str, batches: Iterable[str] | None = None) -> list[QueueItem]:
    """Every queued item (of ``batches``, default all), oldest batch first."""
    return [item for batch in (list_queue_batches(queue) if batches is None else batches)
            for item in read_queue_batch(queue, batch)]


@dataclass(frozen=True)
class Decision:
    """One reviewer's decision about one crop.

    ``kind="taxon"``: the crop is ``taxon`` at ``rank`` (as deep as the reviewer can name it).
    ``kind="new_species"``: a species not in the taxonomy, under ``parent`` (a taxon at ``rank``, usually family);
    ``provisional`` optionally names it ("Apidae sp. A") so several crops can be grouped under one new species.
    ``kind="reject"``: not an insect / unusable. ``kind="retract"``: withdraws the reviewer's earlier decision.
    """

    crop_id: str
    reviewer: str
    kind: str
    rank: str | None = None
    taxon: str | None = None
    parent: str | None = None
    provisional: str | None = None
    batch_id: str | None = None
    decided_at: str = field(default_factory=utc_now)
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        check_id(self.crop_id, "crop_id")
        check_name(self.reviewer, "reviewer")
        check_id(self.decision_id, "decision_id")
        if self.kind not in DECISION_KINDS:
            raise RecordError(f"kind {self.kind!r} must be one of {DECISION_KINDS}")
        if self.kind == "taxon" and not (self.rank and self.taxon):
            raise RecordError("a 'taxon' decision needs rank and taxon")
        if self.kind == "new_species" and not (self.rank and self.parent):
            raise RecordError("a 'new_species' decision needs the rank and name of its parent taxon")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Decision":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecordError(f"unknown decision fields {sorted(unknown)}")
        return cls(**data)

    def label_key(self) -> tuple:
        """What the decision says, for comparing two reviewers' labels (who and when left out)."""
        return (self.kind, self.rank, self.taxon, self.parent, self.provisional)


def write_decision(labels: str, decision: Decision) -> str:
    """Append one decision (idempotent: the same decision id always names the same object); returns its URI."""
    uri = storage.join(labels, "decisions", f"{decision.decision_id}.json")
    storage.write_bytes(uri, json.dumps(decision.to_dict(), sort_keys=True).encode())
    return uri


def read_decisions(labels: str) -> list[Decision]:
    """Every decision ever written under ``labels``, in the order they were made."""
    root = storage.join(labels, "decisions")
    decisions = [Decision.from_dict(json.loads(storage.read_bytes(storage.join(root, name))))
                 for name, is_dir in storage.list_children(root).items() if name.endswith(".json") and not is_dir]
    return sorted(decisions, key=lambda d: (d.decided_at, d.decision_id))


def current_labels(decisions: Iterable[Decision]) -> dict[str, dict[str, Decision]]:
    """Per crop, each reviewer's current decision (their latest; a ``retract`` removes theirs)."""
    current: dict[str, dict[str, Decision]] = {}
    for decision in sorted(decisions, key=lambda d: (d.decided_at, d.decision_id)):
        by_reviewer = current.setdefault(decision.crop_id, {})
        if decision.kind == "retract":
            by_reviewer.pop(decision.reviewer, None)
        else:
            by_reviewer[decision.reviewer] = decision
    return {crop: reviewers for crop, reviewers in current.items() if reviewers}


def is_disputed(by_reviewer: dict[str, Decision]) -> bool:
    """Two or more reviewers whose current labels differ."""
    return len({d.label_key() for d in by_reviewer.values()}) > 1


def list_decision_ids(labels: str) -> list[str]:
    """The ids of the decisions under ``labels`` (a reader that already holds some reads only the new ones)."""
    names = storage.list_children(storage.join(labels, "decisions"))
    return sorted(name[: -len(".json")] for name, is_dir in names.items() if name.endswith(".json") and not is_dir)


def read_decision(labels: str, decision_id: str) -> Decision:
    uri = storage.join(labels, "decisions", f"{check_id(decision_id, 'decision_id')}.json")
    return Decision.from_dict(json.loads(storage.read_bytes(uri)))
