"""CLI verbs of the model registry: ``taxonet models list|show|verify|publish|promote|rollback|compare|
stage-weights``."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models VERB`` to the parser (arguments only; imports happen in the handlers)."""
    models = subparsers.add_parser(
        "models", help="model registry: list, show, publish, promote and roll back model versions",
        description="A registry is a prefix MODELS (local or s3://bucket/prefix) holding MODELS/NAME/versions/N "
                    "(immutable, verified checkpoints) and MODELS/NAME/aliases/ALIAS.json. A model reference is a "
                    "checkpoint URI or MODELS/NAME@ALIAS (MODELS/NAME@N pins version N).")
    verbs = models.add_subparsers(dest="models_command", metavar="VERB")

    listing = verbs.add_parser("list", help="models under MODELS, or the versions and aliases of one model")
    listing.add_argument("models", metavar="MODELS", help="registry root, local or s3://bucket/prefix")
    listing.add_argument("name", metavar="NAME", nargs="?", help="a model name: list its versions")
    listing.set_defaults(handler=_list)

    show = verbs.add_parser("show", help="what a reference points at: version, source, metrics, aliases, verified")
    show.add_argument("reference", metavar="REF", help="MODELS/NAME@ALIAS, MODELS/NAME@N or a checkpoint URI")
    show.add_argument("--no-verify", action="store_true", help="do not hash the files")
    show.set_defaults(handler=_show)

    verify = verbs.add_parser("verify", help="hash every file of what a reference points at; exit 2 if it fails")
    verify.add_argument("reference", metavar="REF", help="MODELS/NAME@ALIAS, MODELS/NAME@N or a checkpoint URI")
    verify.set_defaults(handler=_verify)

    publish = verbs.add_parser("publish", help="publish a checkpoint as the next version of MODELS/NAME")
    publish.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory, local or s3://")
    publish.add_argument("model", metavar="MODELS/NAME", help="registry root and model name")
    publish.add_argument("--alias", metavar="ALIAS", help="then promote the new version to ALIAS")
    publish.add_argument("--allow-taxonomy-change", action="store_true",
                         help="with --alias: accept a taxonomy that differs from the alias's current version")
    publish.set_defaults(handler=_publish)

    promote = verbs.add_parser("promote", help="point an alias at a version (after verifying it)")
    promote.add_argument("model", metavar="MODELS/NAME", help="registry root and model name")
    promote.add_argument("version", metavar="VERSION", type=int, help="version number")
    promote.add_argument("--alias", required=True, metavar="ALIAS", help="e.g. production, staging")
    promote.add_argument("--allow-taxonomy-change", action="store_true",
                         help="accept a taxonomy that differs from the alias's current version (clients see new "
                              "labels)")
    promote.set_defaults(handler=_promote)

    rollback = verbs.add_parser("rollback", help="point an alias back at its previous version")
    rollback.add_argument("model", metavar="MODELS/NAME", help="registry root and model name")
    rollback.add_argument("--alias", required=True, metavar="ALIAS")
    rollback.set_defaults(handler=_rollback)

    compare = verbs.add_parser(
        "compare", help="evaluate OLD and NEW side by side (known species + reviewed crops); promote NEW if better",
        description="Both models answer the dataset's test split (species both know) and its reviewed crops held "
                    "out from training. The gate passes when NEW's macro F1 on known species is not worse than "
                    "OLD's by more than --tolerance at any rank and NEW is reliably right at the reviewer's rank "
                    "on more reviewed crops. Exit 0 when it passes, 1 when it does not.")
    compare.add_argument("old", metavar="OLD", help="the model in service: MODELS/NAME@ALIAS, MODELS/NAME@N or a URI")
    compare.add_argument("new", metavar="NEW", help="the candidate: MODELS/NAME@N (for --promote) or a URI")
    compare.add_argument("--dataset", required=True, metavar="URI", help="dataset made by prepare --add-reviewed")
    compare.add_argument("--reviewed", metavar="LABELS",
                         help="also compare on crops reviewed in LABELS that the dataset does not hold")
    compare.add_argument("--tolerance", type=float, default=argparse.SUPPRESS, metavar="F",
                         help="macro F1 NEW may lose per rank on known species (default 0.02)")
    compare.add_argument("--promote", metavar="ALIAS", help="move ALIAS to NEW when the gate passes")
    compare.add_argument("--allow-taxonomy-change", action="store_true",
                         help="with --promote: NEW may name classes OLD did not (new species from review)")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.set_defaults(handler=_compare)

    stage = verbs.add_parser(
        "stage-weights", help="copy a backbone's ImageNet weights to storage once, for clusters without internet",
        description="Downloads torchvision's ImageNet weights for BACKBONE (run it where there is internet access) "
                    "or takes them from --from FILE, checks that they fit the backbone, and writes the state dict "
                    "to URI. Training then uses them with --set model.weights=URI.")
    stage.add_argument("backbone", metavar="BACKBONE", help="backbone name, e.g. resnet50, efficientnet_b3")
    stage.add_argument("uri", metavar="URI", help="where to write the weights file (local or s3://...); a URI "
                                                  "ending in '/' gets torchvision's file name")
    stage.add_argument("--from", dest="source", metavar="FILE",
                       help="a weights file already downloaded (torchvision's .pth), local or s3://, instead of "
                            "downloading")
    stage.set_defaults(handler=_stage_weights)
    models.set_defaults(handler=lambda args: models.print_help() or 2)


