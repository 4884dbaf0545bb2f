"""Anomaly detection: scores, temperature, AUROC/FPR@95 against sklearn, thresholds against scipy.stats.norm.fit,
persistence, and the lowest-reliable-rank truth table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from sklearn.metrics import roc_auc_score, roc_curve

from taxonet.anomaly import (
    AnomalyThresholds,
    Assessment,
    ClassThreshold,
    assess,
    auroc,
    energy,
    fit_temperature,
    fpr_at_95_tpr,
    fpr_at_tpr,
    lowest_reliable_level,
    max_softmax,
    winning_scores,
)
from taxonet.errors import CheckpointError
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def demo() -> Taxonomy:
    return Taxonomy.demo()


def logits_with_winners(pred: np.ndarray, score: np.ndarray, num_classes: int) -> np.ndarray:
    """Logits whose argmax is ``pred`` with winning value ``score`` (others far below)."""
    out = np.full((len(pred), num_classes), -100.0)
    out[np.arange(len(pred)), pred] = score
    return out


# ---------------------------------------------------------------------------------------------------------- scores
def test_winning_scores_are_argmax_and_max_raw_logit() -> None:
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    pred, score = winning_scores(logits)
    assert pred.tolist() == [1, 0] and score.tolist() == [3.0, 5.0]
    pred_t, score_t = winning_scores(torch.tensor(logits, dtype=torch.bfloat16, requires_grad=True))
    assert pred_t.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"2-D array \[N, classes\]"):
        winning_scores(np.zeros(3))


def test_max_softmax_and_energy_against_the_formulas() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)) * 3
    for temperature in (1.0, 2.5):
        assert np.allclose(max_softmax(logits, temperature), special.softmax(logits / temperature, axis=1).max(axis=1))
        naive = temperature * np.log(np.exp(logits / temperature).sum(axis=1))
        assert np.allclose(energy(logits, temperature), naive)
    # huge logits stay finite (the stable forms), and confident rows score higher on both
    big = np.array([[1000.0, 0.0], [1.0, 0.9]])
    assert np.all(np.isfinite(max_softmax(big))) and np.all(np.isfinite(energy(big)))
    assert max_softmax(big)[0] > max_softmax(big)[1] and energy(big)[0] > energy(big)[1]
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        energy(logits, 0.0)


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 5)) * 3
    true_temperature = 2.0
    probabilities = special.softmax(logits / true_temperature, axis=1)
    labels = (probabilities.cumsum(axis=1) > rng.random((len(logits), 1))).argmax(axis=1)  # inverse-CDF draws
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.1)

    # and it is the minimum of the NLL on a fine grid
    def nll(t: float) -> float:
        return float(np.mean(special.logsumexp(logits / t, axis=1) - logits[np.arange(len(labels)), labels] / t))

    grid = np.linspace(1.0, 4.0, 301)
    assert fitted == pytest.approx(grid[np.argmin([nll(t) for t in grid])], abs=0.01)
    # unspecified labels are ignored
    with_unspecified = np.concatenate([labels[:100], -np.ones(50, dtype=int)])
    assert fit_temperature(logits[:150], with_unspecified) == pytest.approx(fit_temperature(logits[:100], labels[:100]))
    with pytest.raises(ValueError, match="no labelled sample"):
        fit_temperature(logits[:3], [-1, -1, -1])


# ---------------------------------------------------------------------------------------------------------- separation
@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_fpr95_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    known = rng.integers(0, 12, size=int(rng.integers(20, 80))).astype(float) + 2  # integers: many ties
    unseen = rng.integers(0, 12, size=int(rng.integers(5, 40))).astype(float)
    y = np.r_[np.ones(len(known)), np.zeros(len(unseen))]
    s = np.r_[known, unseen]
    assert auroc(known, unseen) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert fpr_at_95_tpr(known, unseen) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    assert fpr_at_tpr(known, unseen, 0.5) == pytest.approx(fpr[np.argmax(tpr >= 0.5)])


def test_auroc_edge_cases() -> None:
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 1], [1]) == 0.5  # ties count half
    assert fpr_at_95_tpr([3, 4], [1, 2]) == 0.0
    assert fpr_at_95_tpr(np.arange(20.0), [0.5, 100.0]) == 0.5  # the 19th best known score is 1.0
    with pytest.raises(ValueError, match="unseen_scores is empty"):
        auroc([1.0], [])
    with pytest.raises(ValueError, match="known_scores contains NaN"):
        fpr_at_95_tpr([np.nan], [1.0])


# ---------------------------------------------------------------------------------------------------------- thresholds
@pytest.fixture(scope="module")
def fitted(demo: Taxonomy) -> tuple[AnomalyThresholds, dict, np.ndarray]:
    """Family logits with known winners: class 0 right 30×, class 1 right 4× (3 below min_samples=5 is tested
    separately), class 2 σ = 0, class 3 one sample, class 4 only wrong predictions."""
    rng = np.random.default_rng(7)
    pred, score, target = [], [], []

    def add(p: int, t: int, s: np.ndarray) -> None:
        pred.extend([p] * len(s)), score.extend(s.tolist()), target.extend([t] * len(s))

    add(0, 0, rng.normal(6.0, 1.5, 30))
    add(0, 1, rng.normal(50.0, 1.0, 5))  # wrong: must not move class 0's fit
    add(0, -1, rng.normal(50.0, 1.0, 5))  # unspecified: must not count either
    add(1, 1, np.array([1.0, 2.0, 3.0, 4.0]))
    add(2, 2, np.array([2.5, 2.5, 2.5]))
    add(3, 3, np.array([9.0]))
    add(4, 0, rng.normal(3.0, 1.0, 4))
    pred, score, target = np.array(pred), np.array(score), np.array(target)
    logits = {"family": logits_with_winners(pred, score, demo.num_classes("family"))}
    targets = np.stack([np.where(target >= 0, demo.parent_table("family")[np.maximum(target, 0)], -1),
                        target, np.full_like(target, -1)], axis=1)
    return AnomalyThresholds.fit(demo, logits, targets, k=2.0, min_samples=2), logits, targets


def test_thresholds_match_scipy_norm_fit_on_correct_samples(fitted, demo: Taxonomy) -> None:
    thresholds, logits, targets = fitted
    pred, score = winning_scores(logits["family"])
    assert [r.class_index for r in thresholds.rows] == [0, 1]  # σ = 0, single-sample and never-correct classes: none
    for row in thresholds.rows:
        sample = score[(pred == row.class_index) & (targets[:, 1] == row.class_index)]
        mean, std = stats.norm.fit(sample)
        assert (row.rank, row.class_name, row.count) == ("family", demo.name("family", row.class_index), len(sample))
        assert row.mean == pytest.approx(mean) and row.std == pytest.approx(std)
        assert row.threshold == pytest.approx(mean - 2.0 * std)
    # σ is the maximum-likelihood one (ddof = 0): scores 1, 2, 3, 4 → μ = 2.5, σ = √1.25
    class_one = thresholds.get("family", 1)
    assert (class_one.mean, class_one.std) == (pytest.approx(2.5), pytest.approx(math.sqrt(1.25)))
    assert thresholds.get("family", 0).count == 30  # the wrong and unspecified samples were left out
    assert thresholds.ranks == ["family"] and thresholds.k == 2.0


def test_min_samples_and_k_change_the_fit(fitted, demo: Taxonomy) -> None:
    _, logits, targets = fitted
    strict = AnomalyThresholds.fit(demo, logits, targets, k=2.5, min_samples=5)
    assert [r.class_index for r in strict.rows] == [0]
    row = strict.rows[0]
    assert row.threshold == pytest.approx(row.mean - 2.5 * row.std)
    with pytest.raises(ValueError, match="k must be a finite number >= 0"):
        AnomalyThresholds.fit(demo, logits, targets, k=-1)
    with pytest.raises(ValueError, match=r"targets must be \[N=\d+, 3\]"):
        AnomalyThresholds.fit(demo, logits, targets[:, :2])
    with pytest.raises(ValueError, match=r"targets for species must be in 0..8 or -1"):
        AnomalyThresholds.fit(demo, logits, np.c_[targets[:, :2], np.full(len(targets), 9)])
    with pytest.raises(ValueError, match=r"logits\['family'\] has 3 columns but family has 5 classes"):
        AnomalyThresholds.fit(demo, {"family": logits["family"][:, :3]}, targets)
    with pytest.raises(ValueError, match=r"unknown rank\(s\) \['genus'\]"):
        AnomalyThresholds.fit(demo, {"genus": logits["family"]}, targets)


def test_sure_threshold_array_and_confidence(fitted) -> None:
    thresholds, _, _ = fitted
    row = thresholds.get("family", 0)
    tau = thresholds.threshold_array("family", 5)
    assert tau[0] == row.threshold and np.isnan(tau[2:]).all()
    pred = np.array([0, 0, 0, 2, 4, 0])
    score = np.array([row.threshold - 1e-6, row.threshold, row.mean, -1e9, -1e9, np.nan])
    assert thresholds.sure("family", pred, score).tolist() == [False, True, True, True, True, False]
    assert thresholds.sure("order", pred, score).tolist() == [True] * 5 + [False]  # no thresholds for that rank
    confidence = thresholds.confidence("family", pred, score)
    assert confidence[2] == pytest.approx(0.5)
    assert confidence[1] == pytest.approx(stats.norm.cdf(-2.0))
    assert np.isnan(confidence[3]) and np.isnan(confidence[4])


def test_csv_and_json_round_trip(fitted, demo: Taxonomy, tmp_path) -> None:
    thresholds, _, _ = fitted
    thresholds.save(tmp_path / "thresholds.csv")
    lines = (tmp_path / "thresholds.csv").read_text().splitlines()
    assert lines[0].startswith("#") and "k=2.0" in lines[0]
    assert lines[1] == "rank,class_index,class_name,mean,std,threshold,count"
    assert len(lines) == 2 + len(thresholds.rows)
    loaded = AnomalyThresholds.load(tmp_path / "thresholds.csv", taxonomy=demo)
    assert loaded == thresholds and loaded.rows == thresholds.rows and loaded.k == 2.0
    thresholds.save(tmp_path / "thresholds.json")
    assert AnomalyThresholds.load(tmp_path / "thresholds.json") == thresholds
    assert AnomalyThresholds.from_dict(thresholds.to_dict()) == thresholds
    # a table without the k line: k is recovered from the rows
    (tmp_path / "no_k.csv").write_text("\n".join(lines[1:]) + "\n")
    assert AnomalyThresholds.load(tmp_path / "no_k.csv").k == pytest.approx(2.0)


def test_load_rejects_tables_that_do_not_fit(fitted, demo: Taxonomy, tmp_path) -> None:
    thresholds, _, _ = fitted
    text = thresholds.to_csv()
    path = tmp_path / "t.csv"
    path.write_text(text.replace("Apidae", "Culicidae"))
    with pytest.raises(CheckpointError, match=r"row 1: family class 0 is 'Culicidae' in the thresholds but 'Apidae'"):
        AnomalyThresholds.load(path, taxonomy=demo)
    path.write_text(text.replace("family,", "genus,"))
    with pytest.raises(CheckpointError, match=r"unknown rank 'genus'"):
        AnomalyThresholds.load(path, taxonomy=demo)
    path.write_text(text.replace("class_name", "name"))
    with pytest.raises(CheckpointError, match=r"t.csv: anomaly thresholds CSV header is"):
        AnomalyThresholds.load(path)
    row = thresholds.rows[0]
    path.write_text(text.replace(repr(row.mean), "abc"))
    with pytest.raises(CheckpointError, match=r"row 1 mean must be a number, got 'abc'"):
        AnomalyThresholds.load(path)
    duplicated = text + text.splitlines()[2] + "\n"
    path.write_text(duplicated)
    with pytest.raises(CheckpointError, match=r"two thresholds for family class 0"):
        AnomalyThresholds.load(path)


# ---------------------------------------------------------------------------------------------------------- decisions
def method_md_rule(order: bool, family: bool, species: bool) -> int:
    """METHOD.md, written as stated: species if family and species are sure; else family if order and family are
    sure; else order if order is sure; else unsure."""
    if family and species:
        return 2
    if order and family:
        return 1
    if order:
        return 0
    return -1


def test_lowest_reliable_level_truth_table(demo: Taxonomy) -> None:
    chain = demo.encode(["Hymenoptera", "Apidae", "Bombus terrestris"])
    combos = list(itertools.product([False, True], repeat=3))
    assert len(combos) == 8
    predictions = np.array([chain] * 8)
    sure = np.array(combos)
    got = lowest_reliable_level(demo, predictions, sure)
    assert got.tolist() == [method_md_rule(*c) for c in combos]
    # spelled out, so the rule above cannot drift unnoticed: (order, family, species) → level
    table = dict(zip(combos, got.tolist()))
    assert table == {
        (False, False, False): -1, (False, False, True): -1, (False, True, False): -1, (False, True, True): 2,
        (True, False, False): 0, (True, False, True): 0, (True, True, False): 1, (True, True, True): 2,
    }


def test_lenient_rule_keeps_the_ranks_above_the_break(demo: Taxonomy) -> None:
    hymenoptera, apidae, apis = demo.encode(["Hymenoptera", "Apidae", "Apis mellifera"])
    diptera, vespula = demo.index("order", "Diptera"), demo.index("species", "Vespula vulgaris")
    predictions = np.array([
        [hymenoptera, apidae, vespula],  # species not under the family → family
        [diptera, apidae, apis],  # family not under the order → order
        [diptera, apidae, vespula],  # both links broken → order
        [diptera, apidae, apis],  # family link broken and order unsure → unsure
        [hymenoptera, apidae, vespula],  # species link broken, order unsure → unsure (family needs order sure)
        [-1, -1, -1],  # nothing predicted
    ])
    sure = np.array([[True] * 3, [True] * 3, [True] * 3, [False, True, True], [False, True, True], [True] * 3])
    assert lowest_reliable_level(demo, predictions, sure, "lenient").tolist() == [1, 0, 0, -1, -1, -1]
    # the authors' rule (the default): every broken chain is unsure
    assert lowest_reliable_level(demo, predictions, sure).tolist() == [-1] * 6
    with pytest.raises(ValueError, match=r"predictions for species must be in 0..8"):
        lowest_reliable_level(demo, np.array([[0, 0, 9]]), np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="sure has shape"):
        lowest_reliable_level(demo, predictions, sure[:, :2])


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_lowest_reliable_level_generalises_to_any_depth(depth: int) -> None:
    ranks = [f"r{i}" for i in range(depth)]
    taxonomy = Taxonomy.from_rows([[f"{r}_a" for r in ranks], [f"{r}_b" for r in ranks]], ranks)
    chain = [0] * depth
    for combo in itertools.product([False, True], repeat=depth):
        expected = -1
        for level in range(depth):
            if combo[level] and (level == 0 or combo[level - 1]):
                expected = level
        assert lowest_reliable_level(taxonomy, np.array([chain]), np.array([combo])).tolist() == [expected]


def test_assess_multitask_logits(demo: Taxonomy) -> None:
    hymenoptera, apidae, apis = demo.encode(["Hymenoptera", "Apidae", "Apis mellifera"])
    rows = [ClassThreshold(rank, index, demo.name(rank, index), 5.0, 1.0, 3.0, 10)
            for rank, index in (("order", hymenoptera), ("family", apidae), ("species", apis))]
    thresholds = AnomalyThresholds(rows, k=2.0)
    vespula = demo.index("species", "Vespula vulgaris")
    order = logits_with_winners(np.array([hymenoptera] * 3), np.array([5.0, 5.0, 5.0]), 4)
    family = logits_with_winners(np.array([apidae] * 3), np.array([5.0, 5.0, 2.0]), 5)
    species = logits_with_winners(np.array([apis, apis, vespula]), np.array([5.0, 2.0, 0.0]), 9)
    result = assess(demo, thresholds, {"order": order, "family": family, "species": species})
    assert isinstance(result, Assessment) and len(result) == 3
    assert result.predictions.tolist() == [[hymenoptera, apidae, apis], [hymenoptera, apidae, apis],
                                           [hymenoptera, apidae, vespula]]
    assert result.scores.tolist() == [[5.0, 5.0, 5.0], [5.0, 5.0, 2.0], [5.0, 2.0, 0.0]]
    # sample 3: Vespula has no threshold (counts as sure) but its family is unsure and the chain is broken
    assert result.sure.tolist() == [[True, True, True], [True, True, False], [True, False, True]]
    assert result.consistent.tolist() == [True, True, False]
    assert thresholds.chain_rule == "strict"
    assert result.lowest_reliable_level.tolist() == [2, 1, -1]
    assert result.reliable_labels(demo) == [("species", "Apis mellifera"), ("family", "Apidae"), (None, None)]
    lenient = assess(demo, thresholds.with_chain_rule("lenient"), {"order": order, "family": family,
                                                                   "species": species})
    assert lenient.lowest_reliable_level.tolist() == [2, 1, 0]
    assert lenient.reliable_labels(demo)[2] == ("order", "Hymenoptera")
    assert result.confidence[0, 0] == pytest.approx(0.5) and np.isnan(result.confidence[2, 2])


def test_assess_single_task_fills_ancestors_from_the_species(demo: Taxonomy) -> None:
    apis, vespula = demo.index("species", "Apis mellifera"), demo.index("species", "Vespula vulgaris")
    thresholds = AnomalyThresholds([ClassThreshold("species", apis, "Apis mellifera", 5.0, 1.0, 3.0, 10)], k=2.0)
    species = logits_with_winners(np.array([apis, apis, vespula]), np.array([4.0, 1.0, -3.0]), 9)
    result = assess(demo, thresholds, {"species": torch.tensor(species)})
    assert [demo.decode(row) for row in result.predictions] == [
        ["Hymenoptera", "Apidae", "Apis mellifera"], ["Hymenoptera", "Apidae", "Apis mellifera"],
        ["Hymenoptera", "Vespidae", "Vespula vulgaris"]]
    assert result.sure.tolist() == [[True] * 3, [False] * 3, [True] * 3]
    assert np.isnan(result.scores[:, :2]).all() and result.scores[:, 2].tolist() == [4.0, 1.0, -3.0]
    assert result.consistent.all()
    assert result.lowest_reliable_level.tolist() == [2, -1, 2]
    assert result.reliable_labels(demo)[1] == (None, None)


def test_assess_rejects_mismatched_logits(demo: Taxonomy) -> None:
    thresholds = AnomalyThresholds([], k=2.0)
    with pytest.raises(ValueError, match="different sample counts"):
        assess(demo, thresholds, {"order": np.zeros((2, 4)), "species": np.zeros((3, 9))})
    with pytest.raises(ValueError, match="logits is empty"):
        assess(demo, thresholds, {})
