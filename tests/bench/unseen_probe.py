"""Unseen-species probe: how well the paper's thresholds flag species a model never saw, with and without outlier
exposure, for one recipe over one or more seeds. The recipe of issue 2's behavioural test by default
(tests/model/test_behaviour.py).

Trains ``small_cnn`` with the product's loop (``tests.support.train_locally``) on synthetic insects (3 orders x 4
families x 3 species) plus, when
``--outlier-weight`` > 0, ``--outliers-per-family`` "bycatch" species per family labelled to family only
(``SyntheticInsects.outlier_species``: marks of known species of other families, never the unseen species' marks),
then scores held-out known images and one unseen species per family (``unseen_species``) and prints one line:

    RESULT outlier_weight=.. size=.. epochs=.. seed=.. | species F1 .. | unseen: unsure at species .., correct
    lowest reliable rank .., family right .. | known unsure at species .. | max-logit AUROC .. | .. s

"Unsure at species" is the answer (lowest reliable rank above species, strict chain rule); "flagged" is the species
score below its threshold alone. With ``--seeds N`` (N > 1) a block follows with mean ± SD (ddof 1), min–max and n of
every figure over the seeds: what README.md and docs/evaluation.md quote.

Usage (CPU, about 3-5 minutes per seed; on a GPU add ``--device cuda``, about 45 s):
    .venv/bin/python tests/bench/unseen_probe.py --outlier-weight 0.35 --size 44 --epochs 25 --seeds 3
    .venv/bin/python tests/bench/unseen_probe.py --outlier-weight 0      # the paper's loss alone
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.support


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outlier-weight", type=float, default=0.35, help="loss.outlier_weight (0 = paper)")
    parser.add_argument("--size", type=int, default=44, help="image side in px (44)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--per-species", type=int, default=100, help="training images per known species (100)")
    parser.add_argument("--outliers-per-family", type=int, default=5)
    parser.add_argument("--per-outlier", type=int, default=20, help="images per bycatch species (20)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--k", type=float, default=2.0, help="anomaly.k: tau = mu - k sigma (2, the paper)")
    parser.add_argument("--seed", type=int, default=0, help="first train.seed (the images are always seed 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train seeds --seed..--seed+N-1; N > 1 adds mean ± SD (ddof 1), min–max, n per figure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    rows = [probe(args, seed) for seed in range(args.seed, args.seed + args.seeds)]
    if args.seeds > 1:
        print(f"\nunseen probe: outlier_weight={args.outlier_weight:g} size={args.size} epochs={args.epochs} "
              f"per_species={args.per_species} lr={args.lr:g} k={args.k:g} device={args.device}, "
              f"seeds {args.seed}..{args.seed + args.seeds - 1}")
        for key, label in FIGURES:
            print(f"  {label}: {summary([row[key] for row in rows])}")


FIGURES = (
    ("species_f1", "species macro F1, held-out known images"),
    ("unsure_at_species", "unseen: unsure at species (strict)"),
    ("flagged_at_species", "unseen: species score below its threshold"),
    ("correct_higher", "unseen: reliable at a correct higher rank (strict)"),
    ("correct_higher_lenient", "unseen: reliable at a correct higher rank (lenient)"),
    ("known_unsure_at_species", "known: unsure at species"),
    ("auroc", "max-logit AUROC known vs unseen"),
)


def summary(values: list[float]) -> str:
    """``mean ± SD (min–max, n=N)``; SD is the sample SD (ddof = 1)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({min(values):.3f}–{max(values):.3f}, n={len(values)})"


