"""The broken-chain rule of the lowest reliable rank (issue 15): the authors' strict rule by default, taxonet's
lenient rule by name, hand-worked cases on the demo tree, and the rule travelling with the thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from taxonet.anomaly import AnomalyThresholds, ClassThreshold, assess, chain_consistent, lowest_reliable_level
from taxonet.config import AnomalyConfig, ConfigError, load_config
from taxonet.errors import CheckpointError
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def demo() -> Taxonomy:
    return Taxonomy.demo()


def _winners(pred: list[int], score: list[float], num_classes: int) -> np.ndarray:
    out = np.full((len(pred), num_classes), -100.0)
    out[np.arange(len(pred)), pred] = score
    return out


def _thresholds(demo: Taxonomy, chain_rule: str = "strict") -> AnomalyThresholds:
    """τ = 3.0 for every class of every rank (μ 5, σ 1, k 2)."""
    rows = [ClassThreshold(rank, i, demo.name(rank, i), 5.0, 1.0, 3.0, 10)
            for rank in demo.ranks for i in range(demo.num_classes(rank))]
    return AnomalyThresholds(rows, k=2.0, chain_rule=chain_rule)


def test_default_rule_is_strict_everywhere(demo: Taxonomy) -> None:
    assert AnomalyConfig().chain_rule == "strict" and AnomalyConfig().round_tau is False
    assert load_config("demo").anomaly.chain_rule == "strict"
    assert AnomalyThresholds([], k=2.0).chain_rule == "strict"
    assert load_config("demo", {"anomaly.chain_rule": "lenient"}).anomaly.chain_rule == "lenient"
    with pytest.raises(ConfigError, match="anomaly.chain_rule must be one of strict, lenient"):
        load_config("demo", {"anomaly.chain_rule": "loose"})
    with pytest.raises(ValueError, match="chain_rule must be one of"):
        lowest_reliable_level(demo, np.zeros((1, 3), np.int64), np.ones((1, 3), bool), "loose")


def test_diptera_apidae_apis_all_sure(demo: Taxonomy) -> None:
    """Hand-worked: order Diptera, family Apidae (a Hymenoptera family), species Apis mellifera, every rank sure.

    Strict (the authors): the chain is not a path of the taxonomy → unsure. Lenient: order Diptera stays
    reliable (its own verdict is sure and nothing above it is broken), although family and species contradict it.
    """
    diptera, apidae = demo.index("order", "Diptera"), demo.index("family", "Apidae")
    apis = demo.index("species", "Apis mellifera")
    predictions, sure = np.array([[diptera, apidae, apis]]), np.ones((1, 3), bool)
    assert chain_consistent(demo, predictions).tolist() == [False]
    assert lowest_reliable_level(demo, predictions, sure).tolist() == [-1]
    assert lowest_reliable_level(demo, predictions, sure, "strict").tolist() == [-1]
    assert lowest_reliable_level(demo, predictions, sure, "lenient").tolist() == [0]
    # through assess: the rule comes from the thresholds
    logits = {"order": _winners([diptera], [9.0], 4), "family": _winners([apidae], [9.0], 5),
              "species": _winners([apis], [9.0], 9)}
    assert assess(demo, _thresholds(demo), logits).reliable_labels(demo) == [(None, None)]
    assert assess(demo, _thresholds(demo, "lenient"), logits).reliable_labels(demo) == [("order", "Diptera")]


def test_species_link_broken_only(demo: Taxonomy) -> None:
    """Hymenoptera > Apidae > Vespula vulgaris (a Vespidae species), all sure: strict unsure, lenient family."""
    hymenoptera, apidae = demo.index("order", "Hymenoptera"), demo.index("family", "Apidae")
    vespula = demo.index("species", "Vespula vulgaris")
    predictions, sure = np.array([[hymenoptera, apidae, vespula]]), np.ones((1, 3), bool)
    assert lowest_reliable_level(demo, predictions, sure).tolist() == [-1]
    assert lowest_reliable_level(demo, predictions, sure, "lenient").tolist() == [1]


def test_consistent_chain_with_an_unsure_middle_rank(demo: Taxonomy) -> None:
    """Hymenoptera (sure) > Apidae (UNSURE) > Apis mellifera (sure): a path of the taxonomy, so both rules agree.

    Species needs family and species sure (no); family needs order and family sure (no); order is sure → order.
    """
    chain = demo.encode(["Hymenoptera", "Apidae", "Apis mellifera"])
    predictions, sure = np.array([chain]), np.array([[True, False, True]])
    assert chain_consistent(demo, predictions).tolist() == [True]
    for rule in ("strict", "lenient"):
        assert lowest_reliable_level(demo, predictions, sure, rule).tolist() == [0]
    logits = {"order": _winners([chain[0]], [4.0], 4), "family": _winners([chain[1]], [2.0], 5),
              "species": _winners([chain[2]], [4.0], 9)}
    result = assess(demo, _thresholds(demo), logits)
    assert result.sure.tolist() == [[True, False, True]]
    assert result.reliable_labels(demo) == [("order", "Hymenoptera")]


def test_consistent_chains_are_the_same_under_both_rules(demo: Taxonomy) -> None:
    """Every consistent chain x every sure pattern: the rules differ only on broken chains."""
    rng = np.random.default_rng(0)
    chains = np.array([demo.encode(row) for row in demo.rows()])
    predictions = chains[rng.integers(0, len(chains), 400)]
    sure = rng.random((400, 3)) < 0.6
    strict = lowest_reliable_level(demo, predictions, sure, "strict")
    assert (strict == lowest_reliable_level(demo, predictions, sure, "lenient")).all()
    # random (mostly broken) chains: strict is never deeper than lenient, and is −1 exactly where broken
    random_predictions = np.stack([rng.integers(0, n, 400) for n in demo.sizes], axis=1)
    broken = ~chain_consistent(demo, random_predictions)
    assert broken.sum() > 100
    strict = lowest_reliable_level(demo, random_predictions, sure, "strict")
    lenient = lowest_reliable_level(demo, random_predictions, sure, "lenient")
    assert (strict[broken] == -1).all() and (strict[~broken] == lenient[~broken]).all()
    assert (lenient[broken] >= 0).any()


def test_round_tau_rounds_to_one_decimal(demo: Taxonomy) -> None:
    rng = np.random.default_rng(1)
    n = 300
    targets = np.array([demo.encode(row) for row in demo.rows()])[rng.integers(0, 9, n)]
    logits = {rank: np.where(np.eye(demo.num_classes(rank))[targets[:, level]] > 0,
                             rng.normal(6.0, 1.3, (n, 1)), rng.normal(0, 1, (n, demo.num_classes(rank))))
              for level, rank in enumerate(demo.ranks)}
    exact = AnomalyThresholds.fit(demo, logits, targets)
    rounded = AnomalyThresholds.fit(demo, logits, targets, round_tau=True)
    assert exact.round_tau is False and rounded.round_tau is True
    assert len(exact) == len(rounded) > 0
    assert any(abs(r.threshold - round(r.threshold, 1)) > 1e-6 for r in exact.rows)
    for a, b in zip(exact.rows, rounded.rows):
        assert (a.mean, a.std) == (b.mean, b.std)
        assert b.threshold == round(a.mean - 2.0 * a.std, 1) and abs(b.threshold - a.threshold) <= 0.05 + 1e-12


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_rule_and_rounding_travel_with_the_thresholds(demo: Taxonomy, tmp_path, suffix: str) -> None:
    for rule, rounding in (("lenient", True), ("strict", False)):
        thresholds = AnomalyThresholds(_thresholds(demo).rows, k=2.0, chain_rule=rule, round_tau=rounding)
        thresholds.save(tmp_path / f"t{suffix}")
        loaded = AnomalyThresholds.load(tmp_path / f"t{suffix}", taxonomy=demo)
        assert (loaded.chain_rule, loaded.round_tau) == (rule, rounding) and loaded == thresholds
    # a table written before the rule was stored (no chain_rule) reads as strict, the default
    old = _thresholds(demo, "lenient").to_dict()
    del old["chain_rule"], old["round_tau"]
    assert AnomalyThresholds.from_dict(old).chain_rule == "strict"
    bad = _thresholds(demo).to_dict() | {"chain_rule": "loose"}
    with pytest.raises(CheckpointError, match="chain_rule must be one of"):
        AnomalyThresholds.from_dict(bad)
