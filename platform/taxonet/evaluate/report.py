"""The evaluation report of a checkpoint on a held-out split, in the shape of Bjerge et al. 2023 (METHOD.md
"Evaluation" and "Anomaly detection") — pure NumPy on logits and targets: no files, no plots.

The report holds, for any taxonomy (rank names and depth are read from the checkpoint):

* per rank, macro precision / recall / F1 and accuracy (Table 4 shape), the hierarchy-consistency rate, and the
  share of predictions whose lowest reliable rank is each rank (or "unsure");
* per rank, a confusion matrix whose last column counts the samples the model would NOT report at that rank
  (their lowest reliable rank is above it);
* the training history of the run (from the checkpoint);
* with an unseen-species dataset (leaf classes that are not in the checkpoint's taxonomy, under known parents): per
  unseen class how often it is unsure at the leaf rank, how often its lowest reliable rank is a correct higher rank,
  how often a wrong answer is reported as reliable; and how well the max-logit, max-softmax and energy scores at the
  leaf rank separate unseen samples from the known test samples (AUROC, FPR at 95 % TPR).

:func:`build_report` makes it (tests call it directly); :mod:`taxonet.evaluate.run` runs a checkpoint over a
dataset to get its inputs; :mod:`taxonet.evaluate.render` writes it as Markdown, CSV, JSON and plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from taxonet.anomaly import (AnomalyThresholds, Assessment, assess, auroc, energy, fpr_at_95_tpr, max_softmax,
                             winning_scores)
from taxonet.errors import DatasetError
from taxonet.metrics import confusion_matrix, evaluate_predictions
from taxonet.taxonomy import UNSPECIFIED, Taxonomy, is_unspecified

#: key for "no rank is reliable" in the lowest-reliable-rank shares
UNSURE = "unsure"
#: the anomaly scores compared for separating unseen from known samples (all "higher = more in-distribution")
SCORE_NAMES = ("max_logit", "max_softmax", "energy")

# ---------------------------------------------------------------------------------------------------------- results
@dataclass
class UnseenClassResult:
    """How the model treats the images of one unseen leaf class (or of all of them: ``name == "all"``).

    Shares are fractions of ``images`` in [0, 1]. ``correct_higher + wrongly_reliable + unsure_everywhere == 1``.
    """

    name: str
    #: names of its known ancestors, top rank first (None where the label names no known taxon)
    lineage: tuple[str | None, ...]
    images: int
    #: not reported at the leaf rank (its lowest reliable rank is higher, or none)
    unsure_at_leaf: float
    #: the leaf-rank score is below the threshold of the predicted class (the anomaly test alone)
    flagged_at_leaf: float
    #: share per lowest reliable rank (rank names + "unsure")
    lowest_reliable: dict[str, float]
    #: lowest reliable rank is a higher rank whose predicted class is the true one
    correct_higher: float
    #: lowest reliable rank holds a wrong class (at the leaf rank always wrong: the class is unseen)
    wrongly_reliable: float
    #: no rank reliable
    unsure_everywhere: float


@dataclass
class UnseenReport:
    """The unseen-species table and the separation of unseen from known samples at the leaf rank."""

    dataset: str
    splits: list[str]
    leaf_rank: str
    classes: list[UnseenClassResult]
    overall: UnseenClassResult
    #: score name → {"auroc": ..., "fpr_at_95_tpr": ...}; known = the evaluated split, unseen = this dataset
    separation: dict[str, dict[str, float]]
    known_images: int
    #: known (evaluated split) images not reported at the leaf rank: the price paid on known classes
    known_unsure_at_leaf: float
    known_flagged_at_leaf: float
    #: rows of the unseen dataset whose leaf class IS in the checkpoint's taxonomy (left out)
    skipped_known: int = 0


@dataclass
class EvaluationReport:
    """Everything ``taxonet evaluate`` reports; :meth:`to_dict` gives it as JSON, :mod:`taxonet.evaluate.render`
    writes it to files."""

    checkpoint: str
    dataset: str
    split: str
    model_name: str
    taxonomy: Taxonomy
    #: ranks the model has a head for (all of them for a multitask model, the last one for a single-task baseline)
    head_ranks: list[str]
    images: int
    #: per head rank: precision, recall, f1, accuracy (macro, sklearn semantics), support
    rank_metrics: dict[str, dict[str, float]]
    #: ranks without a head, predicted through the taxonomy from the deepest head (single-task models)
    derived_metrics: dict[str, dict[str, float]]
    #: share of predicted chains that follow the taxonomy
    consistency: float
    #: per rank: int [classes, classes + 1], last column = not reported at this rank
    confusion: dict[str, np.ndarray]
    #: anomaly thresholds present in the checkpoint (k), or None
    threshold_k: float | None
    #: share of samples per lowest reliable rank (rank names + "unsure"); None without thresholds
    lowest_reliable: dict[str, float] | None
    #: per lowest reliable rank: share of those samples whose label at that rank is correct (labelled ones only)
    reliable_correct: dict[str, float] | None
    #: per head rank: share of samples whose score is below the threshold of the predicted class
    flagged: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    unseen: UnseenReport | None = None
    #: rule for predicted chains that break the taxonomy (anomaly.chain_rule: strict or lenient); None without
    #: thresholds
    chain_rule: str | None = None
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ views
    @property
    def ranks(self) -> list[str]:
        return list(self.taxonomy.ranks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content (metrics.json)."""
        return json_ready({
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "split": self.split,
            "model": self.model_name,
            "ranks": self.ranks,
            "head_ranks": self.head_ranks,
            "images": self.images,
            "rank_metrics": self.rank_metrics,
            "derived_metrics": self.derived_metrics,
            "consistency": self.consistency,
            "threshold_k": self.threshold_k,
            "chain_rule": self.chain_rule,
            "lowest_reliable": self.lowest_reliable,
            "reliable_correct": self.reliable_correct,
            "flagged": self.flagged,
            "confusion": {rank: {"classes": list(self.taxonomy.names[self.taxonomy.level(rank)]),
                                 "columns": [*self.taxonomy.names[self.taxonomy.level(rank)], UNSURE],
                                 "matrix": matrix.tolist()}
                          for rank, matrix in self.confusion.items()},
            "history_epochs": len(self.history),
            "unseen": asdict(self.unseen) if self.unseen else None,
            "notes": self.notes,
        })


