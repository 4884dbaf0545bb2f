"""``taxonet prepare --add-reviewed``: reviewed crops join the next dataset at the rank the expert could name."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from taxonet import storage
from taxonet.cli import main
from taxonet.data.dataset import DatasetInfo
from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset
from taxonet.data.reviewed import ReviewedOptions, add_reviewed, reviewed_rows
from taxonet.data.synthetic import SyntheticInsects
from taxonet.errors import DatasetError
from taxonet.review import records
from taxonet.review.records import Decision, QueueItem
from taxonet.taxonomy import Taxonomy

QUIET = PrepareOptions(workers=1, progress=False)


def crop(image: object) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return hashlib.sha256(data).hexdigest(), data


@pytest.fixture()
def base(tmp_path: Path) -> str:
    uri = str(tmp_path / "base")
    write_synthetic_dataset(uri, Taxonomy.demo(), per_species=5, image_size=32, options=QUIET)
    return uri


def queue_items(count: int, start: int, chain: tuple[str, str, str]) -> list[QueueItem]:
    generator = SyntheticInsects(Taxonomy.from_rows([chain]), image_size=40, seed=3)
    items = []
    for sample in generator.samples(count, start_index=start):
        crop_id, data = crop(sample.image)
        items.append(QueueItem(crop_id=crop_id, reason="unsure", jpeg=data, width=40, height=40,
                               answer=json.dumps({"lowest_reliable_rank": "family"})))
    return items


def test_each_kind_of_decision_becomes_what_it_says(tmp_path: Path, base: str) -> None:
    queue, labels, new = str(tmp_path / "queue"), str(tmp_path / "labels"), str(tmp_path / "v2")
    info = DatasetInfo.load(base)
    base_sha = pq.read_table(info.shard_uris("train")[0], columns=["sha256"]).column("sha256")[0].as_py()
    novel = queue_items(4, 0, ("Hymenoptera", "Apidae", "Apidae sp. A"))
    lonely = queue_items(1, 100, ("Hymenoptera", "Apidae", "Apidae sp. B"))
    known = queue_items(6, 200, ("Diptera", "Syrphidae", "Eristalis tenax"))
    duplicate = QueueItem(crop_id=base_sha, reason="audit", jpeg=known[0].jpeg, width=40, height=40, answer="{}")
    records.write_queue_batch(queue, novel + lonely, batch_id="b1")
    records.write_queue_batch(queue, [*known, duplicate], batch_id="b2")
    records.write_queue_batch(queue, queue_items(2, 300, ("Diptera", "Syrphidae", "x")), batch_id="b3")  # unlabelled
    for item in novel:
        records.write_decision(labels, Decision(item.crop_id, "ana", "new_species", rank="family", parent="Apidae",
                                                provisional="Apidae sp. A"))
    records.write_decision(labels, Decision(lonely[0].crop_id, "ana", "new_species", rank="family", parent="Apidae",
                                            provisional="Apidae sp. B"))
    records.write_decision(labels, Decision(known[0].crop_id, "ana", "taxon", rank="species", taxon="Eristalis tenax"))
    records.write_decision(labels, Decision(known[1].crop_id, "ana", "taxon", rank="family", taxon="Syrphidae"))
    records.write_decision(labels, Decision(known[2].crop_id, "ana", "taxon", rank="species", taxon="Eristalis tenax"))
    records.write_decision(labels, Decision(known[2].crop_id, "ben", "taxon", rank="species",
                                            taxon="Eupeodes corollae"))  # disputed
    records.write_decision(labels, Decision(known[3].crop_id, "ana", "reject"))
    records.write_decision(labels, Decision(known[4].crop_id, "ana", "taxon", rank="species", taxon="Musca domestica"))
    records.write_decision(labels, Decision(duplicate.crop_id, "ana", "taxon", rank="species",
                                            taxon="Eristalis tenax"))
    records.write_decision(labels, Decision("f" * 64, "ana", "reject"))  # a crop not in the queue
    # an undo: ben's label on known[5] is withdrawn, ana's stands
    records.write_decision(labels, Decision(known[5].crop_id, "ben", "taxon", rank="order", taxon="Diptera"))
    records.write_decision(labels, Decision(known[5].crop_id, "ben", "retract"))
    records.write_decision(labels, Decision(known[5].crop_id, "ana", "taxon", rank="order", taxon="Diptera"))

    result = add_reviewed(base, new, queue=queue, labels=labels, options=QUIET,
                          reviewed=ReviewedOptions(min_new_species_images=3))
    info2 = result.info
    info2.verify()  # shards, schema, row counts and class counts agree with dataset.json
    taxonomy = info2.taxonomy
    assert ("species", "Apidae sp. A") in taxonomy and ("species", "Apidae sp. B") not in taxonomy
    assert taxonomy.chain_names("species", taxonomy.index("species", "Apidae sp. A")) == [
        "Hymenoptera", "Apidae", "Apidae sp. A"]
    review = info2.metadata["review"]
    assert review["batches"] == ["b1", "b2"] and review["queue"] == queue and review["labels"] == labels
    assert review["added"] == {"class": 1, "new_species": 4, "partial": 3}
    assert review["pending_new_species"] == {"Apidae sp. B": 1}
    assert review["left_out"]["by_reason"] == {"disputed": 1, "duplicate": 1, "missing_crop": 1, "rejected": 1,
                                               "unknown_taxon": 1}
    disputed = next(e for e in review["left_out"]["crops"] if e["reason"] == "disputed")
    assert disputed["crop_id"] == known[2].crop_id and set(disputed["detail"]) == {"ana", "ben"}
    # the base is copied byte for byte, its splits kept; 8 reviewed rows added
    for shard in info.shards:
        assert storage.read_bytes(storage.join(new, shard.path)) == storage.read_bytes(info.shard_uri(shard))
    assert info2.num_rows() == info.num_rows() + 8
    classes = info2.counts["classes"]["species"]
    assert sum(classes["Apidae sp. A"].values()) == 4
    assert sum(info2.counts["unspecified"]["species"].values()) == 3  # sp. B, Syrphidae-only, Diptera-only
    rows = reviewed_rows(info2, ["train", "val", "test"])
    assert sorted(r["crop_id"] for r in rows) == sorted(
        [i.crop_id for i in novel] + [lonely[0].crop_id, known[0].crop_id, known[1].crop_id, known[5].crop_id])
    by_id = {r["crop_id"]: r["labels"] for r in rows}
    assert by_id[lonely[0].crop_id] == ("Hymenoptera", "Apidae", None)
    assert by_id[known[5].crop_id] == ("Diptera", None, None)

    # the next round deduplicates against this one: the same labels add nothing new
    with pytest.raises(DatasetError, match="no reviewed crop can be added"):
        add_reviewed(new, str(tmp_path / "v3"), queue=queue, labels=labels, options=QUIET)
    assert not storage.exists(storage.join(str(tmp_path / "v3"), "dataset.json"))


def test_cli_needs_both_queue_and_labels_and_refuses_the_base_as_destination(tmp_path: Path, base: str,
                                                                           capsys: pytest.CaptureFixture) -> None:
    queue, labels = str(tmp_path / "queue"), str(tmp_path / "labels")
    items = queue_items(2, 0, ("Diptera", "Syrphidae", "Eristalis tenax"))
    records.write_queue_batch(queue, items, batch_id="b1")
    for item in items:
        records.write_decision(labels, Decision(item.crop_id, "ana", "taxon", rank="species", taxon="Eristalis tenax"))
    assert main(["prepare", "--add-reviewed", labels, base, str(tmp_path / "x")]) != 0
    assert "--queue" in capsys.readouterr().err
    assert main(["prepare", "--add-reviewed", labels, "--queue", queue, base, base, "--no-progress"]) != 0
    assert main(["prepare", "--add-reviewed", labels, "--queue", queue, base, str(tmp_path / "v2"),
                 "--no-progress", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "added (class)" in out and DatasetInfo.load(str(tmp_path / "v2")).metadata["review"]["batches"] == ["b1"]
