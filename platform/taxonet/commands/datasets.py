"""CLI verbs of the data area: ``taxonet prepare``, ``taxonet data info`` and ``taxonet data synth``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare`` and ``data {info,synth}`` to the parser (arguments only; imports happen in the handlers)."""
    prepare = subparsers.add_parser(
        "prepare",
        help="validate, resize and shard an image folder or a labelled table into a dataset (local or s3://)",
        description="SRC is a folder tree ORDER/FAMILY/SPECIES/* (or folders named 'Order Family Genus species'; "
                    "fewer levels or words = a partial label) or a CSV/Parquet table with columns path, "
                    "<one per rank>[, split, source]. DST receives shards/part-*.parquet and dataset.json (last).",
    )
    prepare.add_argument("src", metavar="SRC", help="image folder or .csv/.parquet table, local or s3:// (with "
                         "--add-reviewed: the base dataset)")
    prepare.add_argument("dst", metavar="DST", help="output prefix, local directory or s3://bucket/prefix")
    prepare.add_argument("--taxonomy", metavar="FILE",
                         help="taxonomy YAML/JSON/CSV (local or s3://) or 'demo'; default: inferred from the labels")
    prepare.add_argument("--max-side", type=int, default=256, metavar="N",
                         help="resize so that the longer side is at most N pixels (default 256)")
    prepare.add_argument("--train-size", type=int, default=0, metavar="N",
                         help="store every crop at N x N pixels, the training input size (data.input_size), so that "
                              "training only decodes (the data path of fast GPUs at 128 px); default: keep the "
                              "aspect ratio, --max-side")
    prepare.add_argument("--shard-size", type=int, default=1000, metavar="N", help="rows per Parquet shard (1000)")
    prepare.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="validation share (0.1)")
    prepare.add_argument("--test-fraction", type=float, default=0.1, metavar="F", help="test share (0.1)")
    prepare.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the split and row order (0)")
    prepare.add_argument("--workers", type=int, default=None, metavar="N",
                         help="worker processes for decoding and resizing (default: all cores; 0 = none)")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace a dataset already at DST (it stays readable until the new one is complete)")
    prepare.add_argument("--add-reviewed", metavar="LABELS",
                         help="build the next dataset version: SRC (a prepared dataset) plus the crops reviewed in "
                              "LABELS (review decisions, local or s3://); needs --queue")
    prepare.add_argument("--queue", metavar="QUEUE", help="the review queue the reviewed crops come from")
    prepare.add_argument("--min-new-species", type=int, default=argparse.SUPPRESS, metavar="N",
                         help="crops a provisional species needs to become a class (default 10); fewer join as "
                              "partial labels under its parent and are listed")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(handler=_prepare)

    data = subparsers.add_parser("data", help="inspect prepared datasets or write a synthetic one")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB")
    info = verbs.add_parser("info", help="counts per rank/class/split; verify the shards against dataset.json")
    info.add_argument("uri", metavar="URI", help="dataset prefix (local or s3://)")
    info.add_argument("--no-verify", action="store_true", help="only print dataset.json, do not open the shards")
    info.set_defaults(handler=_info)

    synth = verbs.add_parser("synth", help="write a synthetic dataset (seeded, any taxonomy) in the standard format")
    synth.add_argument("dst", metavar="DST", help="output prefix, local directory or s3://bucket/prefix")
    synth.add_argument("--taxonomy", default="demo", metavar="FILE|demo", help="taxonomy file or 'demo' (default)")
    synth.add_argument("--per-species", type=int, default=40, metavar="N", help="images per species (40)")
    synth.add_argument("--image-size", type=int, default=48, metavar="N", help="image side in pixels (48)")
    synth.add_argument("--unseen-per-family", type=int, default=1, metavar="N",
                       help="unseen species per family written to --unseen-out (1; 0 = none)")
    synth.add_argument("--unseen-out", metavar="URI",
                       help="dataset of the unseen species, split 'unseen' (default: DST/unseen)")
    synth.add_argument("--outliers-per-family", type=int, default=0, metavar="N",
                       help="'bycatch' species per family added to DST labelled to family only, for training with "
                            "loss.outlier_weight > 0; each gets per-species/N images (0 = none)")
    synth.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="validation share (0.1)")
    synth.add_argument("--test-fraction", type=float, default=0.1, metavar="F", help="test share (0.1)")
    synth.add_argument("--shard-size", type=int, default=1000, metavar="N", help="rows per Parquet shard (1000)")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the images and the split (0)")
    synth.add_argument("--overwrite", action="store_true", help="replace datasets already at DST / --unseen-out")
    synth.set_defaults(handler=_synth)
    data.set_defaults(handler=lambda args: (data.print_help(), 2)[1])


