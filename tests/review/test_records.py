"""The review records contract: queue batches and decisions on local disk and on S3 over HTTP (moto's server)."""

from __future__ import annotations

import json

import pytest

from taxonet.review import records
from taxonet.review.records import Decision, QueueItem, RecordError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def _item(crop: str, reason: str = "unsure", **extra) -> QueueItem:
    answer = {"lowest_reliable_rank": "family", "ranks": {"species": {"label": "Apis mellifera"}}}
    return QueueItem(crop_id=crop, reason=reason, jpeg=b"\xff\xd8jpeg" + crop.encode(), width=40, height=30,
                     answer=json.dumps(answer), model="demo", model_version="3", lowest_reliable_rank="family",
                     **extra)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "review")
    return f"s3://{request.getfixturevalue('s3_bucket')}/review"


def test_queue_batches_round_trip_whole(root: str) -> None:
    assert records.list_queue_batches(root + "/queue") == []
    first = records.write_queue_batch(root + "/queue", [_item("a1"), _item("a2", embedding=(0.5, -1.0))],
                                      batch_id="20261201T100000000000-aaaa")
    records.write_queue_batch(root + "/queue", [_item("b1", "audit", source="cam-7")],
                              batch_id="20261201T100100000000-bbbb")
    assert first.endswith("batches/20261201T100000000000-aaaa.parquet")
    assert records.list_queue_batches(root + "/queue") == ["20261201T100000000000-aaaa", "20261201T100100000000-bbbb"]
    items = records.read_queue(root + "/queue")
    assert [i.crop_id for i in items] == ["a1", "a2", "b1"]
    assert items[1].embedding == pytest.approx((0.5, -1.0))
    assert items[2].source == "cam-7" and items[2].reason == "audit" and items[0].jpeg == b"\xff\xd8jpega1"
    assert items[0].answer_dict()["lowest_reliable_rank"] == "family"


def test_decisions_keep_history_and_show_disputes(root: str) -> None:
    labels = root + "/labels"
    assert records.read_decisions(labels) == []
    first = Decision("c1", "ana", "taxon", rank="species", taxon="Apis mellifera", decided_at="2026-12-01T10:00:00")
    records.write_decision(labels, first)
    records.write_decision(labels, first)  # a retry: idempotent
    records.write_decision(labels, Decision("c1", "ben", "new_species", rank="family", parent="Apidae",
                                            decided_at="2026-12-01T10:01:00"))
    records.write_decision(labels, Decision("c2", "ana", "reject", decided_at="2026-12-01T10:02:00"))
    records.write_decision(labels, Decision("c2", "ana", "retract", decided_at="2026-12-01T10:03:00"))
    decisions = records.read_decisions(labels)
    assert len(decisions) == 4  # the retry wrote the same object
    current = records.current_labels(decisions)
    assert set(current) == {"c1"}  # c2's only decision was withdrawn
    assert set(current["c1"]) == {"ana", "ben"} and records.is_disputed(current["c1"])
    records.write_decision(labels, Decision("c1", "ben", "taxon", rank="species", taxon="Apis mellifera",
                                            decided_at="2026-12-01T10:04:00"))
    current = records.current_labels(records.read_decisions(labels))
    assert not records.is_disputed(current["c1"]) and current["c1"]["ben"].kind == "taxon"


@pytest.mark.parametrize("bad", [dict(crop_id="../x"), dict(reviewer=""), dict(reviewer="a b"), dict(kind="maybe"),
                                 dict(kind="taxon", taxon=None), dict(kind="new_species", parent=None)])
def test_malformed_decisions_are_refused(bad: dict) -> None:
    fields = dict(crop_id="c1", reviewer="ana", kind="taxon", rank="species", taxon="Apis mellifera", parent="Apidae")
    with pytest.raises(RecordError):
        Decision(**{**fields, **bad})


def test_queue_item_and_source_checks() -> None:
    with pytest.raises(RecordError):
        _item("a/b")
    with pytest.raises(RecordError):
        _item("a1", reason="because")
    with pytest.raises(RecordError):
        records.write_queue_batch("/tmp/unused", [])
    assert records.sanitize_source(" cam-1/site:A ") == "cam-1/site:A"
    assert records.sanitize_source("../../etc") is None and records.sanitize_source("x" * 65) is None
    assert records.sanitize_source("bad\nheader") is None and records.sanitize_source(None) is None
