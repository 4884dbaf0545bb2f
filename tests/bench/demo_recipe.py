"""The demo's recipe over seeds: the figures docs/evaluation.md and README.md quote for ``taxonet demo``.

Renders the demo's images once (``taxonet.commands.demo``: grid-shaped tree, family-level bycatch, one unseen species
per family), prepares them, then for every seed trains the ``demo`` config with Ray Train (2 local CPU workers, as
the demo does; ``train.seed`` = the seed) and evaluates the best checkpoint on the test split and the unseen
species, under the strict chain rule (the default) and the lenient one. Prints one RESULT line per seed, then
mean ± SD (sample SD, ddof = 1), min–max and n per figure. Starts Ray: run it under the shared lock.

    flock /tmp/taxonet-heavy.lock .venv/bin/python tests/bench/demo_recipe.py --seeds 3
    flock /tmp/taxonet-heavy.lock .venv/bin/python tests/bench/demo_recipe.py --seeds 3 --paper-loss
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

from taxonet import raycluster  # noqa: E402
from taxonet.commands.demo import DemoData, demo_config, prepare_demo, render_demo_images  # noqa: E402
from taxonet.evaluate.run import run_evaluation  # noqa: E402

FIGURES = (
    ("species_f1", "species macro F1, demo test split"),
    ("known_at_species", "known test images answered at species"),
    ("unseen_unsure", "unseen species: unsure at species (strict)"),
    ("unseen_correct", "unseen species: reliable at a correct higher rank (strict)"),
    ("unseen_correct_lenient", "unseen species: reliable at a correct higher rank (lenient)"),
    ("auroc", "max-logit AUROC known vs unseen (species)"),
    ("train_s", "training time per seed, s (Ray Train, 2 workers)"),
)


def summary(values: list[float]) -> str:
    """``mean ± SD (min–max, n=N)``; SD is the sample SD (ddof = 1), 0 for one value."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 0 if max(abs(v) for v in values) >= 10 else 3
    return (f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} "
            f"({min(values):.{digits}f}–{max(values):.{digits}f}, n={len(values)})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="train seeds 0..N-1 (3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--paper-loss", action="store_true", help="loss.outlier_weight = 0 (the paper's loss alone)")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    defaults = DemoData()
    parser.add_argument("--per-species", type=int, default=defaults.per_species)
    parser.add_argument("--bycatch-images", type=int, default=None,
                        help=f"bycatch images per family (default: 2 x --per-species: "
                             f"{defaults.bycatch_images_per_family})")
    parser.add_argument("--bycatch-species", type=int, default=defaults.bycatch_species_per_family,
                        help=f"bycatch species per family ({defaults.bycatch_species_per_family})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo config value (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = DemoData(per_species=args.per_species, bycatch_images=args.bycatch_images,
                    bycatch_species_per_family=args.bycatch_species)
    with tempfile.TemporaryDirectory(prefix="taxonet-demo-recipe-") as tmp:
        out = Path(args.out or tmp).resolve()
        taxonomy, _, unseen = render_demo_images(out, data)
        dataset, unseen_dataset, _ = prepare_demo(out, str(out), taxonomy, unseen, data.image_size)
        raycluster.init(num_cpus=2)
        from taxonet.train.driver import run_training

        rows: list[dict[str, float]] = []
        config = None
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            config = demo_config(dataset, str(out / "runs"), data.image_size, seed=seed, paper_loss=args.paper_loss,
                                 sets=args.sets, run_name=f"seed{seed}")
            started = time.perf_counter()
            result = run_training(config)
            train_s = time.perf_counter() - started
            strict = run_evaluation(result.best_checkpoint, dataset, unseen_uri=unseen_dataset, chain_rule="strict")
            lenient = run_evaluation(result.best_checkpoint, dataset, unseen_uri=unseen_dataset,
                                     chain_rule="lenient")
            row = {"species_f1": strict.rank_metrics["species"]["f1"],
                   "known_at_species": strict.lowest_reliable["species"],
                   "unseen_unsure": strict.unseen.overall.unsure_at_leaf,
                   "unseen_correct": strict.unseen.overall.correct_higher,
                   "unseen_correct_lenient": lenient.unseen.overall.correct_higher,
                   "auroc": strict.unseen.separation["max_logit"]["auroc"], "train_s": train_s}
            rows.append(row)
            print(f"RESULT seed={seed} outlier_weight={config.loss.outlier_weight:g} " +
                  " ".join(f"{key}={value:.3f}" for key, value in row.items()), flush=True)
        assert config is not None
        print(f"\ndemo recipe: {taxonomy.describe()}, {data.per_species} images/species, {data.image_size} px, "
              f"bycatch {data.bycatch_images_per_family} images/family in {data.bycatch_species_per_family} kinds, "
              f"dependency {config.loss.dependency}, "
              f"outlier_weight {config.loss.outlier_weight:g}, lr {config.optim.lr:g}, {config.optim.epochs} epochs, "
              f"batch {config.optim.batch_size} per worker x {config.train.num_workers} workers, "
              f"seeds {args.first_seed}..{args.first_seed + args.seeds - 1}")
        for key, label in FIGURES:
            print(f"  {label}: {summary([row[key] for row in rows])}")


if __name__ == "__main__":
    main()
