"""Anomaly detection per rank and the lowest reliable rank (Bjerge et al. 2023, METHOD.md "Anomaly detection").

The score of a prediction at one rank is its winning raw logit (max logit, before softmax). For every (rank, class)
a normal distribution N(μ, σ) is fitted (maximum likelihood, ``scipy.stats.norm.fit``, σ with ddof=0) to the winning
logits of the correctly classified training samples; the threshold is τ = μ − k·σ (k = 2 in the paper's code).
A rank is "unsure" when its winning logit falls below τ of the predicted class. The lowest reliable rank then says
down to which rank the prediction can be trusted (:func:`lowest_reliable_level`).

Also here [taxonet]: maximum-softmax-probability and energy scores, temperature scaling, and AUROC / FPR at 95 % TPR
for separating samples of unseen species from known ones. Every score follows "higher = more in-distribution".

NumPy + SciPy only; torch tensors are accepted wherever arrays are (converted on the way in), torch is not imported.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from taxonet.config import CHAIN_RULES, DEFAULT_CHAIN_RULE
from taxonet.errors import CheckpointError
from taxonet.taxonomy import UNSPECIFIED, Taxonomy

CSV_COLUMNS = ("rank", "class_index", "class_name", "mean", "std", "threshold", "count")
_K_LINE = re.compile(r"^#.*\bk\s*=\s*([^\s,;]+)")
_RULE_LINE = re.compile(r"^#.*\bchain_rule\s*=\s*([^\s,;]+)")
_ROUND_LINE = re.compile(r"^#.*\bround_tau\s*=\s*([^\s,;]+)")


# ---------------------------------------------------------------------------------------------------------- inputs
def _to_numpy(values: Any) -> np.ndarray:
    """Array from a NumPy array, list or torch tensor (detached, on the CPU, bf16/fp16 widened to float32)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch.Tensor, without importing torch
        tensor = values.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(values)


def _logits_2d(logits: Any, what: str = "logits") -> np.ndarray:
    array = _to_numpy(logits).astype(np.float64, copy=False)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{what} must be a 2-D array [N, classes], got shape {array.shape}")
    return array


def _scores_1d(values: Any, what: str) -> np.ndarray:
    array = _to_numpy(values).astype(np.float64, copy=False).ravel()
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if np.isnan(array).any():
        raise ValueError(f"{what} contains NaN")
    return array