# ---------------------------------------------------------------------------------------------------------- core
def build_report(
    taxonomy: Taxonomy,
    logits: Mapping[str, ArrayLike],
    targets: ArrayLike,
    *,
    thresholds: AnomalyThresholds | None = None,
    checkpoint: str = "",
    dataset: str = "",
    split: str = "test",
    model_name: str = "model",
    history: Sequence[Mapping[str, Any]] | None = None,
    unseen: UnseenInputs | None = None,
) -> EvaluationReport:
    """The evaluation report from model outputs: ``logits`` {rank: [N, classes]} (the ranks the model has heads
    for), ``targets`` int [N, depth] (−1 = unspecified), the checkpoint's thresholds (None: no reliability
    analysis) and optionally the outputs for an unseen-species dataset."""
    targets = np.asarray(targets)
    if targets.ndim != 2 or targets.shape[1] != taxonomy.depth:
        raise ValueError(f"targets must be [N, {taxonomy.depth}], got shape {targets.shape}")
    if len(targets) == 0:
        raise DatasetError(f"split {split!r} of {dataset or 'the dataset'} holds no images: nothing to evaluate")
    head_ranks = [rank for rank in taxonomy.ranks if rank in logits]
    # without thresholds every class counts as sure (AnomalyThresholds' rule for a class it has no fit for)
    assessment = assess(taxonomy, thresholds if thresholds is not None else AnomalyThresholds([], k=0.0), logits)
    predictions = assessment.predictions
    all_metrics = evaluate_predictions(taxonomy, targets, predictions)
    rank_metrics = {rank: all_metrics[rank] for rank in head_ranks}
    derived = {rank: all_metrics[rank] for rank in taxonomy.ranks if rank not in logits and
               (predictions[:, taxonomy.level(rank)] != UNSPECIFIED).all()}
    confusion = {}
    for level, rank in enumerate(taxonomy.ranks):
        if (predictions[:, level] == UNSPECIFIED).any():
            continue  # a rank the model cannot predict at all (no head at or below it)
        not_reported = assessment.lowest_reliable_level < level
        confusion[rank] = confusion_matrix(targets[:, level], predictions[:, level], taxonomy.num_classes(level),
                                           unsure=not_reported if thresholds is not None else None)
    lowest = correct = flagged = None
    if thresholds is not None:
        lowest = _level_shares(taxonomy, assessment.lowest_reliable_level)
        correct = _reliable_correct(taxonomy, assessment, targets)
        flagged = {rank: float((~assessment.sure[:, taxonomy.level(rank)]).mean()) for rank in head_ranks}
    notes = []
    if thresholds is None:
        notes.append("the checkpoint holds no anomaly thresholds: every prediction counts as sure, and neither the "
                     "lowest reliable rank nor the unseen-species reliability can be judged")
    report = EvaluationReport(
        checkpoint=checkpoint, dataset=dataset, split=split, model_name=model_name, taxonomy=taxonomy,
        head_ranks=head_ranks, images=int(len(targets)), rank_metrics=rank_metrics, derived_metrics=derived,
        consistency=float(assessment.consistent.mean()), confusion=confusion,
        threshold_k=None if thresholds is None else float(thresholds.k), lowest_reliable=lowest,
        chain_rule=None if thresholds is None else thresholds.chain_rule,
        reliable_correct=correct, flagged=flagged, history=[dict(h) for h in history or []], notes=notes,
    )
    if unseen is not None:
        report.unseen = unseen_report(taxonomy, thresholds, logits, assessment, unseen)
        if unseen.skipped_known:
            notes.append(f"{unseen.skipped_known} image(s) of the unseen dataset belong to classes the checkpoint "
                         "knows; they were left out of the unseen-species table")
    return report


