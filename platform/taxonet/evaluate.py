"""Evaluation reports: a trained checkpoint on a held-out split, in the shape of Bjerge et al. 2023 (METHOD.md
"Evaluation" and "Anomaly detection").

The report holds, for any taxonomy (rank names and depth are read from the checkpoint):

* per rank, macro precision / recall / F1 and accuracy (Table 4 shape), the hierarchy-consistency rate, and the
  share of predictions whose lowest reliable rank is each rank (or "unsure");
* per rank, a confusion matrix whose last column counts the samples the model would NOT report at that rank
  (their lowest reliable rank is above it), written as ``confusion_<rank>.png``;
* the training curves of the run (``curves.png``) from the checkpoint's per-epoch history;
* with an unseen-species dataset (leaf classes that are not in the checkpoint's taxonomy, under known parents): per
  unseen class how often it is unsure at the leaf rank, how often its lowest reliable rank is a correct higher rank,
  how often a wrong answer is reported as reliable; and how well the max-logit, max-softmax and energy scores at the
  leaf rank separate unseen samples from the known test samples (AUROC, FPR at 95 % TPR).

:func:`build_report` is pure NumPy on logits and targets (tests call it directly); :func:`run_evaluation` loads the
checkpoint, reads the Parquet splits and runs the model. Plots use matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taxonet.errors import DatasetError
from taxonet.taxonomy import UNSPECIFIED, Taxonomy, is_unspecified

if TYPE_CHECKING:
    from taxonet.anomaly import AnomalyThresholds, Assessment

log = logging.getLogger(__name__)

#: key for "no rank is reliable" in the lowest-reliable-rank shares
UNSURE = "unsure"
#: the anomaly scores compared for separating unseen from known samples (all "higher = more in-distribution")
SCORE_NAMES = ("max_logit", "max_softmax", "energy")
_SCORE_LABELS = {"max_logit": "max logit (the paper's score)", "max_softmax": "max softmax probability",
                 "energy": "energy (negative free energy)"}
_TABLE_METRICS = (("precision", "P"), ("recall", "R"), ("f1", "F1"))
MISSING = "–"


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
    """Everything ``taxonet evaluate`` reports; :meth:`write` renders it to files, :meth:`to_dict` to JSON."""

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
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ views
    @property
    def ranks(self) -> list[str]:
        return list(self.taxonomy.ranks)

    def table4_markdown(self, digits: int = 3) -> str:
        """One row in the shape of the paper's Table 4: per rank macro P/R/F1 ("–" for ranks without a head)."""
        header = ["model"] + [f"{rank} {abbrev}" for rank in self.ranks for _, abbrev in _TABLE_METRICS]
        cells = [self.model_name]
        for rank in self.ranks:
            values = self.rank_metrics.get(rank)
            for metric, _ in _TABLE_METRICS:
                cells.append(MISSING if values is None else _number(values[metric], digits))
        return _markdown_table(header, [cells], align_first_left=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content (metrics.json)."""
        return _json_ready({
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

    def markdown(self, files: Mapping[str, Path] | None = None) -> str:
        """report.md; ``files`` (from :meth:`write`) decides which images are linked."""
        files = files or {}
        lines = [f"# Evaluation: {self.model_name}", ""]
        lines += [f"- checkpoint: `{self.checkpoint}`", f"- dataset: `{self.dataset}`, split `{self.split}`, "
                  f"{self.images} images", f"- heads: {', '.join(self.head_ranks)} (ranks: {', '.join(self.ranks)})"]
        lines.append(f"- anomaly thresholds: τ = μ − {self.threshold_k:g}·σ per (rank, class)" if self.threshold_k
                     is not None else "- anomaly thresholds: none in this checkpoint (no reliability analysis)")
        lines += ["", "## Per-rank metrics (Table 4 shape: macro precision, recall, F1)", "", self.table4_markdown(),
                  ""]
        rows = []
        for rank in self.ranks:
            derived = rank not in self.rank_metrics
            values = self.derived_metrics.get(rank) if derived else self.rank_metrics[rank]
            if values is None:
                continue
            flagged = self.flagged.get(rank) if self.flagged else None
            rows.append([rank + (" (derived from the taxonomy)" if derived else ""),
                         *(_number(values[m]) for m in ("precision", "recall", "f1", "accuracy")),
                         str(values["support"]), MISSING if flagged is None else _percent(flagged)])
        lines += [_markdown_table(["rank", "precision", "recall", "F1", "accuracy", "labelled images",
                                   "score below τ"], rows, align_first_left=True), ""]
        lines.append(f"Hierarchy consistency: {_percent(self.consistency)} of the predicted chains follow the taxonomy"
                     + (" (single-task: higher ranks are derived, so always consistent)."
                        if len(self.head_ranks) < len(self.ranks) else "."))
        lines.append("")
        if self.lowest_reliable is not None:
            lines += ["## Lowest reliable rank", "",
                      "Down to which rank each prediction can be trusted (METHOD.md: a rank is reliable when it and "
                      "the rank above pass their anomaly thresholds and the chain follows the taxonomy).", ""]
            rows = []
            for key in [*reversed(self.ranks), UNSURE]:
                correct = (self.reliable_correct or {}).get(key)
                rows.append([key, _percent(self.lowest_reliable.get(key, 0.0)),
                             MISSING if correct is None or math.isnan(correct) else _percent(correct)])
            lines += [_markdown_table(["lowest reliable rank", "share of images", "label correct at that rank"],
                                      rows, align_first_left=True), ""]
        lines += ["## Confusion matrices", "",
                  f"Rows: true class; columns: predicted class; last column \"{UNSURE}\": not reported at that rank "
                  "(its lowest reliable rank is higher, or none).", ""]
        for rank in self.ranks:
            key = f"confusion_{rank}"
            if key in files:
                lines += [f"![{rank} confusion matrix]({Path(files[key]).name})", ""]
        lines += ["## Training curves", ""]
        if "curves" in files:
            lines += [f"![training curves]({Path(files['curves']).name})", ""]
        else:
            lines += ["No per-epoch history in this checkpoint (nor a history.json beside it): no curves.", ""]
        if self.unseen is not None:
            lines += _unseen_markdown(self.unseen, self.taxonomy)
        if self.notes:
            lines += ["## Notes", ""] + [f"- {note}" for note in self.notes] + [""]
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.md, metrics.json, confusion_<rank>.png, curves.png (when there is a history) and, with an
        unseen dataset, unseen.csv into ``out_dir`` (a local directory, created). Returns {name: path}."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        for rank, matrix in self.confusion.items():
            path = out / f"confusion_{_file_safe(rank)}.png"
            plot_confusion(matrix, self.taxonomy.names[self.taxonomy.level(rank)], path,
                           title=f"{rank}: {self.model_name} on {self.split} ({int(matrix.sum())} images)")
            files[f"confusion_{rank}"] = path
        curves = out / "curves.png"
        if plot_curves(self.history, self.ranks, curves, title=f"training: {self.model_name}"):
            files["curves"] = curves
        else:
            curves.unlink(missing_ok=True)  # a stale plot from an earlier report must not pass for this one
        if self.unseen is not None:
            files["unseen"] = out / "unseen.csv"
            _write_text(files["unseen"], _unseen_csv(self.unseen, self.taxonomy))
        files["metrics"] = out / "metrics.json"
        _write_text(files["metrics"], json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=True))
        files["report"] = out / "report.md"
        _write_text(files["report"], self.markdown(files))
        return files


# ---------------------------------------------------------------------------------------------------------- core
def build_report(
    taxonomy: Taxonomy,
    logits: Mapping[str, Any],
    targets: Any,
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
    from taxonet.anomaly import AnomalyThresholds, assess
    from taxonet.metrics import confusion_matrix, evaluate_predictions

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
    logits: Mapping[str, Any]
    targets: Any
    chains: Sequence[Sequence[str | None]]
    splits: list[str] = field(default_factory=list)
    skipped_known: int = 0


def unseen_report(taxonomy: Taxonomy, thresholds: AnomalyThresholds | None, known_logits: Mapping[str, Any],
                  known_assessment: Assessment, unseen: UnseenInputs) -> UnseenReport:
    """Per unseen leaf class and overall: reliability of the answers, and known-vs-unseen score separation."""
    from taxonet.anomaly import AnomalyThresholds, assess, auroc, energy, fpr_at_95_tpr, max_softmax, winning_scores

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


# ---------------------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # draw with Agg: no display, no global pyplot state
    return figure


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A confusion matrix [n, n+1] as PNG: colour = share of the row, numbers = counts, last column "unsure"."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n + 1):
        raise ValueError(f"confusion matrix must be [{n}, {n + 1}] for {n} classes, got {matrix.shape}")
    columns = [*class_names, UNSURE]
    cell = 0.55 if n <= 20 else max(0.25, 11.0 / n)  # inches per cell (100 dpi): labels stay legible
    font = 9 if n <= 20 else max(6, int(180 / n))
    width, height = (n + 1) * cell, n * cell
    # the matrix fills the canvas; tick labels, title and colour bar lie outside and are kept by the tight bbox
    figure = _figure(width + 0.6, height)
    axes = figure.add_axes((0.0, 0.0, width / (width + 0.6), 1.0))
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(n + 1))
    axes.set_xticklabels(columns, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
    axes.set_yticks(range(n))
    axes.set_yticklabels([f"{name} ({int(total)})" for name, total in zip(class_names, rows[:, 0])], fontsize=font)
    axes.axvline(n - 0.5, color="black", linewidth=1.5)  # sets the "unsure" column apart
    axes.get_xticklabels()[-1].set_fontweight("bold")
    if n <= 30:
        for i in range(n):
            for j in range(n + 1):
                if matrix[i, j]:
                    axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=font,
                              color="white" if shares[i, j] > 0.6 else "black")
    axes.set_xlabel("predicted", fontsize=max(font + 1, 9))
    axes.set_ylabel("true (images)", fontsize=max(font + 1, 9))
    axes.set_title(title, fontsize=max(font + 2, 10))
    colorbar_axes = figure.add_axes(((width + 0.25) / (width + 0.6), 0.0, 0.15 / (width + 0.6), 1.0))
    figure.colorbar(image, cax=colorbar_axes).set_label("share of the row", fontsize=max(font, 8))
    path = Path(path)
    figure.savefig(path, format="png", bbox_inches="tight", pad_inches=0.2)
    return path


def plot_curves(history: Sequence[Mapping[str, Any]], ranks: Sequence[str], path: str | Path,
                title: str = "") -> bool:
    """Loss (train, val) and per-rank validation F1 per epoch as PNG; False (nothing written) without history."""
    epochs = [h for h in history if isinstance(h, Mapping) and "epoch" in h]
    if not epochs:
        return False
    epochs = sorted(epochs, key=lambda h: h["epoch"])
    x = [int(h["epoch"]) + 1 for h in epochs]  # 1-based for people
    figure = _figure(11, 4.2)
    loss_axes, f1_axes = figure.subplots(1, 2)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        series = _series(epochs, key)
        if series is not None:
            loss_axes.plot(x, series, marker="o", label=label)
    val_loss = _series(epochs, "val_loss")
    if val_loss is not None and np.isfinite(val_loss).any():
        best = x[int(np.nanargmin(val_loss))]
        loss_axes.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best})")
        f1_axes.axvline(best, color="grey", linestyle="--", linewidth=1)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("loss")
    loss_axes.legend(fontsize=8)
    for rank in ranks:
        series = _series(epochs, f"val_{rank}_f1")
        if series is not None:
            f1_axes.plot(x, series, marker="o", label=rank)
    f1_axes.set_ylim(0.0, 1.02)
    f1_axes.set_xlabel("epoch")
    f1_axes.set_ylabel("macro F1")
    f1_axes.set_title("validation macro F1 per rank")
    if f1_axes.get_legend_handles_labels()[0]:
        f1_axes.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for axes in (loss_axes, f1_axes):
        axes.grid(alpha=0.3)
        axes.set_xlim(min(x) - 0.5, max(x) + 0.5)  # whole epochs only, also for a one-epoch run
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(Path(path), format="png")
    return True


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    if not any(key in h for h in history):
        return None
    return np.asarray([float(h[key]) if isinstance(h.get(key), (int, float)) else math.nan for h in history])


# ---------------------------------------------------------------------------------------------------------- text
def _number(value: float, digits: int = 3) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align_first_left: bool = False) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join((["---"] if align_first_left else []) +
                            ["---:"] * (len(header) - (1 if align_first_left else 0))) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _unseen_columns(taxonomy: Taxonomy) -> list[str]:
    leaf = taxonomy.ranks[-1]
    higher = list(reversed(taxonomy.ranks[:-1]))
    return ([f"unsure at {leaf}", f"{leaf} score below τ"] + [f"reported at {rank}" for rank in higher] +
            ["correct higher rank", "wrongly reliable", "unsure at every rank"])


def _unseen_values(result: UnseenClassResult, taxonomy: Taxonomy) -> list[float]:
    higher = list(reversed(taxonomy.ranks[:-1]))
    return ([result.unsure_at_leaf, result.flagged_at_leaf] + [result.lowest_reliable.get(r, 0.0) for r in higher] +
            [result.correct_higher, result.wrongly_reliable, result.unsure_everywhere])


def _unseen_markdown(unseen: UnseenReport, taxonomy: Taxonomy) -> list[str]:
    leaf = unseen.leaf_rank
    lines = [f"## Unseen {leaf} (`{unseen.dataset}`" + (f", split(s) {', '.join(unseen.splits)}" if unseen.splits
                                                        else "") + ")", "",
             f"Images of {leaf} classes the model never saw, under known higher taxa. The right answer is "
             f"\"unsure at {leaf}\" with the lowest reliable rank a correct higher rank; \"wrongly reliable\" counts "
             "answers reported at a rank whose class is wrong (a reported unseen leaf is always wrong).", ""]
    header = [leaf, "known lineage", "images", *_unseen_columns(taxonomy)]
    rows = [[c.name, " > ".join(x if x is not None else "?" for x in c.lineage) or MISSING, str(c.images),
             *(_percent(v) for v in _unseen_values(c, taxonomy))] for c in unseen.classes]
    overall = unseen.overall
    rows.append(["**all**", "", str(overall.images), *(_percent(v) for v in _unseen_values(overall, taxonomy))])
    lines += [_markdown_table(header, rows, align_first_left=True), ""]
    lines += [f"### Telling unseen from known at the {leaf} rank", "",
              f"Known: the {unseen.known_images} images of the evaluated split; unseen: the {overall.images} images "
              "above. AUROC 0.5 = chance, 1.0 = perfect; FPR@95%TPR = share of unseen images still accepted when "
              "95% of known images are.", ""]
    rows = [[_SCORE_LABELS.get(name, name), _number(values["auroc"]), _percent(values["fpr_at_95_tpr"])]
            for name, values in unseen.separation.items()]
    lines += [_markdown_table(["score", "AUROC", "FPR@95%TPR"], rows, align_first_left=True), ""]
    lines += [f"Known images not reported at {leaf}: {_percent(unseen.known_unsure_at_leaf)} "
              f"(score below τ: {_percent(unseen.known_flagged_at_leaf)}); unseen images not reported at {leaf}: "
              f"{_percent(overall.unsure_at_leaf)}.", ""]
    return lines


def _unseen_csv(unseen: UnseenReport, taxonomy: Taxonomy) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [c.replace(" ", "_").replace("τ", "threshold") for c in _unseen_columns(taxonomy)]
    writer.writerow([unseen.leaf_rank, *taxonomy.ranks[:-1], "images", *columns])
    for result in [*unseen.classes, unseen.overall]:
        lineage = list(result.lineage) + [None] * (taxonomy.depth - 1 - len(result.lineage))
        writer.writerow([result.name, *("" if x is None else x for x in lineage), result.images,
                         *(repr(float(v)) for v in _unseen_values(result, taxonomy))])
    return buffer.getvalue()


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_ready(value: Any) -> Any:
    """Plain JSON types; NaN becomes null (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


# ---------------------------------------------------------------------------------------------------------- I/O
def run_evaluation(checkpoint_uri: str, dataset_uri: str, *, split: str = "test", unseen_uri: str | None = None,
                   device: str = "auto", batch_size: int = 64) -> EvaluationReport:
    """Evaluate a checkpoint (local, file:// or s3://) on ``split`` of a prepared dataset, optionally with an
    unseen-species dataset (its ``unseen`` split if it has one, else all its splits)."""
    from taxonet import engine
    from taxonet.checkpoint import load_checkpoint
    from taxonet.data.dataset import DatasetInfo

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    torch_device = engine.resolve_device(device)
    info = DatasetInfo.load(dataset_uri)
    if split not in info.splits:
        raise DatasetError(f"dataset {dataset_uri} has no split {split!r}; splits are {list(info.splits)}")
    unseen_info = DatasetInfo.load(unseen_uri) if unseen_uri else None  # fail on a bad URI before any model work
    loaded = load_checkpoint(checkpoint_uri, device=torch_device)
    taxonomy = loaded.taxonomy
    _check_dataset_fits(info, taxonomy, [split], dataset_uri)
    if unseen_info is not None:
        _check_dataset_fits(unseen_info, taxonomy, None, str(unseen_uri), leaves_may_differ=True)
    amp, channels_last = loaded.config.train.amp, loaded.config.train.channels_last
    skipped: dict[str, int] = {}
    batches = _labelled_batches(info, [split], taxonomy, loaded.transform, batch_size, lenient=False,
                                skipped_records=skipped)
    logits, targets = engine.collect_logits(loaded.model, (b[:2] for b in batches), torch_device, amp=amp,
                                            channels_last=channels_last)
    if not len(targets):
        raise DatasetError(f"split {split!r} of {dataset_uri} holds no decodable image: nothing to evaluate"
                           + (f" (skipped: {skipped})" if skipped else ""))
    unseen = None
    unseen_skipped: dict[str, int] = {}
    if unseen_info is not None:
        unseen_splits = ["unseen"] if "unseen" in unseen_info.splits else list(unseen_info.splits)
        unseen = _collect_unseen(loaded, unseen_info, unseen_splits, batch_size, torch_device, unseen_skipped)
    model_name = f"{loaded.name} {loaded.version}".strip()
    report = build_report(taxonomy, logits, targets, thresholds=loaded.thresholds, checkpoint=str(checkpoint_uri),
                          dataset=str(dataset_uri), split=split, model_name=model_name,
                          history=_history(loaded, checkpoint_uri), unseen=unseen)
    for where, counts in ((f"split {split!r}", skipped), ("the unseen dataset", unseen_skipped)):
        if counts:
            report.notes.append(f"{sum(counts.values())} record(s) of {where} could not be used and were left out "
                                f"({', '.join(f'{reason}: {n}' for reason, n in sorted(counts.items()))})")
    return report


def _check_dataset_fits(info: Any, taxonomy: Taxonomy, splits: Sequence[str] | None, uri: str, *,
                        leaves_may_differ: bool = False) -> None:
    """The dataset's ranks must be the checkpoint's; its labels in ``splits`` must be known to the checkpoint
    (for an unseen dataset: every rank above the leaf may hold unknown names too, reported as such)."""
    if tuple(info.taxonomy.ranks) != tuple(taxonomy.ranks):
        raise DatasetError(f"dataset {uri} has ranks {list(info.taxonomy.ranks)} but the checkpoint was trained on "
                           f"{list(taxonomy.ranks)}")
    if leaves_may_differ:
        return
    classes = info.counts.get("classes", {})
    unknown = []
    for level, rank in enumerate(taxonomy.ranks):
        for name, per_split in classes.get(rank, {}).items():
            if (level, name) not in taxonomy and any(per_split.get(s, 0) for s in (splits or per_split)):
                unknown.append(f"{rank} {name!r}")
    if unknown:
        raise DatasetError(f"split(s) {list(splits or [])} of {uri} hold classes the checkpoint does not know: "
                           f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (evaluate species unseen "
                           "in training with --unseen DATASET)")


def _labelled_batches(info: Any, splits: Sequence[str], taxonomy: Taxonomy, transform: Any, batch_size: int, *,
                      lenient: bool, skipped_records: dict[str, int] | None = None
                      ) -> Iterator[tuple[Any, Any, list[tuple[str | None, ...]], int]]:
    """(images, targets, label chains, rows of known leaves skipped) per batch of the given splits.

    Strict (the evaluated split): the pipeline's :class:`~taxonet.data.pipeline.Collator` decodes and encodes whole
    batches; labels the taxonomy does not know were refused before (:func:`_check_dataset_fits`), and the chains are
    not needed. ``lenient`` (unseen species): labels are encoded with :func:`encode_known_prefix`, rows whose leaf
    the taxonomy knows are dropped, and rows go through the collator one by one, so that an undecodable image (which
    the collator skips) cannot shift the label chains against the images. Records the collator skipped (corrupt
    images) are counted by reason into ``skipped_records``.
    """
    import torch

    from taxonet.data.pipeline import Collator, iter_parquet_batches

    collate = Collator(taxonomy, transform, train=False)
    ranks = list(taxonomy.ranks)
    for split in splits:
        for raw in iter_parquet_batches(info.uri, split, batch_size, shuffle=False, columns=["image", *ranks]):
            if not lenient:
                images, targets = collate(raw)
                yield images, targets, [], 0
                continue
            columns = [_as_list(raw[rank]) for rank in ranks]
            skipped = 0
            images_kept, targets_kept, chains = [], [], []
            for i, row in enumerate(zip(*columns)):
                chain = tuple(None if is_unspecified(v) else str(v) for v in row)
                encoded, whole = encode_known_prefix(taxonomy, chain)
                if whole:
                    skipped += 1
                    continue
                # only the names the checkpoint knows reach the collator: the rest is "unspecified" (−1)
                one = {"image": [raw["image"][i]]}
                one.update({rank: [taxonomy.names[level][encoded[level]] if encoded[level] != UNSPECIFIED else None]
                            for level, rank in enumerate(ranks)})
                image, target = collate(one)
                if len(image):
                    images_kept.append(image)
                    targets_kept.append(target)
                    chains.append(chain)
            if not chains:
                yield None, None, [], skipped
                continue
            yield torch.cat(images_kept), torch.cat(targets_kept), chains, skipped
    if skipped_records is not None:
        for reason, count in collate.skipped_by_reason.items():
            skipped_records[reason] = skipped_records.get(reason, 0) + count


def _collect_unseen(loaded: Any, info: Any, splits: list[str], batch_size: int, device: Any,
                    skipped_records: dict[str, int]) -> UnseenInputs:
    from taxonet import engine

    chains: list[tuple[str | None, ...]] = []
    skipped = [0]

    def batches() -> Iterator[tuple[Any, Any]]:
        for images, targets, batch_chains, batch_skipped in _labelled_batches(
                info, splits, loaded.taxonomy, loaded.transform, batch_size, lenient=True,
                skipped_records=skipped_records):
            skipped[0] += batch_skipped
            if images is None:
                continue
            chains.extend(batch_chains)
            yield images, targets

    logits, targets = engine.collect_logits(loaded.model, batches(), device, amp=loaded.config.train.amp,
                                            channels_last=loaded.config.train.channels_last)
    if not chains:
        raise DatasetError(f"unseen dataset {info.uri} (split(s) {splits}) holds no image of a class unknown to the "
                           f"checkpoint" + (f": all {skipped[0]} images are of known classes" if skipped[0] else ""))
    return UnseenInputs(dataset=str(info.uri), logits=logits, targets=targets, chains=chains, splits=splits,
                        skipped_known=skipped[0])


def _as_list(values: Any) -> list[Any]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _history(loaded: Any, checkpoint_uri: str) -> list[dict[str, Any]]:
    """Per-epoch metrics: the checkpoint's ``metrics["history"]``, else ``history.json`` beside the checkpoint
    (Ray Train runs write it to ``<run>/history.json`` next to ``<run>/best``)."""
    history = loaded.metrics.get("history") if isinstance(loaded.metrics, Mapping) else None
    if isinstance(history, list) and history:
        return history
    from taxonet import storage

    text = str(checkpoint_uri).rstrip("/")
    parent = posixpath.dirname(text) if storage.is_s3(text) else os.path.dirname(os.path.abspath(
        text.removeprefix("file://")))
    try:
        data = json.loads(storage.read_bytes(storage.join(parent, "history.json")))
    except (OSError, ValueError) as exc:
        log.debug("no training history for %s: %s", checkpoint_uri, exc)
        return []
    except Exception as exc:  # StorageError: the curves are optional, the evaluation is not
        log.warning("could not read the training history beside %s: %s", checkpoint_uri, exc)
        return []
    return data if isinstance(data, list) else []


__all__ = [
    "EvaluationReport",
    "UnseenClassResult",
    "UnseenInputs",
    "UnseenReport",
    "build_report",
    "encode_known_prefix",
    "plot_confusion",
    "plot_curves",
    "run_evaluation",
    "unseen_report",
]
