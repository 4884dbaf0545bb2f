"""Serving: an HTTP classification API on Ray Serve over :class:`taxonet.serve.predictor.Predictor`.

* :mod:`taxonet.serve.predictor` — images → answers (plain PyTorch, no Ray): ``Preprocessor``, ``Predictor`` and the
  answer dataclasses, which are also the API's response model;
* :mod:`taxonet.serve.http` — request bodies, multipart, bearer auth, admission and the decode pixel budget;
* :mod:`taxonet.serve.config` — the typed application arguments (pydantic, the HTTP/config boundary);
* :mod:`taxonet.serve.app` — the deployments (``TaxonetIngress``, ``TaxonetClassifier``) and ``app_builder``,
  the import path ``taxonet.serve.app:app_builder`` used by ``serve run``/``serve deploy`` and the RayService;
* :mod:`taxonet.serve.errors` — the JSON error contract ``{"error": {"code", "message"}}``;
* :mod:`taxonet.serve.metrics` — ``taxonet_*`` metrics through Ray's metrics export.

Importing this package imports nothing; the predictor works without Ray, the other submodules need it.
"""
