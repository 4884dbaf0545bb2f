"""The serving side of the review queue: a background writer that turns answered crops into queue batches.

The ingress calls :meth:`ReviewQueueWriter.offer` after it answered an image. ``offer`` decides in a few
microseconds whether the crop is queued — every answer whose lowest reliable rank is above the deepest rank
("unsure"), plus a random share of the sure ones ("audit") — and puts the request's bytes (and the image's
embedding) on a bounded in-memory queue. It never blocks and never raises: when the queue is full (``max_items``
crops or ``max_memory_bytes`` bytes, embeddings counted) the crop is dropped and counted. A daemon thread takes the
crops off the queue, re-encodes each as a JPEG of bounded side and size (a plain JPEG already within the bounds,
without metadata, is kept as sent), names it by the sha256 of the bytes the client sent (so ``prepare
--add-reviewed`` can deduplicate it against a dataset, whose ``sha256`` column hashes the original files the same
way) and writes a batch with :func:`taxonet.review.records.write_queue_batch` — one whole Parquet object — when
``batch_size`` crops are waiting, when the oldest has waited ``flush_interval_s``, and at :meth:`close`.

The embedding is the model's own (:meth:`taxonet.serve.predictor.Predictor.predict_batch`: pooled backbone features
from the answer's forward pass, ≤ 128 dimensions, unit norm); the review page groups crops whose embeddings are
close (look-alikes). A crop offered without one is stored with an empty embedding and is never grouped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from taxonet.data.transforms import ImageDecodeError, decode_image
from taxonet.review import records
from taxonet.review.records import QueueItem
from taxonet.serve.config import ReviewQueueArgs
from taxonet.serve.predictor import ImageAnswer, ModelRef

log = logging.getLogger(__name__)

#: reasons a crop is dropped (the ``reason`` tag of taxonet_review_dropped)
DROP_REASONS = ("full", "write_failed", "undecodable", "closed")
#: crop ids remembered to skip an image sent again (a client retrying) instead of queueing it twice
RECENT_IDS = 4096

CountHook = Callable[[int, str], None]


Answer = ImageAnswer | Mapping[str, Any]


def _lowest_and_deepest(answer: Answer) -> tuple[str | None, str | None]:
    if isinstance(answer, ImageAnswer):
        ranks, lowest = answer.ranks, answer.lowest_reliable_rank
    else:
        ranks, lowest = answer.get("ranks") or {}, answer.get("lowest_reliable_rank")
    return lowest, next(reversed(ranks), None) if ranks else None


def queue_reason(answer: Answer, audit_rate: float, rng: random.Random) -> str | None:
    """"unsure" when the answer's lowest reliable rank is above the deepest rank, "audit" for a random share
    ``audit_rate`` of the rest, else None (not queued)."""
    lowest, deepest = _lowest_and_deepest(answer)
    if deepest is None or lowest != deepest:
        return "unsure"
    if audit_rate > 0 and rng.random() < audit_rate:
        return "audit"
    return None


def bounded_jpeg(data: bytes, max_side: int, max_bytes: int, quality: int) -> tuple[bytes, int, int]:
    """The image re-encoded as baseline RGB JPEG, longer side ≤ ``max_side`` (never upscaled), at most
    ``max_bytes``: the quality steps down to 50, then the side halves, until it fits. Returns (jpeg, width, height).
    Raises ImageDecodeError for bytes that do not decode (the ingress validated them, so only a bug gets here)."""
    if len(data) <= max_bytes and _plain_jpeg_within(data, max_side):
        return data, *Image.open(io.BytesIO(data)).size  # already a bounded JPEG: kept as sent (no second encode)
    image = decode_image(data, draft_size=max_side)
    side = max_side
    while True:
        width, height = image.size
        if max(width, height) > side:
            scale = side / max(width, height)
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BICUBIC, reducing_gap=2.0)
        for step in (quality, 75, 60, 50):
            if step > quality:
                continue
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=step)
            if buffer.tell() <= max_bytes:
                return buffer.getvalue(), image.size[0], image.size[1]
        if max(image.size) <= 16:  # a 16-pixel JPEG never gets near the smallest allowed budget (4 KiB)
            return buffer.getvalue(), image.size[0], image.size[1]
        side = max(16, max(image.size) // 2)


#: what PIL reports of a JPEG with nothing but pixels (no EXIF, XMP, comment, ICC profile or thumbnail)
_PLAIN_JPEG_INFO = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "adobe", "adobe_transform"}


def _plain_jpeg_within(data: bytes, max_side: int) -> bool:
    """A baseline RGB/greyscale JPEG no larger than ``max_side`` that carries no metadata (camera EXIF may hold a
    location): storing it as sent is then as safe as re-encoding it, and costs nothing. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format == "JPEG" and image.mode in ("RGB", "L") and max(image.size) <= max_side
                    and not image.info.get("progressive") and set(image.info) <= _PLAIN_JPEG_INFO)
    except Exception:  # not decodable here: the full path below reports it
        return False