@dataclass
class UnseenInputs:
    """Model outputs on an unseen-species dataset: logits {rank: [M, classes]}, the known part of each label
    (``targets`` int [M, depth], −1 from the first rank the checkpoint does not know), and the raw label chain of
    each image (names per rank, top first; the leaf is the unseen class)."""

    dataset: str
    logits: Mapping[str, ArrayLike]
    targets: ArrayLike
    chains: Sequence[Sequence[str | None]]
    splits: list[str] = field(default_factory=list)
    skipped_known: int = 0


def unseen_report(taxonomy: Taxonomy, thresholds: AnomalyThresholds | None, known_logits: Mapping[str, ArrayLike],
                  known_assessment: Assessment, unseen: UnseenInputs) -> UnseenReport:
    """Per unseen leaf class and overall: reliability of the answers, and known-vs-unseen score separation."""
    targets = np.asarray(unseen.targets, dtype=np.int64)
    if len(targets) == 0:
        raise DatasetError(f"unseen dataset {unseen.dataset} holds no image of a class unknown to the checkpoint"
                           + (f" ({unseen.skipped_known} images of known classes were left out)"
                              if unseen.skipped_known else ""))
    if len(unseen.chains) != len(targets):
        raise ValueError(f"{len(unseen.chains)} label chains for {len(targets)} unseen images")
    leaf_level = taxonomy.depth - 1
    leaf_rank = taxonomy.ranks[leaf_level]
    assessment = assess(taxonomy, thresholds if thresholds is not None else AnomalyThresholds([], k=0.0),
                        unseen.logits)
    leaves = np.asarray([str(chain[-1]) for chain in unseen.chains], dtype=object)
    classes = []
    for name in sorted(set(leaves.tolist())):
        mask = leaves == name
        first = int(np.flatnonzero(mask)[0])
        lineage = tuple(None if t == UNSPECIFIED else taxonomy.name(level, int(t))
                        for level, t in enumerate(targets[first, :leaf_level]))
        classes.append(_unseen_stats(taxonomy, name, lineage, assessment, targets, mask))
    overall = _unseen_stats(taxonomy, "all", (), assessment, targets, np.ones(len(targets), dtype=bool))
    score_rank = leaf_rank if leaf_rank in unseen.logits else [r for r in taxonomy.ranks if r in unseen.logits][-1]
    known, new = np.asarray(known_logits[score_rank]), np.asarray(unseen.logits[score_rank])
    scores = {"max_logit": (winning_scores(known)[1], winning_scores(new)[1]),
              "max_softmax": (max_softmax(known), max_softmax(new)),
              "energy": (energy(known), energy(new))}
    separation = {name: {"auroc": auroc(k, u), "fpr_at_95_tpr": fpr_at_95_tpr(k, u)} for name, (k, u) in scores.items()}
    known_level = known_assessment.lowest_reliable_level
    return UnseenReport(
        dataset=unseen.dataset, splits=list(unseen.splits), leaf_rank=leaf_rank, classes=classes, overall=overall,
        separation=separation, known_images=int(len(known_level)),
        known_unsure_at_leaf=float((known_level < leaf_level).mean()),
        known_flagged_at_leaf=float((~known_assessment.sure[:, leaf_level]).mean()),
        skipped_known=int(unseen.skipped_known),
    )


