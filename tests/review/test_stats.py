"""Review statistics against a hand-worked example (docs/review.md, section Statistics)."""

from __future__ import annotations

import pytest

from taxonet.review import stats
from taxonet.review.records import Decision
from tests.review.review_support import TAXONOMY, item

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def example() -> tuple[list, list[Decision]]:
    """Four crops with one label each, one disputed, one rejected (worked by hand below)."""
    items = [item("c1", "Apis mellifera", "family"), item("c2", "Bombus terrestris", "order"),
             item("c3", "Eristalis tenax", None), item("c4", "Vespula vulgaris", "species"),
             item("c5", "Apis mellifera", "order"), item("c6", "Apis mellifera", "order")]
    at = "2026-12-01T10:00:0{}+00:00".format
    decisions = [
        Decision("c1", "ana", "taxon", rank="species", taxon="Apis mellifera", decided_at=at(1)),
        Decision("c2", "ana", "taxon", rank="species", taxon="Bombus lapidarius", decided_at=at(2)),
        Decision("c3", "ana", "new_species", rank="family", parent="Apidae", decided_at=at(3)),
        Decision("c4", "ben", "taxon", rank="family", taxon="Vespidae", decided_at=at(4)),
        Decision("c5", "ana", "taxon", rank="species", taxon="Apis mellifera", decided_at=at(5)),
        Decision("c5", "ben", "reject", decided_at=at(6)),
        Decision("c6", "ben", "reject", decided_at=at(7)),
    ]
    return items, decisions


def test_agreement_per_rank_matches_the_hand_worked_example() -> None:
    items, decisions = example()
    result = stats.agreement(items, decisions, TAXONOMY)
    assert (result.crops_labelled, result.crops_disputed, result.crops_rejected) == (4, 1, 1)
    by_rank = {r.rank: r for r in result.ranks}
    # order: human Hymenoptera ×4; model H, H, Diptera, H → 3/4; kappa: po = .75, pe = 1 × .75 → 0
    assert (by_rank["order"].share.n, by_rank["order"].share.agree) == (4, 3)
    assert by_rank["order"].kappa == pytest.approx(0.0)
    # family: (Apidae, Apidae), (Apidae, Apidae), (Apidae, Syrphidae), (Vespidae, Vespidae) → 3/4;
    # pe = (3·2 + 1·1) / 16 = 7/16, kappa = (12/16 − 7/16) / (9/16) = 5/9
    assert (by_rank["family"].share.n, by_rank["family"].share.agree) == (4, 3)
    assert by_rank["family"].kappa == pytest.approx(5 / 9)
    # species: (Am, Am), (Bl, Bt), (new, Et) → 1/3; pe = 1/3 · 1/3 (only Am on both sides) = 1/9,
    # kappa = (1/3 − 1/9) / (8/9) = 1/4
    assert (by_rank["species"].share.n, by_rank["species"].share.agree) == (3, 1)
    assert by_rank["species"].kappa == pytest.approx(0.25)
    # Wilson 95 % of 3/4: (0.3006, 0.9544)
    assert by_rank["family"].share.low == pytest.approx(0.3006, abs=1e-4)
    assert by_rank["family"].share.high == pytest.approx(0.9544, abs=1e-4)
    # exact at the expert's deepest rank: c1 yes, c2 no, c3 no (a new species), c4 yes; one rank coarser: c1, c2, c4
    assert (result.exact.agree, result.exact.n) == (2, 4)
    assert (result.coarser.agree, result.coarser.n) == (3, 4)
    # the model's own reliability: at family, reliable for c1 and c4 (both right), unsure for c2 (right), c3 (wrong)
    assert (by_rank["family"].when_reliable.agree, by_rank["family"].when_reliable.n) == (2, 2)
    assert (by_rank["family"].when_unreliable.agree, by_rank["family"].when_unreliable.n) == (1, 2)
    assert (by_rank["order"].when_unreliable.agree, by_rank["order"].when_unreliable.n) == (0, 1)


def test_wilson_interval_and_kappa_edges() -> None:
    assert stats.wilson_interval(0, 0) is None
    low, high = stats.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = stats.wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)
    assert stats.cohen_kappa([]) is None
    assert stats.cohen_kappa([("a", "a"), ("a", "a")]) is None  # chance agreement is total: undefined
    assert stats.cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)
    assert stats.cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)


def test_throughput_counts_work_and_caps_breaks() -> None:
    at = "2026-12-01T{}+00:00".format
    decisions = [Decision("c1", "ana", "taxon", rank="family", taxon="Apidae", decided_at=at("10:00:00")),
                 Decision("c2", "ana", "reject", decided_at=at("10:00:30")),
                 Decision("c3", "ana", "reject", decided_at=at("10:01:30")),
                 Decision("c4", "ana", "reject", decided_at=at("10:30:00")),  # a 28.5-min break counts 5 min
                 Decision("c4", "ana", "retract", decided_at=at("10:30:10")),
                 Decision("c1", "ben", "reject", decided_at=at("11:00:00"))]
    ana, ben = stats.throughput(decisions)
    assert (ana.reviewer, ana.decisions, ana.retracts, ana.crops) == ("ana", 4, 1, 4)
    assert ana.active_s == pytest.approx(30 + 60 + 300 + 10)
    assert ana.per_hour == pytest.approx(4 / (400 / 3600))
    assert (ben.decisions, ben.active_s, ben.per_hour) == (1, 0, None)
