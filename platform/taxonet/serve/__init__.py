"""Serving with Ray Serve: an HTTP classification API over :class:`taxonet.predictor.Predictor`.

* :mod:`taxonet.serve.config` — the typed application arguments (pydantic, the HTTP/config boundary);
* :mod:`taxonet.serve.app` — the deployments (``TaxonetIngress``, ``TaxonetClassifier``) and ``app_builder``,
  the import path ``taxonet.serve.app:app_builder`` used by ``serve run``/``serve deploy`` and the RayService;
* :mod:`taxonet.serve.errors` — the JSON error contract ``{"error": {"code", "message"}}``;
* :mod:`taxonet.serve.metrics` — ``taxonet_*`` metrics through Ray's metrics export.

Importing this package imports nothing heavy; Ray and FastAPI are imported by the submodules that need them.
"""