def _unseen_stats(taxonomy: Taxonomy, name: str, lineage: tuple[str | None, ...], assessment: Assessment,
                  targets: np.ndarray, mask: np.ndarray) -> UnseenClassResult:
    leaf_level = taxonomy.depth - 1
    level = assessment.lowest_reliable_level[mask]
    predictions, truth = assessment.predictions[mask], targets[mask]
    reported = level >= 0
    rows = np.arange(len(level))
    safe = np.where(reported, level, 0)
    # a reported higher rank is correct when the label names a known class there and the prediction matches it;
    # a reported leaf is always wrong: the class is not in the taxonomy
    hit = reported & (level < leaf_level) & (truth[rows, safe] != UNSPECIFIED) & \
        (predictions[rows, safe] == truth[rows, safe])
    n = int(mask.sum())
    return UnseenClassResult(
        name=name, lineage=lineage, images=n,
        unsure_at_leaf=float((level < leaf_level).mean()),
        flagged_at_leaf=float((~assessment.sure[mask, leaf_level]).mean()),
        lowest_reliable=_level_shares(taxonomy, level),
        correct_higher=float(hit.mean()),
        wrongly_reliable=float((reported & ~hit).mean()),
        unsure_everywhere=float((~reported).mean()),
    )


def _level_shares(taxonomy: Taxonomy, levels: np.ndarray) -> dict[str, float]:
    n = max(len(levels), 1)
    shares = {rank: float((levels == level).sum() / n) for level, rank in enumerate(taxonomy.ranks)}
    shares[UNSURE] = float((levels < 0).sum() / n)
    return shares


def _reliable_correct(taxonomy: Taxonomy, assessment: Assessment, targets: np.ndarray) -> dict[str, float]:
    """Per lowest reliable rank: the share of those samples whose reported class is right (labelled ones only)."""
    out = {}
    levels = assessment.lowest_reliable_level
    for level, rank in enumerate(taxonomy.ranks):
        chosen = (levels == level) & (targets[:, level] != UNSPECIFIED)
        out[rank] = float((assessment.predictions[chosen, level] == targets[chosen, level]).mean()) \
            if chosen.any() else math.nan
    return out


# ---------------------------------------------------------------------------------------------------------- labels
def encode_known_prefix(taxonomy: Taxonomy, chain: Sequence[Any]) -> tuple[tuple[int, ...], bool]:
    """Encode a label chain leniently: the indices of the ranks the taxonomy knows, top down, −1 from the first
    unknown (or unlabelled, or contradicting) rank on. Returns (indices, whether the whole chain is known)."""
    out = [UNSPECIFIED] * taxonomy.depth
    for level, value in enumerate(chain):
        if is_unspecified(value) or (level, str(value).strip()) not in taxonomy:
            break
        index = taxonomy.index(level, str(value).strip())
        if level and taxonomy.parents[level][index] != out[level - 1]:
            break  # a known name under another parent than the taxonomy's: trust only the ranks above it
        out[level] = index
    return tuple(out), all(v != UNSPECIFIED for v in out)


def json_ready(value: Any) -> Any:
    """Plain JSON types (NumPy arrays and numbers included); NaN becomes null (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value

