"""Behaviour: a small backbone trained on synthetic insects learns every rank, and unseen species of known families
are "unsure" at species while keeping their family and order (METHOD.md, issue 2).

The product's loop without Ray (``taxonet.train.loop`` through ``tests.support``), CPU, 40 px images. Tree: 3
orders, 4 families, 3 species per family (12 species; the issue asks for >= 9 in >= 4 families and >= 3 orders).
Every family has several species on purpose: in the demo tree three families hold a single species, which a network
tells apart by family traits alone, so its marks are never learnt and an unseen sibling cannot look new. Recipe:
small_cnn, Adam 3e-3 with a cosine decay, 30 epochs, 120 images per species, and outlier exposure
(``loss.outlier_weight`` 0.35): 5 "bycatch" species per family, 20 images each, labelled to family only, wearing
marks that known species of *other* families have — never the marks of the unseen species tested here
(``SyntheticInsects.outlier_species``). About 3 minutes on 2 idle cores.

Why outlier exposure: with the paper's loss alone the winning species logit of an unseen image is as high as a known
one's (max-logit AUROC 0.44-0.69; 6% unsure at species, 8% at a correct higher rank; docs/evaluation.md), so
per-class thresholds cannot flag it. Trained to spread its species logits on bycatch, the species head keeps them
low on marks it does not know, and the paper's thresholds (tau = mu - 2 sigma, unchanged) then work.

Measured (2026-11-26, 2 CPU cores, seed 0, ~5 min): held-out macro-F1 order 1.00, family 1.00, species 0.961;
unseen species 0.96 unsure at species, 0.93 at a correct lowest reliable rank; known species 0.05 unsure at species;
max-logit AUROC 0.99. The issue suggests ~3 minutes: 100 images per species and 25 epochs (3.5 min) met the targets
for this seed too (0.90 / 0.87, species F1 0.911) but over 8 seeds on a GPU averaged 0.73 / 0.68, so the test buys
more data and epochs. Spread over seeds and the paper-loss baseline: docs/evaluation.md (tests/bench/unseen_probe.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taxonet.anomaly import assess, auroc
from taxonet.checkpoint import load_checkpoint
from taxonet.config import load_config
from taxonet.data.synthetic import SyntheticInsects, unseen_species
from taxonet.data.transforms import TransformSpec, build_eval_transform
from taxonet.metrics import evaluate_predictions
from taxonet.taxonomy import Taxonomy
from taxonet.train.loop import collect_logits
from tests.support import TensorData, samples_to_tensors, tensor_batches, train_locally

# The module's training (in the first test's set-up) takes ~3.5 min on an idle 2-core box; on one shared with a CPU
# burner and other jobs (load average 8-10) it went past the suite's default 900 s. Generous, as the suite asks.
pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(2400)]

SIZE, PER_SPECIES, EPOCHS = 44, 120, 30
ORDERS, FAMILIES, SPECIES_PER_FAMILY = 3, 4, 3
OUTLIERS_PER_FAMILY, PER_OUTLIER, OUTLIER_WEIGHT = 5, 20, 0.35


def behaviour_taxonomy() -> Taxonomy:
    return Taxonomy.from_rows([(f"Order{f % ORDERS}", f"Family{f}", f"Family{f} species{s}")
                               for f in range(FAMILIES) for s in range(SPECIES_PER_FAMILY)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(2)
    taxonomy = behaviour_taxonomy()
    config = load_config("demo", {"data.input_size": SIZE, "optim.epochs": EPOCHS, "model.backbone": "small_cnn",
                                  "optim.lr": 3e-3, "optim.schedule": "cosine", "train.seed": 0,
                                  "loss.outlier_weight": OUTLIER_WEIGHT, "loss.dependency": "paper"})
    transform = build_eval_transform(TransformSpec.from_config(config.data))
    generator = SyntheticInsects(taxonomy, image_size=SIZE, seed=0)
    known_images, known_targets = samples_to_tensors(generator.samples(PER_SPECIES), taxonomy, transform)
    bycatch = list(generator.samples(PER_OUTLIER, chains=generator.outlier_species(OUTLIERS_PER_FAMILY),
                                     start_index=50_000))
    # labelled down to the family: the loss reads "species unspecified" as "none of the known species"
    bycatch_targets = torch.tensor([taxonomy.encode(list(s.labels[:-1]) + [None]) for s in bycatch])
    train = (torch.cat([known_images, torch.stack([transform(s.image) for s in bycatch])]),
             torch.cat([known_targets, bycatch_targets]))
    val = samples_to_tensors(generator.samples(20, start_index=10_000), taxonomy, transform)
    best, _ = train_locally(config, taxonomy, TensorData(*train, *val, batch_size=32, val_batch_size=128, seed=0),
                            tmp_path_factory.mktemp("run"), device="cpu")
    return taxonomy, generator, transform, load_checkpoint(best)


def _logits(checkpoint, images):
    logits, _ = collect_logits(checkpoint.model, tensor_batches(images, torch.zeros(len(images), 3, dtype=torch.int64),
                                                                 128), torch.device("cpu"), amp=False,
                               channels_last=False)
    return logits


def test_taxonomy_is_as_big_as_the_issue_asks():
    taxonomy = behaviour_taxonomy()
    assert [taxonomy.num_classes(r) for r in taxonomy.ranks] == [3, 4, 12]


def test_learns_every_rank_on_held_out_images(trained):
    taxonomy, generator, transform, checkpoint = trained
    images, targets = samples_to_tensors(generator.samples(40, start_index=20_000), taxonomy, transform)
    assessment = assess(taxonomy, checkpoint.thresholds, _logits(checkpoint, images))
    scores = evaluate_predictions(taxonomy, targets.numpy(), assessment.predictions)
    print({rank: round(values["f1"], 3) for rank, values in scores.items()})
    assert scores["order"]["f1"] >= 0.95, scores
    assert scores["family"]["f1"] >= 0.95, scores
    assert scores["species"]["f1"] >= 0.90, scores  # the issue's target; measured 0.918 (chance 0.08), twice
    # the thresholds keep most known images reliable down to species
    assert (assessment.lowest_reliable_level == 2).mean() >= 0.8


def test_unseen_species_are_unsure_at_species_and_right_above(trained):
    taxonomy, generator, transform, checkpoint = trained
    chains = unseen_species(taxonomy, per_family=1, seed=0)
    assert len(chains) == FAMILIES
    samples = list(generator.samples(40, chains=chains, start_index=30_000))
    images = torch.stack([transform(s.image) for s in samples])
    unseen_logits = _logits(checkpoint, images)
    assessment = assess(taxonomy, checkpoint.thresholds, unseen_logits)
    family = np.array([taxonomy.index("family", s.labels[1]) for s in samples])
    order = np.array([taxonomy.index("order", s.labels[0]) for s in samples])
    level = assessment.lowest_reliable_level
    unsure_at_species = (~assessment.sure[:, 2]).mean()
    correct_higher_rank = (((level == 1) & (assessment.predictions[:, 1] == family))
                           | ((level == 0) & (assessment.predictions[:, 0] == order))).mean()
    known_images, _ = samples_to_tensors(generator.samples(20, start_index=40_000), taxonomy, transform)
    known_logits = _logits(checkpoint, known_images)
    known = assess(taxonomy, checkpoint.thresholds, known_logits)
    known_unsure = (~known.sure[:, 2]).mean()
    separation = auroc(known_logits["species"].max(axis=1), unseen_logits["species"].max(axis=1))
    figures = (f"unseen: unsure at species {unsure_at_species:.2f}, correct lowest reliable rank "
               f"{correct_higher_rank:.2f}; known: unsure at species {known_unsure:.2f}; "
               f"max-logit AUROC known vs unseen {separation:.2f}")
    print(figures)
    # the family and order of an unseen species are still recognised (their traits are the real ancestors')
    assert (assessment.predictions[:, 1] == family).mean() >= 0.8, figures
    assert (assessment.predictions[:, 0] == order).mean() >= 0.9, figures
    # the issue's targets
    assert unsure_at_species >= 0.8, figures
    assert correct_higher_rank >= 0.7, figures
    # and the thresholds did not get there by doubting everything: known species stay reliable at species
    assert known_unsure <= 0.2, figures
    assert separation >= 0.85, figures