def _prepare(args: argparse.Namespace) -> int:
    from taxonet.data.prepare import PrepareOptions, load_taxonomy, prepare_dataset

    options = PrepareOptions(max_side=args.max_side, train_size=args.train_size, shard_size=args.shard_size,
                             val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, seed=args.seed, workers=args.workers,
                             overwrite=args.overwrite, progress=not args.no_progress)
    if args.add_reviewed or args.queue:
        from taxonet.data.reviewed import ReviewedOptions, add_reviewed
        from taxonet.errors import DatasetError

        if not (args.add_reviewed and args.queue):
            raise DatasetError("--add-reviewed LABELS and --queue QUEUE go together")
        if args.taxonomy:
            raise DatasetError("--taxonomy does not apply with --add-reviewed: the base dataset's taxonomy is "
                               "extended by the reviewed provisional species")
        given = {"min_new_species_images": args.min_new_species} if hasattr(args, "min_new_species") else {}
        reviewed = add_reviewed(args.src, args.dst, queue=args.queue, labels=args.add_reviewed, options=options,
                                reviewed=ReviewedOptions(**given))
        print(reviewed.format_summary())
        return 0
    result = prepare_dataset(args.src, args.dst, taxonomy=load_taxonomy(args.taxonomy), options=options)
    print(result.format_summary())
    return 0


def _info(args: argparse.Namespace) -> int:
    from taxonet.data.dataset import DatasetInfo
    from taxonet.errors import DatasetError

    info = DatasetInfo.load(args.uri)
    report = info.report
    print(f"dataset {info.uri}")
    print(f"taxonomy: {info.taxonomy.describe()} (ranks {', '.join(info.taxonomy.ranks)})")
    print(f"created {info.metadata.get('created', '?')} from {info.metadata.get('source', '?')}; "
          f"{len(info.shards)} shards, {info.num_rows()} rows")
    skipped = report.get("skipped", {})
    print(f"prepare dropped {report.get('duplicates', {}).get('count', 0)} duplicates and skipped "
          f"{skipped.get('count', 0)} files {skipped.get('by_reason', {})}")
    print()
    print(info.format_counts())
    print()
    if args.no_verify:
        return 0
    try:
        summary = info.verify()
    except DatasetError as exc:
        print(f"verification FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"verified: {summary['shards']} shards, {summary['rows']} rows match dataset.json")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from taxonet.data.prepare import PrepareOptions, load_taxonomy, write_synthetic_dataset

    options = PrepareOptions(shard_size=args.shard_size, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, seed=args.seed, workers=1,
                             overwrite=args.overwrite, max_side=max(args.image_size, 8))
    known, unseen = write_synthetic_dataset(
        args.dst, load_taxonomy(args.taxonomy), per_species=args.per_species, image_size=args.image_size,
        seed=args.seed, unseen_per_family=args.unseen_per_family, unseen_out=args.unseen_out, options=options,
        outliers_per_family=args.outliers_per_family)
    print(known.format_summary())
    if unseen is not None:
        print()
        print(f"unseen species ({len(unseen.info.metadata.get('unseen_species', []))}) → {unseen.info.uri}")
        print(unseen.info.format_counts())
    return 0
