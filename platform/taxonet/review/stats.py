"""Review statistics: how often experts agree with the model, per rank, and how fast reviewers work.

Pure Python (no storage, no web): the review app and the tests call :func:`agreement` and :func:`throughput` on
queue items and decisions. Definitions (docs/review.md, section Statistics):

* a crop counts when its reviewers' current labels agree (disputed crops and rejects are counted apart);
* the human label at a rank is the chain of the named taxon down to the rank named; a "new species in P" names P's
  chain and, at the rank below P, a species no model class can match;
* per rank: n crops with a human label there, the share whose model label matches (Wilson 95 % interval) and
  Cohen's kappa between the two raters (human, model) over the labels seen at that rank;
* ``exact``: agreement at the deepest rank the human named; ``coarser``: at the rank just above it (the model right
  about the family though the expert named a species);
* per rank, the same share split by whether the model called the rank reliable: the check of its own reliability.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from taxonet.review.records import Decision, QueueItem, current_labels, is_disputed
from taxonet.taxonomy import Taxonomy

#: z of a two-sided 95 % interval
Z95 = 1.959963984540054
#: the label a new species gets at the rank below its parent: equal to no class name
NEW_SPECIES = "<new species>"
#: gaps between a reviewer's consecutive decisions longer than this count as a break, not as work
MAX_WORK_GAP_S = 300.0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (None when n is 0)."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters over (rater A, rater B) label pairs; None when chance agreement is total."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[label] * second[label] for label in first) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def human_chain(decision: Decision, taxonomy: Taxonomy) -> dict[str, str]:
    """The labels per rank that a decision names ({} for a reject or a taxon the taxonomy does not know)."""
    if decision.kind == "taxon":
        rank, name = decision.rank, decision.taxon
    elif decision.kind == "new_species":
        rank, name = decision.rank, decision.parent
    else:
        return {}
    if rank not in taxonomy.ranks or (rank, name) not in taxonomy:
        return {}
    level = taxonomy.level(rank)
    chain = dict(zip(taxonomy.ranks, taxonomy.chain_names(level, taxonomy.index(level, name))))
    if decision.kind == "new_species" and level + 1 < taxonomy.depth:
        chain[taxonomy.ranks[level + 1]] = NEW_SPECIES
    return chain


@dataclass(frozen=True)
class Share:
    """k of n agree, with its Wilson 95 % interval."""

    n: int
    agree: int
    rate: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, agree: int, n: int) -> "Share":
        interval = wilson_interval(agree, n)
        return cls(n, agree, agree / n if n else None, *(interval or (None, None)))


@dataclass(frozen=True)
class RankAgreement:
    rank: str
    share: Share
    kappa: float | None
    when_reliable: Share
    when_unreliable: Share


@dataclass(frozen=True)
class Agreement:
    """Human–model agreement over the crops with one undisputed human label."""

    crops_labelled: int
    crops_disputed: int
    crops_rejected: int
    exact: Share
    coarser: Share
    ranks: list[RankAgreement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(items: Iterable[QueueItem], decisions: Iterable[Decision], taxonomy: Taxonomy) -> Agreement:
    answers = {item.crop_id: item.answer_dict() for item in items}
    pairs: dict[str, list[tuple[str, str, bool]]] = {rank: [] for rank in taxonomy.ranks}
    exact = coarser = exact_n = coarser_n = 0
    labelled = disputed = rejected = 0
    for crop, by_reviewer in current_labels(decisions).items():
        if crop not in answers:
            continue
        if is_disputed(by_reviewer):
            disputed += 1
            continue
        decision = next(iter(by_reviewer.values()))
        if decision.kind == "reject":
            rejected += 1
            continue
        chain = human_chain(decision, taxonomy)
        if not chain:
            continue
        labelled += 1
        model = answers[crop].get("ranks", {})
        named = [rank for rank in taxonomy.ranks if rank in chain]
        for rank in named:
            entry = model.get(rank) or {}
            pairs[rank].append((chain[rank], str(entry.get("label")), bool(entry.get("reliable"))))
        deepest = named[-1]
        exact_n += 1
        exact += chain[deepest] == (model.get(deepest) or {}).get("label")
        if len(named) > 1:
            above = named[-2]
            coarser_n += 1
            coarser += chain[above] == (model.get(above) or {}).get("label")
    ranks = []
    for rank in taxonomy.ranks:
        rows = pairs[rank]
        reliable = [human == model for human, model, sure in rows if sure]
        unreliable = [human == model for human, model, sure in rows if not sure]
        ranks.append(RankAgreement(
            rank=rank, share=Share.of(sum(h == m for h, m, _ in rows), len(rows)),
            kappa=cohen_kappa([(h, m) for h, m, _ in rows]),
            when_reliable=Share.of(sum(reliable), len(reliable)),
            when_unreliable=Share.of(sum(unreliable), len(unreliable))))
    return Agreement(labelled, disputed, rejected, Share.of(exact, exact_n), Share.of(coarser, coarser_n), ranks)


@dataclass(frozen=True)
class ReviewerThroughput:
    reviewer: str
    decisions: int
    retracts: int
    crops: int
    first: str
    last: str
    #: seconds between consecutive decisions, each gap capped at MAX_WORK_GAP_S (longer gaps are breaks)
    active_s: float
    per_hour: float | None


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def throughput(decisions: Iterable[Decision], max_gap_s: float = MAX_WORK_GAP_S) -> list[ReviewerThroughput]:
    """Per reviewer: decisions made (retracts apart), distinct crops, working time and decisions per working hour."""
    by_reviewer: dict[str, list[Decision]] = {}
    for decision in sorted(decisions, key=lambda d: (d.decided_at, d.decision_id)):
        by_reviewer.setdefault(decision.reviewer, []).append(decision)
    rows = []
    for reviewer, own in sorted(by_reviewer.items()):
        times = [_time(d.decided_at) for d in own]
        active = sum(min((b - a).total_seconds(), max_gap_s) for a, b in zip(times, times[1:]))
        made = sum(d.kind != "retract" for d in own)
        rows.append(ReviewerThroughput(
            reviewer=reviewer, decisions=made, retracts=len(own) - made, crops=len({d.crop_id for d in own}),
            first=own[0].decided_at, last=own[-1].decided_at, active_s=active,
            per_hour=made / (active / 3600) if active > 0 else None))
    return rows


def summary(items: Iterable[QueueItem], decisions: Sequence[Decision], taxonomy: Taxonomy) -> Mapping:
    """The statistics view as JSON: agreement and throughput."""
    return {"agreement": agreement(items, decisions, taxonomy).to_dict(),
            "throughput": [asdict(row) for row in throughput(decisions)]}
