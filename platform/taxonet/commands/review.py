"""CLI verbs of the review loop: ``taxonet review serve QUEUE --labels URI`` (the review page for experts)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taxonet.taxonomy import Taxonomy


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``review VERB`` to the parser (arguments only; imports happen in the handlers)."""
    review = subparsers.add_parser(
        "review", help="review page: experts label the crops serving was unsure about",
        description="QUEUE is the prefix serving writes unsure crops to (QUEUE/batches/*.parquet); LABELS is where "
                    "reviewers' decisions are appended (LABELS/decisions/*.json). Both local or s3://. See "
                    "docs/review.md.")
    verbs = review.add_subparsers(dest="review_command", metavar="VERB")
    serve = verbs.add_parser("serve", help="serve the review page and its JSON API",
                             description="Token: $TAXONET_API_TOKEN or $TAXONET_API_TOKEN_FILE (comma-separated "
                                         "tokens); none set means reviewers give only their name.")
    serve.add_argument("queue", metavar="QUEUE", help="review queue prefix, local or s3://bucket/prefix")
    serve.add_argument("--labels", metavar="URI", default=None, help="where decisions go (default: QUEUE/labels)")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--taxonomy", metavar="FILE", help="taxonomy to pick from (YAML/JSON/CSV, local or s3://)")
    source.add_argument("--model", metavar="REF", help="take the taxonomy from a model: MODELS/NAME@ALIAS, "
                                                       "MODELS/NAME@N or a checkpoint URI")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8300, help="port (default: 8300)")
    serve.add_argument("--lease-s", type=float, default=None, help="how long a shown crop stays reserved for its "
                                                                  "reviewer (default: 600)")
    serve.add_argument("--refresh-s", type=float, default=None, help="how often new batches, other servers' "
                                                                    "decisions and the taxonomy (a promote may add "
                                                                    "species) are read (default: 15)")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from taxonet import storage
    from taxonet.auth import load_tokens
    from taxonet.config import ConfigError
    from taxonet.review.app import build_app
    from taxonet.review.leases import DEFAULT_TTL_S, Leases
    from taxonet.review.store import DEFAULT_REFRESH_S, ReviewStore

    taxonomy_source = TaxonomyReader(args.taxonomy, args.model)
    taxonomy = taxonomy_source()
    try:
        tokens = load_tokens()
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    labels = args.labels or storage.join(args.queue, "labels")
    store = ReviewStore(args.queue, labels, taxonomy,
                        refresh_s=DEFAULT_REFRESH_S if args.refresh_s is None else args.refresh_s,
                        taxonomy_source=taxonomy_source)
    store.refresh(force=True)
    leases = Leases(DEFAULT_TTL_S if args.lease_s is None else args.lease_s)
    print(f"review page on http://{args.host}:{args.port}/ — {len(store.items())} queued crops, "
          f"{len(store.decisions())} decisions in {labels}; token {'required' if tokens else 'not set'}", flush=True)
    uvicorn.run(build_app(store, leases, tokens), host=args.host, port=args.port, log_level="warning")
    return 0


class TaxonomyReader:
    """``load_taxonomy`` for a page that re-reads it every refresh. Per call: the file (one read), or what the model
    reference resolves to (the alias and the version's manifest); taxonomy.json is read and parsed again only when
    that changed, i.e. after a promote."""

    def __init__(self, taxonomy: str | None, model: str | None) -> None:
        self.taxonomy_file, self.model = taxonomy, model
        self._key: object = None
        self._taxonomy: Taxonomy | None = None

    def __call__(self) -> Taxonomy:
        from taxonet import checkpoint, registry, storage
        from taxonet.taxonomy import Taxonomy

        if self.taxonomy_file:
            key: object = storage.read_bytes(self.taxonomy_file)
            if key != self._key or self._taxonomy is None:
                self._taxonomy, self._key = Taxonomy.parse(key.decode("utf-8"), self.taxonomy_file), key
        elif self.model:
            resolved = registry.resolve(self.model)
            key = (resolved.uri, resolved.fingerprint)
            if key != self._key or self._taxonomy is None:
                manifest = checkpoint.read_manifest(resolved.uri, verify=False)
                self._taxonomy = Taxonomy.from_dict(checkpoint.read_listed_json(resolved.uri, "taxonomy.json",
                                                                                manifest))
                self._key = key
        else:
            from taxonet.config import ConfigError

            raise ConfigError("the review page needs the taxonomy reviewers pick from: --taxonomy FILE or "
                              "--model MODELS/NAME@ALIAS")
        return self._taxonomy


def load_taxonomy(taxonomy: str | None, model: str | None) -> Taxonomy:
    """The taxa reviewers pick from: a YAML/JSON/CSV file (local or a storage URI), or the taxonomy inside a model
    (``MODELS/NAME@ALIAS``, ``MODELS/NAME@N`` or a checkpoint URI; only its manifest and taxonomy.json are read)."""
    return TaxonomyReader(taxonomy, model)()