def probe(args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Train and probe one seed; prints its RESULT line and returns its figures."""
    from taxonet.anomaly import assess
    from taxonet.checkpoint import load_checkpoint
    from taxonet.config import load_config
    from taxonet.data.synthetic import SyntheticInsects, unseen_species
    from taxonet.data.transforms import TransformSpec, build_eval_transform
    from taxonet.evaluate.report import UnseenInputs, unseen_report
    from taxonet.metrics import evaluate_predictions
    from taxonet.taxonomy import Taxonomy
    from taxonet.train.loop import collect_logits
    from tests.support import TensorData, samples_to_tensors, tensor_batches, train_locally

    started = time.perf_counter()
    taxonomy = Taxonomy.from_rows([(f"Order{f % 3}", f"Family{f}", f"Family{f} species{s}")
                                   for f in range(4) for s in range(3)])
    config = load_config("demo", {"data.input_size": args.size, "optim.epochs": args.epochs,
                                  "model.backbone": "small_cnn", "optim.lr": args.lr, "optim.schedule": "cosine",
                                  "train.seed": seed, "loss.outlier_weight": args.outlier_weight,
                                  "anomaly.k": args.k})
    transform = build_eval_transform(TransformSpec.from_config(config.data))
    generator = SyntheticInsects(taxonomy, image_size=args.size, seed=0)
    images, targets = samples_to_tensors(generator.samples(args.per_species), taxonomy, transform)
    if args.outlier_weight > 0:
        bycatch = list(generator.samples(args.per_outlier, chains=generator.outlier_species(args.outliers_per_family),
                                         start_index=50_000))
        images = torch.cat([images, torch.stack([transform(s.image) for s in bycatch])])
        targets = torch.cat([targets, torch.tensor([taxonomy.encode(list(s.labels[:-1]) + [None]) for s in bycatch])])
    val = samples_to_tensors(generator.samples(20, start_index=10_000), taxonomy, transform)
    test_images, test_targets = samples_to_tensors(generator.samples(40, start_index=20_000), taxonomy,
                                                          transform)
    unseen = list(generator.samples(40, chains=unseen_species(taxonomy, per_family=1, seed=0), start_index=30_000))
    unseen_images = torch.stack([transform(s.image) for s in unseen])

    with tempfile.TemporaryDirectory() as tmp:
        best, _ = train_locally(config, taxonomy, TensorData(images, targets, *val, batch_size=32, seed=seed),
                                tmp, device=args.device)
        checkpoint = load_checkpoint(best)

    def logits_of(batch: torch.Tensor) -> dict[str, np.ndarray]:
        dummy = torch.zeros(len(batch), taxonomy.depth, dtype=torch.int64)
        return collect_logits(checkpoint.model, tensor_batches(batch, dummy, 128), torch.device("cpu"),
                              amp=False, channels_last=False)[0]

    known_logits = logits_of(test_images)
    known = assess(taxonomy, checkpoint.thresholds, known_logits)
    species_f1 = evaluate_predictions(taxonomy, test_targets.numpy(), known.predictions)["species"]["f1"]
    # the figures `taxonet evaluate --unseen` reports (their labels are known down to the family)
    unseen_logits = logits_of(unseen_images)
    inputs = UnseenInputs(dataset="synthetic", logits=unseen_logits, chains=[s.labels for s in unseen],
                          targets=np.array([taxonomy.encode(list(s.labels[:-1]) + [None]) for s in unseen]))
    report = unseen_report(taxonomy, checkpoint.thresholds, known_logits, known, inputs)
    lenient_thresholds = checkpoint.thresholds.with_chain_rule("lenient")
    lenient = unseen_report(taxonomy, lenient_thresholds, known_logits,
                            assess(taxonomy, lenient_thresholds, known_logits), inputs)
    family = np.array([taxonomy.index("family", s.labels[1]) for s in unseen])
    family_right = (assess(taxonomy, checkpoint.thresholds, unseen_logits).predictions[:, 1] == family).mean()
    overall = report.overall
    print(f"RESULT outlier_weight={args.outlier_weight:g} size={args.size} epochs={args.epochs} seed={seed} "
          f"device={args.device} | species F1 {species_f1:.3f} | unseen: unsure at species "
          f"{overall.unsure_at_leaf:.2f} (flagged {overall.flagged_at_leaf:.2f}), correct lowest reliable rank "
          f"{overall.correct_higher:.2f} (lenient {lenient.overall.correct_higher:.2f}), family right "
          f"{family_right:.2f} | known unsure at species {report.known_unsure_at_leaf:.2f} | max-logit AUROC "
          f"{report.separation['max_logit']['auroc']:.2f} | {time.perf_counter() - started:.0f} s", flush=True)
    return {"species_f1": float(species_f1), "unsure_at_species": overall.unsure_at_leaf,
            "flagged_at_species": overall.flagged_at_leaf, "correct_higher": overall.correct_higher,
            "correct_higher_lenient": lenient.overall.correct_higher,
            "known_unsure_at_species": report.known_unsure_at_leaf,
            "auroc": report.separation["max_logit"]["auroc"]}


if __name__ == "__main__":
    main()
