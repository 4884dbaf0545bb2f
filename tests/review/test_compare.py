"""The compare-and-promote gate: both models on the same known-species test images and held-out reviewed crops."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from taxonet import registry
from taxonet.cli import main
from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset
from taxonet.data.reviewed import add_reviewed
from taxonet.data.synthetic import SyntheticInsects
from taxonet.review import records
from taxonet.review.compare import compare_models
from taxonet.review.records import Decision, QueueItem
from taxonet.taxonomy import Taxonomy
from tests.checkpoint_support import tiny_checkpoint
from tests.support import quick_checkpoint

QUIET = PrepareOptions(workers=1, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A registry with version 1 (untrained) and 2 (trained), and a dataset with 90 reviewed crops of known
    species (a reviewer confirming audit crops), 18 of them held out from training (val and test)."""
    root = tmp_path_factory.mktemp("compare")
    base, queue, labels = str(root / "base"), str(root / "queue"), str(root / "labels")
    write_synthetic_dataset(base, Taxonomy.demo(), per_species=10, image_size=32, seed=0, options=QUIET)
    items = []
    for sample in SyntheticInsects(Taxonomy.demo(), image_size=32, seed=0).samples(10, start_index=5000):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="JPEG", quality=95)
        crop_id = hashlib.sha256(buffer.getvalue()).hexdigest()
        items.append(QueueItem(crop_id=crop_id, reason="audit", jpeg=buffer.getvalue(), width=32, height=32,
                               answer="{}"))
        records.write_decision(labels, Decision(crop_id, "ana", "taxon", rank="species", taxon=sample.labels[-1]))
    records.write_queue_batch(queue, items, batch_id="b1")
    dataset = str(root / "v2")
    add_reviewed(base, dataset, queue=queue, labels=labels, options=QUIET)
    models = str(root / "models")
    untrained = registry.publish(tiny_checkpoint(root / "untrained"), models, "insects")
    trained = registry.publish(quick_checkpoint(root / "trained", image_size=32, epochs=3, per_species=32),
                               models, "insects")
    registry.promote(models, "insects", untrained, "production")
    return {"models": models, "dataset": dataset, "old": f"{models}/insects@{untrained}",
            "new": f"{models}/insects@{trained}", "labels": labels}


def test_a_better_model_passes_and_is_promoted(setup: dict[str, str]) -> None:
    comparison = compare_models(f"{setup['models']}/insects@production", setup["new"], setup["dataset"],
                                promote="production")
    report = comparison.format_report()
    assert comparison.passed, report
    assert comparison.known_images > 0 and comparison.reviewed_images == 18  # 10 per species: 1 val + 1 test each
    assert comparison.new.reviewed["reliable_correct"] > comparison.old.reviewed["reliable_correct"]
    assert "PASS" in report and "known species macro F1" in report and "reviewed: reliably right" in report
    assert registry.read_alias(setup["models"], "insects", "production").version == 2
    registry.promote(setup["models"], "insects", 1, "production")  # back, for the next test


def test_a_worse_model_fails_and_the_alias_stays(setup: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    code = main(["models", "compare", setup["new"], setup["old"], "--dataset", setup["dataset"], "--promote",
                 "production", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and not result["passed"] and result["promoted"] is None
    assert any("macro F1" in reason for reason in result["reasons"])
    assert any("reviewed crops" in reason for reason in result["reasons"])
    assert registry.read_alias(setup["models"], "insects", "production").version == 1
    # the same model against itself is not better on the reviewed crops: no promotion either
    same = compare_models(setup["old"], setup["old"], setup["dataset"], reviewed_labels=setup["labels"])
    assert not same.passed and same.reasons == [
        f"reviewed crops: reliably right {same.new.reviewed['reliable_correct']:.3f}, not better than "
        f"{same.old.reviewed['reliable_correct']:.3f}"]
