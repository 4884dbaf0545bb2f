"""CLI verbs for training and reports: ``train``, ``evaluate``, ``experiment``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from taxonet.config import CHAIN_RULES  # light: no torch, no ray

if TYPE_CHECKING:
    from taxonet.config import RunConfig


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo",
                        help="packaged config name (demo, resnet50_mtl, effnetb3_mtl, resnet50_species, "
                             "effnetb3_species) or a YAML path (default: demo)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.epochs=3 (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, same as --set")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a model with Ray Train (resumes a run of the same name)",
        description="Trains the config with Ray Train; a rerun of the same train.run_name resumes from its latest "
                    "checkpoint once it verifies and matches the run's taxonomy and model. The run's best epoch is "
                    "written to <train.storage>/<run_name>/best; with registry.uri=MODELS it is then published as "
                    "the next version of MODELS/<registry.name or name>, and registry.promote=ALIAS moves that alias "
                    "to it. Prints a JSON summary (run, best_checkpoint, best metrics, published version/alias).")
    _add_config_arguments(train)
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("evaluate", help="Table-4 report, confusion matrices, unseen-species table")
    evaluate.add_argument("checkpoint", help="checkpoint directory (local or s3://), e.g. runs/demo/best")
    evaluate.add_argument("dataset", help="prepared dataset URI")
    # SUPPRESS: a flag left out is not passed on, so run_evaluation's own defaults apply (stated once, there)
    evaluate.add_argument("--split", default=argparse.SUPPRESS, help="split to evaluate (default: test)")
    evaluate.add_argument("--unseen", default=None, help="dataset URI of species unseen in training")
    evaluate.add_argument("--out", default=None, help="report directory (default: <checkpoint>-report, local)")
    evaluate.add_argument("--device", default=argparse.SUPPRESS, help="auto (default), cpu, cuda, cuda:N")
    evaluate.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="images per forward pass")
    evaluate.add_argument("--chain-rule", choices=CHAIN_RULES, default=argparse.SUPPRESS,
                          help="rule for a predicted chain that breaks the taxonomy: strict (the authors': the "
                               "whole answer is unsure) or lenient (taxonet's variant: the ranks above the break "
                               "stay); default: the rule stored with the checkpoint's thresholds (anomaly.chain_rule)")
    evaluate.set_defaults(handler=_evaluate)

    experiment = subparsers.add_parser("experiment", help="N seeds of the MTL model and its single-task baseline")
    _add_config_arguments(experiment)
    experiment.add_argument("--seeds", type=int, default=5)
    experiment.add_argument("--no-baseline", action="store_true", help="skip the single-task baseline")
    experiment.add_argument("--sequential", action="store_true", help="one run at a time")
    experiment.add_argument("--out", default=None, help="where to write table4.md/csv (default: next to the runs)")
    experiment.set_defaults(handler=_experiment)


def _load(args: argparse.Namespace) -> RunConfig:
    from taxonet.config import load_config

    return load_config(args.config, list(args.sets) + list(args.overrides))


def _train(args: argparse.Namespace) -> int:
    from taxonet import raycluster
    from taxonet.train.driver import run_training

    config = _load(args)
    raycluster.init(args.address, num_cpus=args.num_cpus)
    result = run_training(config)
    summary = {"run": result.run_uri, "best_checkpoint": result.best_checkpoint,
               "resumed_from_epoch": result.resumed_from_epoch,
               "best": {k: v for k, v in result.metrics.items() if k.startswith("val_") or k == "epoch"},
               # the registry version made from best_checkpoint and the alias moved to it (null: registry.uri unset)
               "published": result.published.to_dict() if result.published else None}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from taxonet.evaluate.render import write_report
    from taxonet.evaluate.run import run_evaluation

    given = {name: getattr(args, name) for name in ("split", "device", "batch_size", "chain_rule")
             if hasattr(args, name)}
    report = run_evaluation(args.checkpoint, args.dataset, unseen_uri=args.unseen, **given)
    out = args.out or (args.checkpoint.rstrip("/").rsplit("/", 1)[-1] + "-report"
                       if args.checkpoint.startswith("s3://") else args.checkpoint.rstrip("/") + "-report")
    paths = write_report(report, out)
    print((paths.get("report") or next(iter(paths.values()))).read_text(encoding="utf-8")
          if paths else "", file=sys.stdout)
    print(f"report written to {out}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from taxonet import raycluster
    from taxonet.experiment import run_experiment

    config = _load(args)
    raycluster.init(args.address, num_cpus=args.num_cpus)
    result = run_experiment(config, seeds=args.seeds, baseline=not args.no_baseline, out_uri=args.out,
                            parallel=not args.sequential)
    print(result.table_markdown)
    return 0
