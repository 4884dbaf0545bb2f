"""The serving-side review queue writer, without Ray: policy, bounded memory, drops counted, flushes, JPEG bounds."""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taxonet.review import records
from taxonet.review.queue import ReviewQueueWriter, bounded_jpeg, queue_reason
from taxonet.serve.config import ReviewQueueArgs, ServeArgs
from taxonet.serve.predictor import ImageAnswer, ModelRef, RankAnswer

RANKS = ("order", "family", "species")


def answer(lowest: str | None) -> ImageAnswer:
    return ImageAnswer(ranks={rank: RankAnswer([], f"{rank}-x", 1.0, True, None) for rank in RANKS},
                       lowest_reliable_rank=lowest, lowest_reliable_label=None, consistent=True)


def photo(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(20):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        image.putpixel((x, y), (rng.randrange(256), 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def settings(tmp_path: Path, **changes: object) -> ReviewQueueArgs:
    return ReviewQueueArgs(uri=str(tmp_path / "queue"), **changes)


def test_policy_queues_unsure_answers_and_an_audit_share_of_sure_ones() -> None:
    rng = random.Random(0)
    assert queue_reason(answer("family"), 0.0, rng) == "unsure"
    assert queue_reason(answer(None), 0.0, rng) == "unsure"
    assert queue_reason(answer("species"), 0.0, rng) is None
    audited = sum(queue_reason(answer("species"), 0.1, rng) == "audit" for _ in range(5000))
    assert 350 < audited < 650


def test_batches_are_written_on_size_on_interval_and_at_close(tmp_path: Path) -> None:
    writer = ReviewQueueWriter(settings(tmp_path, batch_size=3, flush_interval_s=3600, audit_rate=0.0)).start()
    for i in range(7):
        assert writer.offer(photo(i), answer("family"), ModelRef("m", "2"), "cam-1") == "unsure"
    assert writer.offer(photo(99), answer("species"), ModelRef("m", "2")) is None
    wait_for(lambda: len(records.list_queue_batches(settings(tmp_path).uri)) == 2)  # 3 + 3, the 7th waits
    writer.close()
    batches = records.list_queue_batches(settings(tmp_path).uri)
    assert len(batches) == 3
    items = records.read_queue(settings(tmp_path).uri)
    assert len(items) == 7 and {item.reason for item in items} == {"unsure"}
    assert items[0].model == "m" and items[0].model_version == "2" and items[0].source == "cam-1"
    assert items[0].lowest_reliable_rank == "family" and items[0].answer_dict()["lowest_reliable_rank"] == "family"
    assert writer.queued == {"unsure": 7} and writer.dropped == {}

    timed = ReviewQueueWriter(settings(tmp_path / "t", batch_size=100, flush_interval_s=0.3)).start()
    timed.offer(photo(1), answer("order"))
    wait_for(lambda: len(records.list_queue_batches(settings(tmp_path / "t").uri)) == 1)
    timed.close()


def test_crops_are_named_by_their_hash_re_encoded_and_bounded(tmp_path: Path) -> None:
    big = photo(5, size=(1600, 1200), fmt="PNG")
    writer = ReviewQueueWriter(settings(tmp_path, max_side=128, max_jpeg_bytes=8192))
    writer.offer(big, answer("family"), source="bad source!\n")
    writer.offer(big, answer("family"))  # the same bytes again: queued once
    writer.close()
    (item,) = records.read_queue(settings(tmp_path).uri)
    assert item.crop_id == hashlib.sha256(big).hexdigest()
    assert item.source is None  # an unsafe source id is dropped, not stored
    assert item.jpeg[:2] == b"\xff\xd8" and len(item.jpeg) <= 8192
    decoded = Image.open(io.BytesIO(item.jpeg))
    assert max(decoded.size) <= 128 and decoded.size == (item.width, item.height)
    assert item.embedding == ()
    noisy = Image.effect_noise((900, 900), 120).convert("RGB")
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    jpeg, width, height = bounded_jpeg(buffer.getvalue(), 900, 4096, 95)
    assert len(jpeg) <= 4096 and max(width, height) < 900


class _BlockedStorage:
    """A write_batch that waits until released (slow storage), recording what it was given."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.written: list[int] = []

    def __call__(self, uri: str, items: Sequence[records.QueueItem]) -> str:
        self.release.wait(60)
        self.written.append(len(items))
        return f"{uri}/batches/x.parquet"


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    storage = _BlockedStorage()
    dropped: list[tuple[int, str]] = []
    writer = ReviewQueueWriter(settings(tmp_path, max_items=4, batch_size=1, flush_interval_s=3600),
                               write_batch=storage, on_dropped=lambda n, reason: dropped.append((n, reason))).start()
    started = time.monotonic()
    results = [writer.offer(photo(i), answer("family")) for i in range(50)]
    elapsed = time.monotonic() - started
    assert elapsed < 20  # generous: 50 offers never wait for the (blocked) storage
    accepted = sum(r is not None for r in results)
    # at most max_items waiting + one in the writer's hands while storage is blocked
    assert accepted <= 4 + 1
    assert writer.dropped["full"] == 50 - accepted and sum(n for n, _ in dropped) == 50 - accepted
    storage.release.set()
    writer.close()
    assert sum(storage.written) == accepted


def test_memory_is_bounded_by_bytes_too(tmp_path: Path) -> None:
    writer = ReviewQueueWriter(settings(tmp_path, max_items=100, max_memory_bytes=len(photo(0)) * 2 + 10))
    results = [writer.offer(photo(0), answer("family")) for _ in range(5)]  # never started: nothing leaves memory
    assert sum(r is not None for r in results) == 2 and writer.dropped == {"full": 3}
    writer.close()


def test_an_offered_embedding_is_stored_with_its_crop_and_counts_against_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 128)).astype(np.float16)
    vectors /= np.linalg.norm(vectors.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    writer = ReviewQueueWriter(settings(tmp_path, batch_size=2, audit_rate=0.0))
    for i, vector in enumerate(vectors):
        assert writer.offer(photo(i), answer("family"), ModelRef("m", "2"), None, vector) == "unsure"
    assert writer.offer(photo(7), answer("order"), ModelRef("m", "2")) == "unsure"  # a crop without one
    writer.close()
    stored = {item.crop_id: item.embedding for item in records.read_queue(settings(tmp_path).uri)}
    for i, vector in enumerate(vectors):  # float16 on the wire, float32 in Parquet: exactly the same values
        assert np.array_equal(np.asarray(stored[hashlib.sha256(photo(i)).hexdigest()], dtype=np.float32),
                              vector.astype(np.float32))
    assert stored[hashlib.sha256(photo(7)).hexdigest()] == ()

    # the byte bound counts the embedding too: room for one crop alone, not for the crop with its 256 bytes
    tight = ReviewQueueWriter(settings(tmp_path / "tight", max_memory_bytes=len(photo(0)) + 100))
    assert tight.offer(photo(0), answer("family"), None, None, vectors[0]) is None
    assert tight.dropped == {"full": 1}
    assert tight.offer(photo(0), answer("family")) == "unsure"
    tight.close()


def test_storage_failures_are_counted_and_serving_goes_on(tmp_path: Path) -> None:
    def failing(uri: str, items: Sequence[records.QueueItem]) -> str:
        raise OSError("endpoint down")

    writer = ReviewQueueWriter(settings(tmp_path, batch_size=2), write_batch=failing).start()
    for i in range(4):
        writer.offer(photo(i), answer("family"))
    writer.close()
    assert writer.dropped == {"write_failed": 4} and writer.queued == {}
    assert writer.offer(photo(9), answer("family")) is None and writer.dropped["closed"] == 1


def test_serve_args_take_a_review_queue_section_and_refuse_typos() -> None:
    args = ServeArgs.model_validate({"checkpoint": "x", "review_queue": {"uri": "s3://b/q", "audit_rate": 0.05}})
    assert args.ingress_settings().review_queue.audit_rate == 0.05
    assert ServeArgs.model_validate({"checkpoint": "x"}).review_queue is None
    with pytest.raises(ValueError, match="audit_rat"):
        ServeArgs.model_validate({"checkpoint": "x", "review_queue": {"uri": "q", "audit_rat": 0.1}})
    with pytest.raises(ValueError):
        ServeArgs.model_validate({"checkpoint": "x", "review_queue": {"uri": "q", "audit_rate": 2}})


def test_a_bounded_plain_jpeg_is_kept_as_sent_and_metadata_is_never_stored() -> None:
    image = Image.open(io.BytesIO(photo(3, size=(60, 40)))).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    plain = buffer.getvalue()
    assert bounded_jpeg(plain, 128, 65536, 90) == (plain, 60, 40)  # no second encode
    exif = Image.Exif()
    exif[0x010F] = "camera maker"  # any EXIF tag: a real camera's may hold the site's location
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif)
    stored, width, height = bounded_jpeg(buffer.getvalue(), 128, 65536, 90)
    assert stored != buffer.getvalue() and (width, height) == (60, 40)
    assert "exif" not in Image.open(io.BytesIO(stored)).info
    assert bounded_jpeg(plain, 32, 65536, 90)[1:] == (32, 21)  # over max_side: re-encoded smaller