def _compare(args: argparse.Namespace) -> int:
    from taxonet.review.compare import compare_models

    given = {"tolerance": args.tolerance} if hasattr(args, "tolerance") else {}
    comparison = compare_models(args.old, args.new, args.dataset, reviewed_labels=args.reviewed,
                                promote=args.promote, allow_taxonomy_change=args.allow_taxonomy_change, **given)
    print(json.dumps(comparison.to_dict(), indent=2, default=str) if args.json else comparison.format_report())
    return 0 if comparison.passed else 1


def _list(args: argparse.Namespace) -> int:
    from taxonet import registry

    if not args.name:
        names = registry.list_models(args.models)
        for name in names:
            aliases = registry.list_aliases(args.models, name)
            pointers = ", ".join(f"{a} → {r.version}" for a, r in sorted(aliases.items())) or "no aliases"
            print(f"{name}\t{pointers}")
        if not names:
            print(f"no models under {args.models}")
        return 0
    versions = registry.list_versions(args.models, args.name)
    if not versions:
        print(f"no versions of {args.name} under {args.models}")
        return 0
    print("version\tcreated\taliases\tMB\tsource")
    for info in versions:
        print(f"{info.number}\t{info.created}\t{','.join(info.aliases) or '-'}\t{info.bytes / 1e6:.1f}\t"
              f"{info.source.get('uri', '')}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from taxonet import registry

    print(json.dumps(registry.show(args.reference, check=not args.no_verify), indent=2, default=str))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from taxonet import registry

    resolved = registry.resolve(args.reference)
    manifest = registry.verify(args.reference)
    print(f"{resolved.uri}: verified {len(manifest['files'])} files ({resolved.name} version {resolved.version})")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from taxonet import registry

    models, name = registry.split_model(args.model)
    number = registry.publish(args.checkpoint, models, name)
    print(f"published {args.checkpoint} as {registry.model_uri(models, name)}@{number}")
    if args.alias:
        try:
            record = registry.promote(models, name, number, args.alias, args.allow_taxonomy_change)
        except registry.RegistryError as exc:
            raise registry.RegistryError(f"published version {number}, but did not promote it: {exc}") from None
        print(f"{registry.model_uri(models, name)}@{record.alias} → version {record.version}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from taxonet import registry

    models, name = registry.split_model(args.model)
    before = registry.read_alias(models, name, args.alias)
    record = registry.promote(models, name, args.version, args.alias, args.allow_taxonomy_change)
    was = f" (was {before.version})" if before is not None and before.version != record.version else ""
    print(f"{registry.model_uri(models, name)}@{record.alias} → version {record.version}{was}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from taxonet import registry

    models, name = registry.split_model(args.model)
    before = registry.read_alias(models, name, args.alias)
    record = registry.rollback(models, name, args.alias)
    print(f"{registry.model_uri(models, name)}@{record.alias} → version {record.version} "
          f"(rolled back from {before.version if before else '?'})")
    return 0


def _stage_weights(args: argparse.Namespace) -> int:
    import hashlib
    import io
    import tempfile

    import torch

    from taxonet import storage
    from taxonet.errors import CheckpointError
    from taxonet.models.backbones import BACKBONES, WeightsUnavailableError, build_backbone

    spec = BACKBONES.get(args.backbone)
    if spec is None:
        raise CheckpointError(f"unknown backbone {args.backbone!r}; available: {sorted(BACKBONES)}")
    uri = storage.check_uri(args.uri)  # a bad target fails before a download of hundreds of MB
    if args.source:
        payload = storage.read_bytes(args.source)
        file_name = args.source.rstrip("/").rsplit("/", 1)[-1]
    else:
        if spec.torchvision_weights is None:
            raise CheckpointError(f"backbone {args.backbone!r} has no ImageNet weights to stage")
        import torchvision

        enum_name, member = spec.torchvision_weights.split(".")
        weights = getattr(getattr(torchvision.models, enum_name), member)
        file_name = weights.url.rsplit("/", 1)[-1]
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # URLError, HTTP errors, DNS failures: not reachable from here
            raise CheckpointError(
                f"could not download the ImageNet weights of {args.backbone} ({type(exc).__name__}: {exc}); run "
                f"this where there is internet access, or download {weights.url} elsewhere and pass --from FILE"
            ) from None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
    if uri.endswith("/"):
        uri = storage.join(uri, file_name)
    with tempfile.NamedTemporaryFile(suffix=".pth") as handle:  # prove they load before anything is written
        handle.write(payload)
        handle.flush()
        try:
            build_backbone(args.backbone, handle.name)
        except WeightsUnavailableError as exc:
            raise CheckpointError(f"refusing to stage {args.source or file_name}: {exc}") from None
    storage.write_bytes(uri, payload)
    print(json.dumps({"backbone": args.backbone, "uri": uri, "bytes": len(payload),
                      "sha256": hashlib.sha256(payload).hexdigest(), "use": f"--set model.weights={uri}"}, indent=2))
    return 0
