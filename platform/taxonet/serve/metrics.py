"""taxonet's serving metrics, exported by Ray's metrics agent (Prometheus text at the node's metrics export port).

Names start with ``taxonet_``; on export Ray prefixes ``ray_`` and counters gain ``_total`` (docs/metrics.md lists
the exported names, checked against a live /metrics by tests/serve/test_metrics_e2e.py). Built on
``ray.serve.metrics`` — ``ray.util.metrics`` plus the replica's ``application``, ``deployment`` and ``replica``
tags — and created inside replicas (never at import time).

Label values stay bounded whatever the taxonomy's size: ``taxonet_predictions{rank,label}`` has its own series for
the first ``label_series_per_rank`` labels a replica predicts per rank (0: none) and counts the others under
``label="other"``; ``taxonet_unsure{rank}`` counts unsure answers per rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.serve.metrics import Counter, Gauge, Histogram

from taxonet.serve.predictor import ImageAnswer

#: seconds; from 1 ms (decode of a small crop) to 10 s (a cold GPU batch)
LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
#: images per batch. Ray exports a histogram's _sum estimated from bucket midpoints (measured with Ray 2.60), so the
#: bounds sit half-way between integers: sizes 1–4 are exact, larger ones land in buckets whose midpoint is close,
#: and the dashboard's mean batch size (_sum / _count) stays honest.
BATCH_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5, 96.5, 128.5, 192.5, 256.5,
                    384.5, 512.5]

REQUESTS = "taxonet_requests"
STAGE_LATENCY = "taxonet_stage_latency_seconds"
BATCH_SIZE = "taxonet_batch_size"
PREDICTIONS = "taxonet_predictions"
UNSURE = "taxonet_unsure"
MODEL_INFO = "taxonet_model_info"
MODEL_READY = "taxonet_model_ready"
MODEL_LOAD_FAILURES = "taxonet_model_load_failures"
#: label value of the predictions past the per-rank series limit
OTHER_LABEL = "other"


class IngressMetrics:
    """Requests by route and status; decode and total latency."""

    def __init__(self) -> None:
        self.requests = Counter(REQUESTS, description="HTTP requests answered, by route and status code",
                                tag_keys=("route", "status"))
        self.latency = Histogram(STAGE_LATENCY, description="Latency per stage: decode (one image, incl. "
                                 "preprocessing), inference (one batch), total (one classify request)",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("stage",))

    def request(self, route: str, status: int) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})

    def stage(self, stage: str, seconds: float) -> None:
        self.latency.observe(seconds, tags={"stage": stage})


class ClassifierMetrics:
    """Batch sizes, inference latency, predictions and unsure answers per rank, and the loaded model."""

    def __init__(self, label_series_per_rank: int = 0) -> None:
        self.label_series_per_rank = label_series_per_rank
        self._labels: dict[str, set[str]] = {}
        self.latency = Histogram(STAGE_LATENCY, description="Latency per stage: decode (one image, incl. "
                                 "preprocessing), inference (one batch), total (one classify request)",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("stage",))
        self.batch_size = Histogram(BATCH_SIZE, description="Images per model batch",
                                    boundaries=BATCH_BOUNDARIES)
        self.predictions = Counter(PREDICTIONS, description="Predicted labels (per-rank winners), by rank and label "
                                   "(labels past the per-rank series limit count as 'other')",
                                   tag_keys=("rank", "label"))
        self.unsure = Counter(UNSURE, description="Predictions below their class's anomaly threshold, by rank",
                              tag_keys=("rank",))
        self.model_info = Gauge(MODEL_INFO, description="1 for the model this replica serves (model, version), 0 "
                                "for one it served before", tag_keys=("model", "version"))
        self.model_ready = Gauge(MODEL_READY, description="1 when this classifier replica has a model loaded")
        self.load_failures = Counter(MODEL_LOAD_FAILURES, description="Model versions this replica refused or "
                                     "could not load (failed verification or load, or an unreadable reference)")
        self.model_ready.set(0)
        self._model: tuple[str, str] | None = None

    def _label(self, rank: str, label: str) -> str:
        seen = self._labels.setdefault(rank, set())
        if label in seen:
            return label
        if len(seen) < self.label_series_per_rank:
            seen.add(label)
            return label
        return OTHER_LABEL

    def batch(self, size: int, seconds: float, answers: Sequence[ImageAnswer]) -> None:
        self.batch_size.observe(size)
        self.latency.observe(seconds, tags={"stage": "inference"})
        counts: dict[tuple[str, str], int] = {}
        unsure: dict[str, int] = {}
        for answer in answers:
            for rank, entry in answer.ranks.items():
                if entry.label is not None:
                    key = (rank, self._label(rank, entry.label))
                    counts[key] = counts.get(key, 0) + 1
                if not entry.reliable:
                    unsure[rank] = unsure.get(rank, 0) + 1
        for (rank, label), count in counts.items():
            self.predictions.inc(count, tags={"rank": rank, "label": label})
        for rank, count in unsure.items():
            self.unsure.inc(count, tags={"rank": rank})

    def serving(self, name: str, version: str) -> None:
        """Mark (name, version) as the served model; the previous one drops to 0."""
        if self._model is not None and self._model != (name, version):
            self.model_info.set(0, tags={"model": self._model[0], "version": self._model[1]})
        self.model_info.set(1, tags={"model": name, "version": version})
        self.model_ready.set(1)
        self._model = (name, version)

    def load_failed(self) -> None:
        self.load_failures.inc(1)
