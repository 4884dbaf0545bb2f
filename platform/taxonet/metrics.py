"""Metrics: per-rank macro precision/recall/F1 and accuracy, confusion matrices with an "unsure" column, the
hierarchy-consistency rate, and mean ± SD over runs printed in the shape of the paper's Table 4.

NumPy only. Samples whose label at a rank is ``UNSPECIFIED`` (−1) are left out of that rank's metrics. Macro
averages follow scikit-learn's semantics (``average="macro"``, ``zero_division=0``): the mean over the union of
classes that occur in the labels or the predictions, a class with no predicted (or no true) sample scoring 0
precision (recall) — so a model that invents a class it should not is penalised.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from taxonet.taxonomy import UNSPECIFIED, Taxonomy

#: Metric keys of :func:`rank_metrics` that are averaged over runs, and their Table 4 abbreviations.
TABLE_METRICS = (("precision", "P"), ("recall", "R"), ("f1", "F1"))
MISSING = "–"  # en dash, as in the paper's table for ranks a single-task model does not predict


def _labels_1d(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def rank_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Macro precision, recall, F1, accuracy and support (labelled samples) for one rank; y_true == −1 ignored.

    With no labelled sample the four scores are NaN and the support is 0.
    """
    y_true = _labels_1d(y_true, "y_true")
    y_pred = _labels_1d(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    keep = y_true != UNSPECIFIED
    y_true, y_pred = y_true[keep], y_pred[keep]
    support = int(len(y_true))
    if support == 0:
        return {"precision": math.nan, "recall": math.nan, "f1": math.nan, "accuracy": math.nan, "support": 0}
    labels, inverse = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    true_index, pred_index = inverse[:support], inverse[support:]
    n = len(labels)
    true_count = np.bincount(true_index, minlength=n).astype(np.float64)
    pred_count = np.bincount(pred_index, minlength=n).astype(np.float64)
    hit = true_index == pred_index
    true_positive = np.bincount(true_index[hit], minlength=n).astype(np.float64)
    precision = np.divide(true_positive, pred_count, out=np.zeros(n), where=pred_count > 0)
    recall = np.divide(true_positive, true_count, out=np.zeros(n), where=true_count > 0)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (true + predicted); 0 for a class with no true positive
    denominator = true_count + pred_count
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(n), where=denominator > 0)
    return {
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "accuracy": float(hit.mean()),
        "support": support,
    }


def _check_matrix(taxonomy: Taxonomy, values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[1] != taxonomy.depth:
        raise ValueError(f"{what} must be [N, {taxonomy.depth}] (one column per rank {list(taxonomy.ranks)}), "
                         f"got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def evaluate_predictions(taxonomy: Taxonomy, targets: Any, predictions: Any,
                         ranks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """:func:`rank_metrics` for each rank (all ranks by default), columns in taxonomy order."""
    targets = _check_matrix(taxonomy, targets, "targets")
    predictions = _check_matrix(taxonomy, predictions, "predictions")
    if targets.shape != predictions.shape:
        raise ValueError(f"targets {targets.shape} and predictions {predictions.shape} differ in shape")
    ranks = taxonomy.ranks if ranks is None else ranks
    out = {}
    for rank in ranks:
        level = taxonomy.level(rank)
        out[taxonomy.ranks[level]] = rank_metrics(targets[:, level], predictions[:, level])
    return out


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int, unsure: Any = None) -> np.ndarray:
    """int [n, n+1]: rows = true class, columns = predicted class, last column = "unsure".

    Samples flagged in ``unsure`` are counted in the last column instead of their predicted class; samples with
    y_true == −1 are left out.
    """
    y_true = _labels_1d(y_true, "y_true")
    y_pred = _labels_1d(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if unsure is None:
        unsure = np.zeros(len(y_true), dtype=bool)
    else:
        unsure = np.asarray(unsure)
        if unsure.shape != y_true.shape or unsure.dtype != bool:
            raise ValueError(f"unsure must be a bool array of length {len(y_true)}, got {unsure.dtype} {unsure.shape}")
    keep = y_true != UNSPECIFIED
    y_true, y_pred, unsure = y_true[keep], y_pred[keep], unsure[keep]
    for what, values in (("y_true", y_true), ("y_pred", y_pred)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            offenders = sorted(set(values[bad].tolist()))[:5]
            raise ValueError(f"{what} holds class indices outside 0..{num_classes - 1}: {offenders}")
    column = np.where(unsure, num_classes, y_pred)
    flat = np.bincount(y_true * (num_classes + 1) + column, minlength=num_classes * (num_classes + 1))
    return flat.reshape(num_classes, num_classes + 1).astype(np.int64)


def consistency_rate(taxonomy: Taxonomy, predictions: Any) -> float:
    """Share of predicted chains [N, depth] whose every (parent, child) pair is an edge of the taxonomy."""
    predictions = _check_matrix(taxonomy, predictions, "predictions")
    if len(predictions) == 0:
        return math.nan
    for level, size in enumerate(taxonomy.sizes):
        column = predictions[:, level]
        if ((column < 0) | (column >= size)).any():
            raise ValueError(f"predictions for {taxonomy.ranks[level]} must be in 0..{size - 1}")
    return float(taxonomy.consistency(predictions).mean())


def summarize_runs(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation (ddof=1 with ≥ 2 values, else 0) of every metric per rank over runs.

    ``runs`` are results of :func:`evaluate_predictions` (one per seed); a rank or metric is summarised over the
    runs that report it.
    """
    if not runs:
        raise ValueError("summarize_runs needs at least one run")
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for rank, metrics in run.items():
            for name, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    continue
                values.setdefault(rank, {}).setdefault(name, []).append(float(value))
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for rank, metrics in values.items():
        summary[rank] = {}
        for name, series in metrics.items():
            array = np.asarray(series)
            sd = float(array.std(ddof=1)) if len(array) >= 2 else 0.0
            summary[rank][name] = (float(array.mean()), sd)
    return summary


def format_table4(summary_by_model: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
                  ranks: Sequence[str], fmt: str = "markdown", digits: int = 3) -> str:
    """The paper's Table 4: one row per model; per rank precision, recall and F1 as mean ± SD.

    ``fmt="markdown"``: cells ``0.955 ± 0.004``, ranks a model lacks (single-task baselines) shown as ``–``.
    ``fmt="csv"``: separate ``<rank>_<metric>_mean`` / ``_sd`` columns with full precision; a rank a model lacks
    gives empty cells (a machine-readable missing value).
    """
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
    ranks = list(ranks)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["model"] + [f"{rank}_{metric}_{stat}" for rank in ranks for metric, _ in TABLE_METRICS
                                     for stat in ("mean", "sd")])
        for model, summary in summary_by_model.items():
            cells: list[Any] = [model]
            for rank in ranks:
                for metric, _ in TABLE_METRICS:
                    pair = summary.get(rank, {}).get(metric)
                    cells += ["", ""] if pair is None else [repr(float(pair[0])), repr(float(pair[1]))]
            writer.writerow(cells)
        return buffer.getvalue()
    header = ["model"] + [f"{rank} {abbrev}" for rank in ranks for _, abbrev in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for model, summary in summary_by_model.items():
        cells = [str(model)]
        for rank in ranks:
            for metric, _ in TABLE_METRICS:
                pair = summary.get(rank, {}).get(metric)
                cells.append(MISSING if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