# ---------------------------------------------------------------------------------------------------------- scores
def winning_scores(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class (argmax) and its raw logit, the paper's anomaly score: (int64 [N], float64 [N])."""
    array = _logits_2d(logits)
    pred = array.argmax(axis=1)
    return pred.astype(np.int64), array[np.arange(len(array)), pred]


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return temperature


def max_softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Maximum softmax probability of ``logits / temperature`` (Hendrycks & Gimpel 2017): float [N] in (0, 1]."""
    scaled = _logits_2d(logits) / _check_temperature(temperature)
    # max_c softmax = exp(max − logsumexp), computed stably
    return np.exp(scaled.max(axis=1) - special.logsumexp(scaled, axis=1))


def energy(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """NEGATIVE free energy T · logsumexp(z / T) (Liu et al. 2020): float [N], higher = more in-distribution.

    The energy itself is E(x) = −T · logsumexp(z / T) (low for in-distribution samples); the sign is flipped so that
    every score in this module reads the same way and can go straight into :func:`auroc`.
    """
    temperature = _check_temperature(temperature)
    return temperature * special.logsumexp(_logits_2d(logits) / temperature, axis=1)


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising the mean negative log-likelihood of ``softmax(logits / T)`` on labelled samples.

    Samples labelled ``UNSPECIFIED`` are ignored. The NLL is convex in the inverse temperature 1/T, so a bounded
    scalar search over 1/T finds the global minimum inside ``bounds``.
    """
    array = _logits_2d(logits)
    labels = _to_numpy(labels).astype(np.int64).ravel()
    if len(labels) != len(array):
        raise ValueError(f"{len(array)} logit rows but {len(labels)} labels")
    keep = labels != UNSPECIFIED
    array, labels = array[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError("no labelled sample to fit a temperature on")
    if labels.min() < 0 or labels.max() >= array.shape[1]:
        raise ValueError(f"labels must be in 0..{array.shape[1] - 1} (or {UNSPECIFIED}), "
                         f"got {labels.min()}..{labels.max()}")
    low, high = (float(b) for b in bounds)
    if not 0 < low < high:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    true_logit = array[np.arange(len(array)), labels]

    def nll(inverse_temperature: float) -> float:
        return float(np.mean(special.logsumexp(array * inverse_temperature, axis=1) - true_logit * inverse_temperature))

    result = optimize.minimize_scalar(nll, bounds=(1.0 / high, 1.0 / low), method="bounded",
                                      options={"xatol": 1e-7})
    return float(1.0 / result.x)


# ---------------------------------------------------------------------------------------------------------- separation
def auroc(known_scores: Any, unseen_scores: Any) -> float:
    """P(score of a known sample > score of an unseen one), ties counted half (Mann–Whitney U / (n_known·n_unseen))."""
    known = _scores_1d(known_scores, "known_scores")
    unseen = _scores_1d(unseen_scores, "unseen_scores")
    ranks = stats.rankdata(np.concatenate([known, unseen]))  # average ranks give ties exactly half
    u_known = ranks[: len(known)].sum() - len(known) * (len(known) + 1) / 2.0
    return float(u_known / (len(known) * len(unseen)))


def fpr_at_tpr(known_scores: Any, unseen_scores: Any, tpr: float = 0.95) -> float:
    """Share of unseen samples accepted at the highest threshold that still accepts ≥ ``tpr`` of the known ones.

    Known samples are the positives; a sample is accepted when its score is ≥ the threshold. The threshold is the
    ⌈tpr·n⌉-th highest known score, i.e. the lowest false-positive rate among thresholds reaching the wanted TPR.
    """
    known = _scores_1d(known_scores, "known_scores")
    unseen = _scores_1d(unseen_scores, "unseen_scores")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    needed = max(1, math.ceil(tpr * len(known) - 1e-9))  # tolerance: 0.95 * 20 is 19.000000000000004 in floats
    threshold = np.sort(known)[::-1][needed - 1]
    return float(np.mean(unseen >= threshold))


def fpr_at_95_tpr(known_scores: Any, unseen_scores: Any) -> float:
    """:func:`fpr_at_tpr` at 95 % true-positive rate (known = positives)."""
    return fpr_at_tpr(known_scores, unseen_scores, 0.95)


# ---------------------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class ClassThreshold:
    """The fitted normal N(mean, std) of one class's winning logits and its threshold mean − k·std."""

    rank: str
    class_index: int
    class_name: str
    mean: float
    std: float
    threshold: float
    count: int


class AnomalyThresholds:
    """Per (rank, class) thresholds τ = μ − k·σ on the winning logit; see :meth:`fit`.

    A class without a threshold (too few correct training samples, or σ = 0) cannot be judged: its predictions
    count as SURE in :meth:`sure` — the paper's code only flags what it has a distribution for — and their
    :meth:`confidence` is NaN, so a caller can still tell them apart.

    The table also carries the rule for broken chains (``chain_rule``, see :func:`lowest_reliable_level`) and
    whether τ was rounded to 0.1 (``round_tau``): both travel with the checkpoint, so every consumer of the
    thresholds (evaluate, the predictor, the HTTP answer) decides the lowest reliable rank the same way.
    """

    def __init__(self, rows: Iterable[ClassThreshold], k: float, chain_rule: str = DEFAULT_CHAIN_RULE,
                 round_tau: bool = False) -> None:
        if chain_rule not in CHAIN_RULES:
            raise ValueError(f"chain_rule must be one of {', '.join(CHAIN_RULES)}, got {chain_rule!r}")
        self._k = float(k)
        self._chain_rule = chain_rule
        self._round_tau = bool(round_tau)
        self._rows = tuple(rows)  # kept in the given order: fit writes ranks in taxonomy order, classes by index
        self._by_rank: dict[str, dict[int, ClassThreshold]] = {}
        for row in self._rows:
            per_rank = self._by_rank.setdefault(row.rank, {})
            if row.class_index in per_rank:
                raise ValueError(f"two thresholds for {row.rank} class {row.class_index} ({row.class_name!r})")
            if row.class_index < 0:
                raise ValueError(f"{row.rank} class {row.class_name!r}: negative class index {row.class_index}")
            per_rank[row.class_index] = row

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, taxonomy: "Taxonomy", logits: Mapping[str, Any], targets: Any, k: float = 2.0,
            min_samples: int = 2, chain_rule: str = DEFAULT_CHAIN_RULE,
            round_tau: bool = False) -> "AnomalyThresholds":
        """Fit N(μ, σ) per (rank, class) to the winning logits of correctly classified samples; τ = μ − k·σ.

        Only samples with a specified target that the model got right at that rank count (pred == target != −1).
        A class with fewer than ``min_samples`` such samples, or with σ = 0 (up to rounding), gets no threshold.
        ``logits`` may hold only some ranks (single-task model); thresholds are fitted for those present.
        ``round_tau``: τ rounded to one decimal, as the authors' code does; ``chain_rule`` is stored with the table.
        """
        k = float(k)
        if not (math.isfinite(k) and k >= 0):
            raise ValueError(f"k must be a finite number >= 0, got {k}")
        if int(min_samples) != min_samples or min_samples < 1:
            raise ValueError(f"min_samples must be a positive integer, got {min_samples}")
        arrays = _check_rank_logits(taxonomy, logits)
        n = len(next(iter(arrays.values())))
        targets = _check_targets(taxonomy, targets, n)
        rows = []
        for rank, array in arrays.items():
            level = taxonomy.level(rank)
            pred, score = winning_scores(array)
            target = targets[:, level]
            correct = (target != UNSPECIFIED) & (pred == target) & np.isfinite(score)
            for class_index in range(taxonomy.num_classes(level)):
                sample = score[correct & (pred == class_index)]
                if len(sample) < max(int(min_samples), 1):
                    continue
                mean, std = (float(v) for v in stats.norm.fit(sample))
                # identical logits can fit a σ of 1e-16 instead of 0 through rounding: treat as zero
                if not math.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
                    continue
                tau = round(mean - k * std, 1) if round_tau else mean - k * std
                rows.append(ClassThreshold(rank, class_index, taxonomy.name(level, class_index), mean, std,
                                           tau, int(len(sample))))
        return cls(rows, k, chain_rule=chain_rule, round_tau=round_tau)

    # ------------------------------------------------------------------ access
    @property
    def k(self) -> float:
        return self._k

    @property
    def chain_rule(self) -> str:
        """"strict" or "lenient": how :func:`assess` treats a predicted chain that breaks the taxonomy."""
        return self._chain_rule

    @property
    def round_tau(self) -> bool:
        return self._round_tau

    def with_chain_rule(self, chain_rule: str) -> "AnomalyThresholds":
        """The same thresholds under another chain rule (to compare the rules on one checkpoint)."""
        return AnomalyThresholds(self._rows, self._k, chain_rule=chain_rule, round_tau=self._round_tau)

    @property
    def rows(self) -> list[ClassThreshold]:
        return list(self._rows)

    @property
    def ranks(self) -> list[str]:
        """Ranks holding at least one threshold."""
        return list(self._by_rank)

    def get(self, rank: str, class_index: int) -> ClassThreshold | None:
        return self._by_rank.get(rank, {}).get(int(class_index))

    def __len__(self) -> int:
        return len(self._rows)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnomalyThresholds):
            return NotImplemented
        return (self._k, self._chain_rule, self._round_tau, self._rows) == \
            (other._k, other._chain_rule, other._round_tau, other._rows)

    def __repr__(self) -> str:
        counts = {rank: len(per_rank) for rank, per_rank in self._by_rank.items()}
        return (f"AnomalyThresholds(k={self._k}, chain_rule={self._chain_rule}, round_tau={self._round_tau}, "
                f"thresholds per rank={counts})")

    def _column(self, rank: str, num_classes: int, attribute: str) -> np.ndarray:
        out = np.full(int(num_classes), np.nan)
        for class_index, row in self._by_rank.get(rank, {}).items():
            if class_index >= num_classes:
                raise ValueError(f"{rank} threshold for class {class_index} ({row.class_name!r}) but only "
                                 f"{num_classes} classes")
            out[class_index] = getattr(row, attribute)
        return out

    def threshold_array(self, rank: str, num_classes: int) -> np.ndarray:
        """τ per class index of ``rank`` (float [num_classes]); NaN where a class has no threshold."""
        return self._column(rank, num_classes, "threshold")

    def _lookup(self, rank: str, pred: Any, score: Any) -> tuple[np.ndarray, np.ndarray, int]:
        pred = _to_numpy(pred).astype(np.int64).ravel()
        score = _to_numpy(score).astype(np.float64).ravel()
        if pred.shape != score.shape:
            raise ValueError(f"pred and score differ in length: {pred.shape} vs {score.shape}")
        if len(pred) and pred.min() < 0:
            raise ValueError(f"predicted class indices must be >= 0, got {pred.min()}")
        known = self._by_rank.get(rank, {})
        num_classes = max([int(pred.max()) + 1 if len(pred) else 0, *(i + 1 for i in known)])
        return pred, score, num_classes

    def sure(self, rank: str, pred: Any, score: Any) -> np.ndarray:
        """bool [N]: score ≥ τ[pred]. A class without a threshold counts as sure; a NaN score is never sure."""
        pred, score, num_classes = self._lookup(rank, pred, score)
        tau = self.threshold_array(rank, num_classes)[pred]
        with np.errstate(invalid="ignore"):
            return (np.isnan(tau) | (score >= tau)) & ~np.isnan(score)

    def confidence(self, rank: str, pred: Any, score: Any) -> np.ndarray:
        """float [N]: Φ((score − μ[pred]) / σ[pred]), the normal CDF of the class's fit; NaN where none."""
        pred, score, num_classes = self._lookup(rank, pred, score)
        mean = self._column(rank, num_classes, "mean")[pred]
        std = self._column(rank, num_classes, "std")[pred]
        return special.ndtr((score - mean) / std)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"k": self._k, "chain_rule": self._chain_rule, "round_tau": self._round_tau,
                "rows": [asdict(row) for row in self._rows]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], taxonomy: "Taxonomy | None" = None) -> "AnomalyThresholds":
        if not isinstance(data, Mapping) or "k" not in data or "rows" not in data:
            raise CheckpointError("anomaly thresholds must be a mapping with 'k' and 'rows'")
        k = _parse_float(data["k"], "k")
        if not isinstance(data["rows"], list):
            raise CheckpointError("anomaly thresholds: 'rows' must be a list")
        rows = [_parse_row(row, number, taxonomy) for number, row in enumerate(data["rows"], start=1)]
        # tables written before the rule was stored get today's default (the authors' strict rule)
        chain_rule = data.get("chain_rule", DEFAULT_CHAIN_RULE)
        round_tau = data.get("round_tau", False)
        if not isinstance(round_tau, bool):
            raise CheckpointError(f"anomaly thresholds: 'round_tau' must be true or false, got {round_tau!r}")
        return _build_checked(rows, k, chain_rule, round_tau)

    def save(self, path: str | Path) -> None:
        """Write a CSV table (a ``# k=…`` line, then ``rank,class_index,class_name,mean,std,threshold,count``),
        or the JSON form of :meth:`to_dict` when ``path`` ends in ``.json``."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
            return
        path.write_text(self.to_csv(), encoding="utf-8")

    def to_csv(self) -> str:
        buffer = io.StringIO()
        buffer.write(f"# taxonet anomaly thresholds: tau = mean - k * std, k={self._k!r}, "
                     f"chain_rule={self._chain_rule}, round_tau={str(self._round_tau).lower()}\n")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in self._rows:
            # repr() of a float is the shortest text that reads back to the same float: exact round trip
            writer.writerow([row.rank, row.class_index, row.class_name, repr(row.mean), repr(row.std),
                             repr(row.threshold), row.count])
        return buffer.getvalue()

    @classmethod
    def from_csv(cls, text: str, taxonomy: "Taxonomy | None" = None) -> "AnomalyThresholds":
        k = None
        chain_rule, round_tau = DEFAULT_CHAIN_RULE, False
        body = []
        for line in text.splitlines():
            if line.startswith("#"):
                match = _K_LINE.match(line)
                if match:
                    k = _parse_float(match.group(1), "k")
                rule = _RULE_LINE.match(line)
                if rule:
                    chain_rule = rule.group(1)
                rounding = _ROUND_LINE.match(line)
                if rounding:
                    if rounding.group(1).lower() not in ("true", "false"):
                        raise CheckpointError(f"round_tau must be true or false, got {rounding.group(1)!r}")
                    round_tau = rounding.group(1).lower() == "true"
                continue
            if line.strip():
                body.append(line)
        reader = csv.DictReader(io.StringIO("\n".join(body)))
        header = tuple(reader.fieldnames or ())
        if header != CSV_COLUMNS:
            raise CheckpointError(f"anomaly thresholds CSV header is {list(header)}, expected {list(CSV_COLUMNS)}")
        rows = [_parse_row(record, number, taxonomy) for number, record in enumerate(reader, start=1)]
        if k is None:
            # a hand-made table without the k line: k follows from any row, τ = μ − k·σ
            if not rows:
                raise CheckpointError("anomaly thresholds CSV has no '# k=...' line and no rows to infer k from")
            k = float(np.median([(r.mean - r.threshold) / r.std for r in rows]))
        return _build_checked(rows, k, chain_rule, round_tau)

    @classmethod
    def load(cls, path: str | Path, taxonomy: "Taxonomy | None" = None) -> "AnomalyThresholds":
        """Read what :meth:`save` wrote (CSV, or JSON by suffix). With ``taxonomy``, every row must match it."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise CheckpointError(f"not valid JSON: {exc}") from exc
                return cls.from_dict(data, taxonomy)
            return cls.from_csv(text, taxonomy)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc


