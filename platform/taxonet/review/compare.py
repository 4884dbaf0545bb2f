"""The gate between a new model and the one it would replace: evaluate both on the same images, promote if better.

``taxonet models compare OLD NEW --dataset DATASET [--reviewed LABELS] [--promote ALIAS]``. OLD and NEW are model
references (checkpoint URIs or ``MODELS/NAME@ALIAS|N``). Both models answer, through the serving predictor (the
same preprocessing and anomaly test as production), two sets of images:

- **known species**: the dataset's ``test`` split, rows that did not come from review and whose species both models
  know. Per rank: accuracy and macro F1. The new model must not be worse than the old by more than ``tolerance``
  (macro F1, every rank; default 0.02 — the spread of macro F1 between seeds of the small demo models).
- **reviewed crops**: the dataset's reviewed rows that training did not fit (its ``val`` and ``test`` splits), plus,
  with ``--reviewed LABELS``, crops reviewed in LABELS that are not in the dataset at all (reviewed since; their
  images come from the queue the dataset records). A crop counts as *reliably right* when the model's label at the
  reviewer's rank is the reviewer's and that rank is reliable (the lowest reliable rank reaches it): an old model
  that says "reliable only to family" of a new species is right at family but not at species. The new model must
  be strictly better here.

Only when both hold (and NEW is a registry version) does ``--promote ALIAS`` move the alias to NEW
(:func:`taxonet.registry.promote`, which verifies the version first). The report prints both models side by side.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from taxonet import registry, storage
from taxonet.data.dataset import DatasetInfo, format_table
from taxonet.data.reviewed import REVIEW_SOURCE, ReviewedOptions, plan_reviewed, reviewed_rows
from taxonet.errors import DatasetError
from taxonet.metrics import rank_metrics
from taxonet.serve.predictor import Predictor
from taxonet.taxonomy import Taxonomy

#: macro F1 a new model may lose on known species, per rank, and still pass
DEFAULT_TOLERANCE = 0.02
#: splits whose reviewed rows training did not fit
HELD_OUT_SPLITS = ("val", "test")


@dataclass
class ModelScores:
    reference: str
    name: str
    version: str
    known: dict[str, dict[str, float]]
    reviewed: dict[str, float]


@dataclass
class Comparison:
    old: ModelScores
    new: ModelScores
    tolerance: float
    known_images: int
    reviewed_images: int
    passed: bool
    reasons: list[str]
    promoted: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def format_report(self) -> str:
        old, new = self.old, self.new
        headers = ["metric", f"old {old.name} v{old.version}", f"new {new.name} v{new.version}", "change", "check"]
        rows: list[list[Any]] = []
        for rank in old.known:
            for metric in ("accuracy", "f1"):
                before, after = old.known[rank][metric], new.known[rank][metric]
                check = ""
                if metric == "f1":
                    check = "ok" if _not_worse(before, after, self.tolerance) else f"worse by > {self.tolerance}"
                rows.append([f"known {rank} {'macro F1' if metric == 'f1' else metric}", _f(before), _f(after),
                             _delta(before, after), check])
        for metric, label in (("reliable_correct", "reviewed: reliably right at the reviewer's rank"),
                              ("correct", "reviewed: right at the reviewer's rank"),
                              ("species_rank", "reviewed: answered at the deepest rank")):
            before, after = old.reviewed[metric], new.reviewed[metric]
            check = ("ok" if after > before else "not better") if metric == "reliable_correct" else ""
            rows.append([label, _f(before), _f(after), _delta(before, after), check])
        text = (f"compare on {self.known_images} known-species test images and {self.reviewed_images} reviewed "
                f"crops (tolerance {self.tolerance} macro F1 per rank)\n\n" + format_table(headers, rows))
        verdict = "PASS: the new model is not worse on known species and better on the reviewed crops" \
            if self.passed else "FAIL: " + "; ".join(self.reasons)
        text += "\n\n" + verdict
        if self.promoted:
            text += f"\npromoted: {self.promoted['model']}@{self.promoted['alias']} -> version " \
                    f"{self.promoted['version']}"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old.__dict__, "new": self.new.__dict__, "tolerance": self.tolerance,
                "known_images": self.known_images, "reviewed_images": self.reviewed_images, "passed": self.passed,
                "reasons": self.reasons, "promoted": self.promoted, "notes": self.notes}


def _f(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _delta(before: float, after: float) -> str:
    return "-" if math.isnan(before) or math.isnan(after) else f"{after - before:+.3f}"


def _not_worse(before: float, after: float, tolerance: float) -> bool:
    return math.isnan(before) or (not math.isnan(after) and after >= before - tolerance)


def known_rows(info: DatasetInfo, old: Taxonomy, new: Taxonomy) -> tuple[list[bytes], list[tuple[str, ...]]]:
    """Images and label chains of the ``test`` split: rows not from review, species known to both taxonomies."""
    ranks = list(info.taxonomy.ranks)
    deepest = ranks[-1]
    images, chains = [], []
    for uri in info.shard_uris("test"):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image", "origin", *ranks])
        for row in table.to_pylist():
            if str(row["origin"] or "").startswith(f"{REVIEW_SOURCE}:"):
                continue
            species = row[deepest]
            if species is None or (deepest, species) not in old or (deepest, species) not in new:
                continue
            images.append(row["image"])
            chains.append(tuple(row[rank] for rank in ranks))
    return images, chains


def reviewed_set(info: DatasetInfo, labels: str | None) -> list[dict[str, Any]]:
    """Reviewed crops neither model was trained on: the dataset's held-out reviewed rows, plus (with ``labels``)
    crops reviewed there that the dataset does not hold."""
    rows = reviewed_rows(info, HELD_OUT_SPLITS)
    if not labels:
        return rows
    review = info.metadata.get("review") or {}
    queue = review.get("queue")
    if not queue:
        raise DatasetError(f"dataset {info.uri} records no review queue (not made by prepare --add-reviewed): "
                           "--reviewed needs it to find the crops' images")
    in_dataset = set()
    for uri in info.shard_uris():
        in_dataset.update(pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["sha256"])
                          .column("sha256").to_pylist())
    plan = plan_reviewed(queue, labels, info.taxonomy, in_dataset, ReviewedOptions(min_new_species_images=1))
    seen = {row["crop_id"] for row in rows}
    rows += [{"image": r.item.jpeg, "crop_id": r.crop_id, "labels": r.labels} for r in plan.rows
             if r.crop_id not in seen]
    return rows


def score(predictor: Predictor, reference: str, known_images: Sequence[bytes],
          known_chains: Sequence[tuple[str, ...]], reviewed: Sequence[dict[str, Any]]) -> ModelScores:
    """One model's answers on both sets, as numbers."""
    taxonomy = predictor.taxonomy
    ranks = list(taxonomy.ranks)
    answers = predictor.predict_bytes(list(known_images)) if known_images else []
    known: dict[str, dict[str, float]] = {}
    for level, rank in enumerate(ranks):
        truth = [chain[level] for chain in known_chains]
        guess = [answer.ranks[rank].label for answer in answers]
        names = {name: i for i, name in enumerate(sorted({*truth, *(g for g in guess if g is not None)}))}
        metrics = rank_metrics(np.array([names[t] for t in truth], dtype=np.int64),
                               np.array([names.get(g, len(names)) for g in guess], dtype=np.int64)) \
            if truth else {"accuracy": math.nan, "f1": math.nan}
        known[rank] = {"accuracy": metrics["accuracy"], "f1": metrics["f1"]}
    reviewed_answers = predictor.predict_bytes([row["image"] for row in reviewed]) if reviewed else []
    correct = reliable = deepest = 0
    for row, answer in zip(reviewed, reviewed_answers):
        chain = row["labels"]
        level = max(i for i, name in enumerate(chain) if name is not None)
        right = all(answer.ranks[ranks[i]].label == chain[i] for i in range(level + 1))
        lowest = answer.lowest_reliable_rank
        reaches = lowest is not None and ranks.index(lowest) >= level
        correct += right
        reliable += right and reaches
        deepest += lowest == ranks[-1]
    count = len(reviewed)
    share = (lambda n: n / count) if count else (lambda n: math.nan)
    return ModelScores(reference=reference, name=predictor.name, version=predictor.version, known=known,
                       reviewed={"count": count, "correct": share(correct), "reliable_correct": share(reliable),
                                 "species_rank": share(deepest)})