@dataclass
class _Pending:
    data: bytes = field(repr=False)
    reason: str
    answer: Answer = field(repr=False)
    model: str
    model_version: str
    lowest_reliable_rank: str | None
    source: str | None
    queued_at: str
    embedding: np.ndarray | None = field(default=None, repr=False)
    #: bytes this crop holds against ``max_memory_bytes`` (released when the writer takes it)
    size: int = 0


class ReviewQueueWriter:
    """Bounded, non-blocking queue of crops to review, written in batches by a daemon thread.

    ``on_queued(n, reason)`` and ``on_dropped(n, reason)`` are called with counts (the ingress's metrics; they run
    on the caller's thread for drops at ``offer`` and on the writer thread otherwise). ``write_batch`` is
    :func:`records.write_queue_batch` unless a test replaces it.
    """

    def __init__(self, settings: ReviewQueueArgs, *, on_queued: CountHook | None = None,
                 on_dropped: CountHook | None = None, rng: random.Random | None = None,
                 write_batch: Callable[[str, Sequence[QueueItem]], str] = records.write_queue_batch) -> None:
        self.settings = settings
        self._on_queued = on_queued
        self._on_dropped = on_dropped
        self._rng = rng or random.Random()
        self._write_batch = write_batch
        self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=settings.max_items)
        self._bytes = 0
        self._bytes_lock = threading.Lock()
        self._stop = threading.Event()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._thread: threading.Thread | None = None
        #: totals since start, by reason (also what the metrics hooks were told)
        self.queued: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.batches: list[str] = []

    # ------------------------------------------------------------------ request side
    def start(self) -> "ReviewQueueWriter":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="taxonet-review-queue", daemon=True)
            self._thread.start()
        return self

    def offer(self, data: bytes, answer: Answer, model: ModelRef | None = None,
              source: str | None = None, embedding: np.ndarray | None = None) -> str | None:
        """Queue one answered crop (with the model's ``embedding`` of it, if any) if the policy wants it; returns
        the reason it was queued, else None.

        Never blocks and never raises: a full queue (or a closed writer) drops the crop and counts it. The crop's
        bytes and its embedding's count against ``max_memory_bytes``.
        """
        try:
            reason = queue_reason(answer, self.settings.audit_rate, self._rng)
            if reason is None:
                return None
            if self._stop.is_set():
                self._count(self.dropped, self._on_dropped, 1, "closed")
                return None
            size = len(data) + (embedding.nbytes if embedding is not None else 0)
            with self._bytes_lock:
                if self._bytes + size > self.settings.max_memory_bytes:
                    full = True
                else:
                    full = False
                    self._bytes += size
            if full:
                self._count(self.dropped, self._on_dropped, 1, "full")
                return None
            pending = _Pending(data=data, reason=reason, answer=answer,  # serialised by the writer thread
                               model=model.name if model else "", model_version=model.version if model else "",
                               lowest_reliable_rank=_lowest_and_deepest(answer)[0],
                               source=records.sanitize_source(source), queued_at=records.utc_now(),
                               embedding=embedding, size=size)
            try:
                self._queue.put_nowait(pending)
            except queue.Full:
                self._release(size)
                self._count(self.dropped, self._on_dropped, 1, "full")
                return None
            return reason
        except Exception:  # the review queue must never fail a request
            log.exception("taxonet: review queue: could not queue a crop")
            self._count(self.dropped, self._on_dropped, 1, "full")
            return None

    @property
    def waiting(self) -> int:
        """Crops in memory, not yet taken by the writer thread."""
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking crops, write what is waiting, and stop the thread (within ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:  # never started: write what was offered here
            self._drain_and_write([])

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        pending: list[_Pending] = []
        oldest = 0.0
        while True:
            stopping = self._stop.is_set()
            wait = self.settings.flush_interval_s - (time.monotonic() - oldest) if pending else 0.5
            try:
                item = self._queue.get(timeout=max(0.01, min(wait, 0.5)))
                if not pending:
                    oldest = time.monotonic()
                pending.append(item)
            except queue.Empty:
                pass
            due = pending and (len(pending) >= self.settings.batch_size
                               or time.monotonic() - oldest >= self.settings.flush_interval_s)
            if due:
                self._write(pending)
                pending = []
            if stopping and self._queue.empty():
                self._drain_and_write(pending)
                return

    def _drain_and_write(self, pending: list[_Pending]) -> None:
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for start in range(0, len(pending), self.settings.batch_size):
            self._write(pending[start:start + self.settings.batch_size])

    def _write(self, pending: list[_Pending]) -> None:
        settings = self.settings
        items: list[QueueItem] = []
        for entry in pending:
            self._release(entry.size)
            crop_id = hashlib.sha256(entry.data).hexdigest()
            if crop_id in self._recent or any(item.crop_id == crop_id for item in items):
                continue  # the same bytes again (a client retrying): reviewed once is enough
            try:
                jpeg, width, height = bounded_jpeg(entry.data, settings.max_side, settings.max_jpeg_bytes,
                                                   settings.jpeg_quality)
            except ImageDecodeError:
                self._count(self.dropped, self._on_dropped, 1, "undecodable")
                continue
            fields = entry.answer.to_dict() if isinstance(entry.answer, ImageAnswer) else dict(entry.answer)
            fields.pop("filename", None)
            embedding = () if entry.embedding is None else tuple(
                np.asarray(entry.embedding, dtype=np.float32).ravel().tolist())  # float16 → float32: exact
            items.append(QueueItem(crop_id=crop_id, reason=entry.reason, jpeg=jpeg, width=width, height=height,
                                   answer=json.dumps(fields, sort_keys=True), model=entry.model,
                                   model_version=entry.model_version, lowest_reliable_rank=entry.lowest_reliable_rank,
                                   source=entry.source, queued_at=entry.queued_at, embedding=embedding))
        if not items:
            return
        try:
            uri = self._write_batch(settings.uri, items)
        except Exception as exc:  # storage down: the crops are lost, counted, and serving goes on
            log.error("taxonet: review queue: could not write a batch of %d crops to %s: %s", len(items),
                      settings.uri, exc)
            self._count(self.dropped, self._on_dropped, len(items), "write_failed")
            return
        self.batches.append(uri)
        for item in items:
            self._recent[item.crop_id] = None
            if len(self._recent) > RECENT_IDS:
                self._recent.popitem(last=False)
        for reason in records.QUEUE_REASONS:
            count = sum(1 for item in items if item.reason == reason)
            if count:
                self._count(self.queued, self._on_queued, count, reason)

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._bytes -= size

    @staticmethod
    def _count(totals: dict[str, int], hook: CountHook | None, count: int, reason: str) -> None:
        totals[reason] = totals.get(reason, 0) + count
        if hook is not None:
            try:
                hook(count, reason)
            except Exception:  # a metrics hiccup must not stop the writer
                log.exception("taxonet: review queue: metrics hook failed")
