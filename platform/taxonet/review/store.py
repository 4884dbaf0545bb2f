"""The review server's view of one queue and its labels: queue items and decisions held in memory, kept in step
with storage (new batches and other servers' decisions are picked up every ``refresh_s``), and the queries the page
needs (next crops most useful first, filters, similar crops, per-crop status).

With a ``taxonomy_source`` (the CLI passes one that re-reads ``--taxonomy FILE`` or the model behind ``--model
MODELS/NAME@ALIAS``) the taxonomy is re-read on the same cadence: after a promote adds a species (the loop's new
classes), reviewers can pick it without a restart. A failed re-read keeps the taxonomy in use and is logged.

Writes go to storage first (:func:`records.write_decision`), then into memory: a decision the page saw accepted is
on storage.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from taxonet.review import records
from taxonet.review.records import Decision, QueueItem
from taxonet.taxonomy import Taxonomy

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 15.0
#: cosine similarity from which two crops count as "look alike" in the model's embedding
DEFAULT_SIMILARITY = 0.9
#: what a reviewer may ask to see
STATUSES = ("unreviewed", "mine", "disputed", "reviewed", "all")


@dataclass(frozen=True)
class Filters:
    status: str = "unreviewed"
    family: str | None = None
    source: str | None = None
    reason: str | None = None
    #: only crops whose answer is unreliable at this rank (the unsure-rate alert names a rank)
    unsure_at: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise records.RecordError(f"status {self.status!r} must be one of {STATUSES}")
        if self.reason is not None and self.reason not in records.QUEUE_REASONS:
            raise records.RecordError(f"reason {self.reason!r} must be one of {records.QUEUE_REASONS}")


class ReviewStore:
    def __init__(self, queue: str, labels: str, taxonomy: Taxonomy, *, refresh_s: float = DEFAULT_REFRESH_S,
                 similarity: float = DEFAULT_SIMILARITY, clock: Callable[[], float] = time.monotonic,
                 taxonomy_source: Callable[[], Taxonomy] | None = None) -> None:
        self.queue = queue
        self.labels = labels
        self.taxonomy = taxonomy
        self.taxonomy_source = taxonomy_source
        self.refresh_s = refresh_s
        self.similarity = similarity
        self._clock = clock
        self._lock = threading.RLock()
        self._items: dict[str, QueueItem] = {}
        self._batch_of: dict[str, str] = {}
        self._batches: set[str] = set()
        self._decisions: dict[str, Decision] = {}
        self._current: dict[str, dict[str, Decision]] = {}
        self._answers: dict[str, dict] = {}
        self._embeddings: tuple[list[str], np.ndarray] | None = None
        self._refreshed_at: float | None = None

    # ------------------------------------------------------------------ storage
    def refresh(self, force: bool = False) -> None:
        """Read new queue batches and decisions (at most every ``refresh_s`` unless forced)."""
        with self._lock:
            now = self._clock()
            if not force and self._refreshed_at is not None and now - self._refreshed_at < self.refresh_s:
                return
            for batch in records.list_queue_batches(self.queue):
                if batch in self._batches:
                    continue
                for item in records.read_queue_batch(self.queue, batch):
                    if item.crop_id not in self._items:
                        self._items[item.crop_id] = item
                        self._answers[item.crop_id] = item.answer_dict()
                    self._batch_of.setdefault(item.crop_id, batch)
                self._batches.add(batch)
                self._embeddings = None
            new = [records.read_decision(self.labels, i) for i in records.list_decision_ids(self.labels)
                   if i not in self._decisions]
            if new:
                self._add(new)
            self._refresh_taxonomy()
            self._refreshed_at = now

    def _refresh_taxonomy(self) -> None:
        if self.taxonomy_source is None:
            return
        try:
            taxonomy = self.taxonomy_source()
        except Exception as exc:  # noqa: BLE001 - a store or alias briefly unreadable: keep the taxonomy in use
            log.warning("the taxonomy could not be re-read (%s: %s); keeping the one in use", type(exc).__name__, exc)
            return
        if taxonomy.to_dict() != self.taxonomy.to_dict():
            log.warning("the taxonomy changed: %d taxa at %s now (was %d)", len(taxonomy.names[-1]),
                        taxonomy.ranks[-1], len(self.taxonomy.names[-1]))
            self.taxonomy = taxonomy

    def _add(self, decisions: Iterable[Decision]) -> None:
        for decision in decisions:
            self._decisions[decision.decision_id] = decision
        self._current = records.current_labels(self._decisions.values())

    def decide(self, decisions: Sequence[Decision]) -> list[Decision]:
        """Write each decision (a known id is not written again: a retried request) and take it in."""
        written = []
        with self._lock:
            for decision in decisions:
                known = self._decisions.get(decision.decision_id)
                if known is not None:
                    written.append(known)
                    continue
                records.write_decision(self.labels, decision)
                self._add([decision])
                written.append(decision)
        return written

    # ------------------------------------------------------------------ reading
    def item(self, crop_id: str) -> QueueItem | None:
        with self._lock:
            return self._items.get(crop_id)

    def batch_of(self, crop_id: str) -> str | None:
        with self._lock:
            return self._batch_of.get(crop_id)

    def items(self) -> list[QueueItem]:
        with self._lock:
            return list(self._items.values())

    def decisions(self) -> list[Decision]:
        with self._lock:
            return sorted(self._decisions.values(), key=lambda d: (d.decided_at, d.decision_id))

    def labels_of(self, crop_id: str) -> dict[str, Decision]:
        with self._lock:
            return dict(self._current.get(crop_id, {}))

    def answer(self, crop_id: str) -> dict:
        with self._lock:
            return self._answers.get(crop_id, {})

    def predicted(self, crop_id: str, rank: str) -> str | None:
        return (self.answer(crop_id).get("ranks", {}).get(rank) or {}).get("label")

    def families(self) -> list[str]:
        return sorted({f for f in (self.predicted(item.crop_id, self.family_rank) for item in self.items()) if f})

    def sources(self) -> list[str]:
        return sorted({item.source for item in self.items() if item.source})

    @property
    def family_rank(self) -> str:
        """The rank crops are grouped by: "family" when the taxonomy has it, else the second rank."""
        ranks = self.taxonomy.ranks
        return "family" if "family" in ranks else ranks[min(1, len(ranks) - 1)]

    def matches(self, item: QueueItem, filters: Filters, reviewer: str) -> bool:
        labels = self._current.get(item.crop_id, {})
        if filters.status == "unreviewed" and labels:
            return False
        if filters.status == "mine" and reviewer not in labels:
            return False
        if filters.status == "disputed" and not records.is_disputed(labels):
            return False
        if filters.status == "reviewed" and not labels:
            return False
        if filters.family is not None and self.predicted(item.crop_id, self.family_rank) != filters.family:
            return False
        if filters.source is not None and item.source != filters.source:
            return False
        if filters.reason is not None and item.reason != filters.reason:
            return False
        if filters.unsure_at is None:
            return True
        ranks = self.taxonomy.ranks
        if filters.unsure_at not in ranks:
            raise records.RecordError(f"unsure_at {filters.unsure_at!r} must be one of {ranks}")
        level = ranks.index(item.lowest_reliable_rank) if item.lowest_reliable_rank in ranks else -1
        return level < ranks.index(filters.unsure_at)

    def usefulness_key(self, item: QueueItem) -> tuple:
        """Least reliable first (no reliable rank, then reliable only to the top rank, ...), grouped by predicted
        family, least confident first within a family, oldest first."""
        ranks = self.taxonomy.ranks
        level = ranks.index(item.lowest_reliable_rank) if item.lowest_reliable_rank in ranks else -1
        answer = self.answer(item.crop_id).get("ranks", {})
        confidences = [entry.get("confidence") for entry in answer.values() if entry.get("confidence") is not None]
        family = self.predicted(item.crop_id, self.family_rank) or "~"
        return level, family, min(confidences, default=1.0), item.queued_at, item.crop_id

    def select(self, filters: Filters, reviewer: str, available: Callable[[str], bool]) -> list[QueueItem]:
        """Crops matching the filters that ``available`` allows, most useful first."""
        with self._lock:
            chosen = [item for item in self._items.values()
                      if self.matches(item, filters, reviewer) and available(item.crop_id)]
        return sorted(chosen, key=self.usefulness_key)

    def similar(self, crop_id: str, candidates: Iterable[str], limit: int) -> list[tuple[str, float]]:
        """Among ``candidates``, up to ``limit`` crops whose embedding's cosine with the crop's is at least
        ``similarity``, most similar first (none when the crop has no embedding). Only crops queued by the same model
        version count: another version's embedding space is another space, even where the sizes agree."""
        with self._lock:
            ids, matrix = self._embedding_matrix()
            index = {crop: row for row, crop in enumerate(ids)}
            if crop_id not in index:
                return []
            model = _model_of(self._items[crop_id])
            rows = [index[c] for c in candidates
                    if c in index and c != crop_id and _model_of(self._items[c]) == model]
        if not rows:
            return []
        cosines = matrix[rows] @ matrix[index[crop_id]]
        order = np.argsort(-cosines, kind="stable")
        return [(ids[rows[i]], float(cosines[i])) for i in order[:limit] if cosines[i] >= self.similarity]

    def _embedding_matrix(self) -> tuple[list[str], np.ndarray]:
        if self._embeddings is None:
            with_vectors = [item for item in self._items.values() if item.embedding]
            size = _common_size([len(item.embedding) for item in with_vectors])
            ids = [item.crop_id for item in with_vectors if len(item.embedding) == size]
            matrix = np.array([self._items[c].embedding for c in ids], dtype=np.float32).reshape(len(ids), size)
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            self._embeddings = ids, matrix / np.where(norms > 0, norms, 1.0)
        return self._embeddings


def _model_of(item: QueueItem) -> tuple[str, str]:
    return item.model, item.model_version


def _common_size(sizes: list[int]) -> int:
    """The most common embedding size (crops of another model version with another size are left out)."""
    return max(set(sizes), key=sizes.count) if sizes else 0


def decision_id(reviewer: str, crop_id: str, request_id: str) -> str:
    """A decision id that a retried request (same reviewer, crop and client request id) reproduces."""
    return hashlib.sha256(f"{reviewer}\n{crop_id}\n{request_id}".encode()).hexdigest()[:32]