def _parse_float(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(number):
        raise CheckpointError(f"{what} is NaN")
    return number


def _parse_row(record: Any, number: int, taxonomy: "Taxonomy | None") -> ClassThreshold:
    where = f"thresholds row {number}"
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{where}: expected a mapping, got {record!r}")
    missing = [c for c in CSV_COLUMNS if record.get(c) in (None, "")]
    if missing:
        raise CheckpointError(f"{where}: missing {missing}")
    try:
        class_index, count = int(record["class_index"]), int(record["count"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: class_index and count must be integers, got {record!r}") from None
    row = ClassThreshold(
        rank=str(record["rank"]), class_index=class_index, class_name=str(record["class_name"]),
        mean=_parse_float(record["mean"], f"{where} mean"), std=_parse_float(record["std"], f"{where} std"),
        threshold=_parse_float(record["threshold"], f"{where} threshold"), count=count,
    )
    if not row.std > 0:
        raise CheckpointError(f"{where}: std must be > 0, got {row.std}")
    if taxonomy is not None:
        if row.rank not in taxonomy.ranks:
            raise CheckpointError(f"{where}: unknown rank {row.rank!r}; the taxonomy has {list(taxonomy.ranks)}")
        names = taxonomy.names[taxonomy.level(row.rank)]
        if not 0 <= row.class_index < len(names) or names[row.class_index] != row.class_name:
            expected = names[row.class_index] if 0 <= row.class_index < len(names) else "out of range"
            raise CheckpointError(f"{where}: {row.rank} class {row.class_index} is {row.class_name!r} in the "
                                  f"thresholds but {expected!r} in the taxonomy")
    return row


def _build_checked(rows: list[ClassThreshold], k: float, chain_rule: str, round_tau: bool) -> AnomalyThresholds:
    try:
        return AnomalyThresholds(rows, k, chain_rule=chain_rule, round_tau=round_tau)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def _check_rank_logits(taxonomy: "Taxonomy", logits: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{rank: float [N, n_rank]} in taxonomy order; every rank known, shapes right, the same N everywhere."""
    if not logits:
        raise ValueError("logits is empty: expected {rank: array} for at least one rank")
    unknown = [r for r in logits if r not in taxonomy.ranks]
    if unknown:
        raise ValueError(f"logits for unknown rank(s) {unknown}; ranks are {list(taxonomy.ranks)}")
    arrays = {rank: _logits_2d(logits[rank], f"logits[{rank!r}]") for rank in taxonomy.ranks if rank in logits}
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) > 1:
        raise ValueError(f"logits of different ranks hold different sample counts: "
                         f"{ {rank: len(a) for rank, a in arrays.items()} }")
    for rank, array in arrays.items():
        if array.shape[1] != taxonomy.num_classes(rank):
            raise ValueError(f"logits[{rank!r}] has {array.shape[1]} columns but {rank} has "
                             f"{taxonomy.num_classes(rank)} classes")
    return arrays


def _check_targets(taxonomy: "Taxonomy", targets: Any, n: int) -> np.ndarray:
    targets = _to_numpy(targets)
    if targets.ndim != 2 or targets.shape != (n, taxonomy.depth):
        raise ValueError(f"targets must be [N={n}, {taxonomy.depth}] (one column per rank), got {targets.shape}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    targets = targets.astype(np.int64)
    for level, size in enumerate(taxonomy.sizes):
        column = targets[:, level]
        bad = (column < UNSPECIFIED) | (column >= size)
        if bad.any():
            raise ValueError(f"targets for {taxonomy.ranks[level]} must be in 0..{size - 1} or {UNSPECIFIED}; "
                             f"got {sorted(set(column[bad].tolist()))[:5]}")
    return targets


# ---------------------------------------------------------------------------------------------------------- decisions
def lowest_reliable_level(taxonomy: "Taxonomy", predictions: Any, sure: Any,
                          chain_rule: str = DEFAULT_CHAIN_RULE) -> np.ndarray:
    """The deepest reliable level per sample (int [N]), −1 when no level is reliable.

    Level L is reliable when sure[L], and sure[L−1] (for L ≥ 1), and the predicted chain 0..L is consistent with
    the taxonomy: species if family and species are sure; else family if order and family are sure; else order if
    order is sure; else unsure (METHOD.md). A missing prediction (−1) is never reliable.

    A predicted chain that is not a path of the taxonomy (an adjacent predicted pair that is not a parent/child
    edge) is handled by ``chain_rule``:

    * ``"strict"`` (default, the authors' code and METHOD.md: "a prediction chain that breaks the taxonomy is
      unsure"): the whole answer is unsure (−1). Diptera > Apidae > *Apis mellifera*, all sure, is unsure.
    * ``"lenient"`` (taxonet's variant): the ranks above the first broken link keep their verdict, so the same
      chain is reliable at order Diptera although family and species contradict it.
    """
    if chain_rule not in CHAIN_RULES:
        raise ValueError(f"chain_rule must be one of {', '.join(CHAIN_RULES)}, got {chain_rule!r}")
    predictions = _to_numpy(predictions).astype(np.int64)
    sure = _to_numpy(sure).astype(bool)
    if predictions.ndim != 2 or predictions.shape[1] != taxonomy.depth:
        raise ValueError(f"predictions must be [N, {taxonomy.depth}], got {predictions.shape}")
    if sure.shape != predictions.shape:
        raise ValueError(f"sure has shape {sure.shape} but predictions {predictions.shape}")
    valid = _valid_predictions(taxonomy, predictions)
    out = np.full(len(predictions), -1, dtype=np.int64)
    chain_ok = np.ones(len(predictions), dtype=bool)
    for level in range(taxonomy.depth):
        chain_ok &= valid[:, level]
        if level:
            parent_of_pred = taxonomy.parent_table(level)[np.where(valid[:, level], predictions[:, level], 0)]
            chain_ok &= parent_of_pred == predictions[:, level - 1]
        reliable = chain_ok & sure[:, level]
        if level:
            reliable &= sure[:, level - 1]
        out[reliable] = level  # ascending levels: the deepest reliable one wins
    if chain_rule == "strict":
        out[~chain_consistent(taxonomy, predictions)] = -1
    return out


def chain_consistent(taxonomy: "Taxonomy", predictions: np.ndarray) -> np.ndarray:
    """bool [N]: every adjacent pair of predicted ranks (both predicted, not −1) is a parent/child edge."""
    consistent = np.ones(len(predictions), dtype=bool)
    for level in range(1, taxonomy.depth):
        both = (predictions[:, level] != UNSPECIFIED) & (predictions[:, level - 1] != UNSPECIFIED)
        parent = taxonomy.parent_table(level)[np.where(both, predictions[:, level], 0)]
        consistent &= ~both | (parent == predictions[:, level - 1])
    return consistent


def _valid_predictions(taxonomy: "Taxonomy", predictions: np.ndarray) -> np.ndarray:
    """bool [N, depth]: a real prediction (not −1); out-of-range indices are an error, not a silent wrap."""
    valid = predictions != UNSPECIFIED
    for level, size in enumerate(taxonomy.sizes):
        column = predictions[:, level]
        if ((column < UNSPECIFIED) | (column >= size)).any():
            raise ValueError(f"predictions for {taxonomy.ranks[level]} must be in 0..{size - 1} or {UNSPECIFIED}")
    return valid


@dataclass(frozen=True)
class Assessment:
    """Per-sample decisions for a batch: what was predicted at each rank and down to which rank to trust it.

    Attributes:
        predictions: int [N, depth], class index per rank (−1 where nothing could be predicted).
        scores: float [N, depth], winning logit per rank (NaN for ranks the model has no head for).
        sure: bool [N, depth], the rank passed its anomaly threshold.
        consistent: bool [N], every adjacent predicted (parent, child) pair is an edge of the taxonomy.
        lowest_reliable_level: int [N], deepest reliable level (−1 = unsure at every rank).
        confidence: float [N, depth], Φ((s − μ)/σ) of the predicted class (NaN where it has no threshold).
    """

    predictions: np.ndarray
    scores: np.ndarray
    sure: np.ndarray
    consistent: np.ndarray
    lowest_reliable_level: np.ndarray
    confidence: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    def reliable_labels(self, taxonomy: "Taxonomy") -> list[tuple[str | None, str | None]]:
        """(rank name, class name) of each sample's lowest reliable rank; (None, None) when unsure."""
        out: list[tuple[str | None, str | None]] = []
        for row, level in zip(self.predictions, self.lowest_reliable_level):
            if level < 0:
                out.append((None, None))
            else:
                out.append((taxonomy.ranks[level], taxonomy.name(int(level), int(row[level]))))
        return out


def assess(taxonomy: "Taxonomy", thresholds: AnomalyThresholds, logits: Mapping[str, Any]) -> Assessment:
    """Predictions, sure/unsure per rank, consistency and the lowest reliable level for a batch of logits.

    The lowest reliable level follows ``thresholds.chain_rule`` (stored with the thresholds in the checkpoint).

    Ranks missing from ``logits`` (a single-task model has only the last rank) are filled from the taxonomy: the
    ancestor, at that rank, of the prediction at the nearest deeper present rank; they are sure exactly when that
    rank is sure, and their score/confidence is NaN. A missing rank with no present rank below it stays −1 (unsure).
    """
    arrays = _check_rank_logits(taxonomy, logits)
    n = len(next(iter(arrays.values())))
    depth = taxonomy.depth
    predictions = np.full((n, depth), UNSPECIFIED, dtype=np.int64)
    scores = np.full((n, depth), np.nan)
    sure = np.zeros((n, depth), dtype=bool)
    confidence = np.full((n, depth), np.nan)
    present = [taxonomy.level(rank) for rank in arrays]
    for rank, array in arrays.items():
        level = taxonomy.level(rank)
        pred, score = winning_scores(array)
        predictions[:, level], scores[:, level] = pred, score
        sure[:, level] = thresholds.sure(rank, pred, score)
        confidence[:, level] = thresholds.confidence(rank, pred, score)
    for level in range(depth):
        if level in present:
            continue
        below = [lv for lv in present if lv > level]
        if not below:
            continue
        source = min(below)
        ancestor = predictions[:, source]
        for lv in range(source, level, -1):  # walk up the parent tables from the source rank to this one
            ancestor = taxonomy.parent_table(lv)[ancestor]
        predictions[:, level] = ancestor
        sure[:, level] = sure[:, source]
    return Assessment(
        predictions=predictions,
        scores=scores,
        sure=sure,
        consistent=chain_consistent(taxonomy, predictions),
        lowest_reliable_level=lowest_reliable_level(taxonomy, predictions, sure, thresholds.chain_rule),
        confidence=confidence,
    )


__all__ = [
    "Assessment",
    "AnomalyThresholds",
    "ClassThreshold",
    "assess",
    "auroc",
    "chain_consistent",
    "energy",
    "fit_temperature",
    "fpr_at_95_tpr",
    "fpr_at_tpr",
    "lowest_reliable_level",
    "max_softmax",
    "winning_scores",
]
