"""Metrics against scikit-learn, the "unsure" confusion column, consistency, and the Table 4 summary."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from taxonet.metrics import (
    confusion_matrix,
    consistency_rate,
    evaluate_predictions,
    format_table4,
    rank_metrics,
    summarize_runs,
)
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.unit


def sklearn_rank_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    keep = y_true != -1
    p, r, f, _ = precision_recall_fscore_support(y_true[keep], y_pred[keep], average="macro", zero_division=0)
    return {"precision": p, "recall": r, "f1": f, "accuracy": accuracy_score(y_true[keep], y_pred[keep])}


@pytest.mark.parametrize("seed", range(12))
def test_rank_metrics_match_sklearn_on_random_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, classes = int(rng.integers(1, 60)), int(rng.integers(2, 9))
    y_true = rng.integers(0, classes, n)
    # mostly right, some wrong, some predicting classes absent from y_true, some unspecified labels
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, classes + 2, n))
    y_true = np.where(rng.random(n) < 0.15, -1, y_true)
    if (y_true == -1).all():
        y_true[0] = y_pred[0]
    ours = rank_metrics(y_true, y_pred)
    theirs = sklearn_rank_metrics(y_true, y_pred)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value), key
    assert ours["support"] == int((y_true != -1).sum())


def test_rank_metrics_hand_case_and_edge_cases() -> None:
    # classes 0, 1 true; 2 only predicted: P = (1/1 + 1/2 + 0)/3, R = (1/2 + 1/2 + 0)/3, accuracy 2/4
    scores = rank_metrics([0, 0, 1, 1], [0, 1, 1, 2])
    assert scores["precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores["recall"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert scores["f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # per class 2PR/(P+R)
    assert scores["accuracy"] == 0.5 and scores["support"] == 4
    nothing = rank_metrics([-1, -1], [0, 1])
    assert nothing["support"] == 0 and all(math.isnan(nothing[k]) for k in ("precision", "recall", "f1", "accuracy"))
    with pytest.raises(ValueError, match="differ in length"):
        rank_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="integer class indices"):
        rank_metrics([0.5], [0])


def test_evaluate_predictions_per_rank_with_partial_labels() -> None:
    demo = Taxonomy.demo()
    rng = np.random.default_rng(3)
    rows = np.array([demo.encode(r) for r in demo.rows()])
    targets = rows[rng.integers(0, len(rows), 40)]
    predictions = np.where(rng.random(targets.shape) < 0.7, targets, rows[rng.integers(0, len(rows), 40)])
    targets[:5, 2] = -1  # known to family only
    targets[5:8, 1:] = -1  # known to order only
    result = evaluate_predictions(demo, targets, predictions)
    assert list(result) == ["order", "family", "species"]
    for level, rank in enumerate(demo.ranks):
        expected = sklearn_rank_metrics(targets[:, level], predictions[:, level])
        assert result[rank]["f1"] == pytest.approx(expected["f1"])
    assert (result["order"]["support"], result["family"]["support"], result["species"]["support"]) == (40, 37, 32)
    assert list(evaluate_predictions(demo, targets, predictions, ranks=["species"])) == ["species"]
    with pytest.raises(ValueError, match=r"predictions must be \[N, 3\]"):
        evaluate_predictions(demo, targets, predictions[:, :2])


@pytest.mark.parametrize("seed", range(4))
def test_confusion_matrix_matches_sklearn_plus_unsure_column(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, classes = 50, 5
    y_true = rng.integers(0, classes, n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, classes, n))
    plain = confusion_matrix(y_true, y_pred, classes)
    assert plain.shape == (classes, classes + 1)
    assert (plain[:, :classes] == sklearn_confusion_matrix(y_true, y_pred, labels=range(classes))).all()
    assert (plain[:, classes] == 0).all()
    unsure = rng.random(n) < 0.3
    with_unsure = confusion_matrix(y_true, y_pred, classes, unsure=unsure)
    expected = sklearn_confusion_matrix(y_true[~unsure], y_pred[~unsure], labels=range(classes))
    assert (with_unsure[:, :classes] == expected).all()
    assert (with_unsure[:, classes] == np.bincount(y_true[unsure], minlength=classes)).all()
    assert with_unsure.sum() == n


def test_confusion_matrix_skips_unspecified_and_names_bad_input() -> None:
    matrix = confusion_matrix([0, -1, 1], [1, 0, 1], 2, unsure=np.array([False, True, True]))
    assert matrix.tolist() == [[0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match=r"y_pred holds class indices outside 0..1: \[2\]"):
        confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="unsure must be a bool array"):
        confusion_matrix([0, 1], [0, 1], 2, unsure=[1, 0])


def test_consistency_rate() -> None:
    demo = Taxonomy.demo()
    good = demo.encode(["Hymenoptera", "Apidae", "Apis mellifera"])
    broken = (good[0], good[1], demo.index("species", "Vespula vulgaris"))
    assert consistency_rate(demo, np.array([good, good, good, broken])) == 0.75
    with pytest.raises(ValueError, match="predictions for species must be in 0..8"):
        consistency_rate(demo, np.array([[0, 0, -1]]))


def test_summarize_runs_mean_and_sample_sd() -> None:
    runs = [{"species": {"f1": f, "precision": p, "support": 10}} for f, p in ((0.9, 0.8), (0.94, 0.82), (0.95, 0.9))]
    summary = summarize_runs(runs)
    mean, sd = summary["species"]["f1"]
    assert mean == pytest.approx(np.mean([0.9, 0.94, 0.95]))
    assert sd == pytest.approx(np.std([0.9, 0.94, 0.95], ddof=1))
    assert summary["species"]["support"] == (10.0, 0.0)
    assert summarize_runs(runs[:1])["species"]["f1"] == (0.9, 0.0)  # one run: SD 0
    with pytest.raises(ValueError, match="at least one run"):
        summarize_runs([])


def test_format_table4_markdown_and_csv() -> None:
    mtl = summarize_runs([{"order": {"precision": 0.99, "recall": 0.991, "f1": 0.991},
                           "family": {"precision": 0.987, "recall": 0.986, "f1": 0.987},
                           "species": {"precision": 0.955 + d, "recall": 0.961, "f1": 0.957}} for d in (-0.01, 0.01)])
    single = summarize_runs([{"species": {"precision": 0.953, "recall": 0.966, "f1": 0.959}}])
    ranks = ["order", "family", "species"]
    markdown = format_table4({"ResNet50MTL": mtl, "ResNet50 (species only)": single}, ranks)
    lines = markdown.strip().splitlines()
    assert lines[0] == ("| model | order P | order R | order F1 | family P | family R | family F1 | species P | "
                        "species R | species F1 |")
    assert len(lines) == 4
    assert lines[2].startswith("| ResNet50MTL | 0.990 ± 0.000 | 0.991 ± 0.000 |")
    assert f"0.955 ± {np.std([0.945, 0.965], ddof=1):.3f}" in lines[2]
    assert lines[3] == ("| ResNet50 (species only) | – | – | – | – | – | – | 0.953 ± 0.000 | 0.966 ± 0.000 | "
                        "0.959 ± 0.000 |")
    table = list(csv.DictReader(io.StringIO(format_table4({"MTL": mtl, "single": single}, ranks, fmt="csv"))))
    assert len(table) == 2 and len(table[0]) == 1 + 3 * 3 * 2
    assert float(table[0]["species_precision_mean"]) == pytest.approx(0.955)
    assert float(table[0]["species_precision_sd"]) == pytest.approx(np.std([0.945, 0.965], ddof=1))
    assert table[1]["order_f1_mean"] == "" and float(table[1]["species_f1_mean"]) == 0.959
    with pytest.raises(ValueError, match="fmt must be"):
        format_table4({}, ranks, fmt="latex")