def compare_models(old: str, new: str, dataset: str, *, reviewed_labels: str | None = None,
                   tolerance: float = DEFAULT_TOLERANCE, promote: str | None = None,
                   allow_taxonomy_change: bool = False, device: str = "cpu") -> Comparison:
    """Evaluate OLD and NEW on the same images; promote NEW to ``promote`` (an alias) only if the gate passes."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    new_ref = registry.parse_reference(new)
    if promote and not new_ref.is_registry:
        raise registry.RegistryError(f"--promote needs NEW as a registry version (MODELS/NAME@N), got {new}")
    info = DatasetInfo.load(dataset)
    old_predictor = Predictor.from_checkpoint(registry.resolve(old).uri, device, graph=False)
    new_resolved = registry.resolve(new)
    new_predictor = Predictor.from_checkpoint(new_resolved.uri, device, graph=False)
    for predictor, which in ((old_predictor, "OLD"), (new_predictor, "NEW")):
        if tuple(predictor.taxonomy.ranks) != tuple(info.taxonomy.ranks):
            raise DatasetError(f"{which} has ranks {list(predictor.taxonomy.ranks)}, the dataset "
                               f"{list(info.taxonomy.ranks)}")
    images, chains = known_rows(info, old_predictor.taxonomy, new_predictor.taxonomy)
    reviewed = reviewed_set(info, reviewed_labels)
    if not images:
        raise DatasetError(f"the test split of {dataset} holds no image of a species both models know")
    old_scores = score(old_predictor, old, images, chains, reviewed)
    new_scores = score(new_predictor, new, images, chains, reviewed)
    reasons = [f"known {rank}: macro F1 {new_scores.known[rank]['f1']:.3f} is more than {tolerance} below "
               f"{old_scores.known[rank]['f1']:.3f}" for rank in old_scores.known
               if not _not_worse(old_scores.known[rank]["f1"], new_scores.known[rank]["f1"], tolerance)]
    if not reviewed:
        reasons.append("no reviewed crop held out from training to compare on")
    elif not new_scores.reviewed["reliable_correct"] > old_scores.reviewed["reliable_correct"]:
        reasons.append(f"reviewed crops: reliably right {new_scores.reviewed['reliable_correct']:.3f}, not better "
                       f"than {old_scores.reviewed['reliable_correct']:.3f}")
    comparison = Comparison(old=old_scores, new=new_scores, tolerance=tolerance, known_images=len(images),
                            reviewed_images=len(reviewed), passed=not reasons, reasons=reasons)
    if promote and comparison.passed:
        number = new_resolved.number
        record = registry.promote(new_ref.models, new_ref.name, int(number), promote,
                                  allow_taxonomy_change=allow_taxonomy_change)
        comparison.promoted = record.to_dict()
    elif promote:
        comparison.notes.append(f"alias {promote!r} not moved")
    return comparison
