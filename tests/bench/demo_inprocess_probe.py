"""The demo's data and config trained in this process (no Ray, 1 CPU thread): a quick probe of a recipe change,
with where the unseen species' answers go. One seed per run; prints one line ``RES {json}``:

    f1            species macro F1 on held-out known images (12 per species)
    known_at_sp   known images answered down to species
    unsure_sp     unseen images whose answer stops above species (strict chain rule)
    correct_hi    unseen images answered at their correct family (or order), species unsure
    fam_argmax    unseen images whose family argmax is right, reliable or not
    at_family_right / at_family_wrong / at_order / none: where the unseen answers stop

It is not the demo (that is ``tests/bench/demo_recipe.py``: Ray Train, 2 workers, what the docs quote as the
demo's figures); docs/evaluation.md quotes its lines only as the probes that chose the demo's bycatch. Examples:

    .venv/bin/python tests/bench/demo_inprocess_probe.py --tag base --bycatch-species 4 --bycatch-images 96
    .venv/bin/python tests/bench/demo_inprocess_probe.py --tag by8x30 --bycatch-species 8 --bycatch-images 240
    .venv/bin/python tests/bench/demo_inprocess_probe.py --tag ep24 --set optim.epochs=24
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
from taxonet.anomaly import assess  # noqa: E402
from taxonet.checkpoint import load_checkpoint  # noqa: E402
from taxonet.config import load_config  # noqa: E402
from taxonet.data.synthetic import SyntheticInsects, synthetic_taxonomy, unseen_species  # noqa: E402
from taxonet.data.transforms import TransformSpec, build_eval_transform  # noqa: E402
from taxonet.metrics import evaluate_predictions  # noqa: E402
from taxonet.train.loop import collect_logits  # noqa: E402
from tests.support import TensorData, samples_to_tensors, tensor_batches, train_locally  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40, help="image side in px (40, the demo's)")
    parser.add_argument("--per-species", type=int, default=96, help="training images per known species (96)")
    parser.add_argument("--bycatch-species", type=int, default=4, help="bycatch kinds per family (4)")
    parser.add_argument("--bycatch-images", type=int, default=96, help="bycatch images per family (96)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (the images are always seed 0)")
    parser.add_argument("--tag", default="", help="a name for the RES line")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo config value (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    taxonomy = synthetic_taxonomy(2, 2, 3)
    config = load_config("demo", {"data.input_size": args.size, "train.seed": args.seed}).with_overrides(args.sets)
    transform = build_eval_transform(TransformSpec.from_config(config.data))
    generator = SyntheticInsects(taxonomy, image_size=args.size, seed=0)
    images, targets = samples_to_tensors(generator.samples(args.per_species), taxonomy, transform)
    kinds = generator.outlier_species(args.bycatch_species)
    per_kind = max(1, args.bycatch_images // args.bycatch_species)
    bycatch = list(generator.samples(per_kind, chains=kinds, start_index=args.per_species))
    if bycatch and config.loss.outlier_weight > 0:  # labelled down to the family only
        images = torch.cat([images, torch.stack([transform(s.image) for s in bycatch])])
        targets = torch.cat([targets, torch.tensor([taxonomy.encode(list(s.labels[:-1]) + [None])
                                                    for s in bycatch])])
    val = samples_to_tensors(generator.samples(12, start_index=10_000), taxonomy, transform)
    test_images, test_targets = samples_to_tensors(generator.samples(12, start_index=20_000), taxonomy, transform)
    unseen = list(generator.samples(30, chains=unseen_species(taxonomy, per_family=1, seed=0), start_index=50_000))
    unseen_images = torch.stack([transform(s.image) for s in unseen])
    with tempfile.TemporaryDirectory() as tmp:
        data = TensorData(images, targets, *val, batch_size=config.optim.batch_size, seed=args.seed)
        best, _ = train_locally(config, taxonomy, data, tmp)
        checkpoint = load_checkpoint(best)

    def logits_of(batch: torch.Tensor) -> dict[str, np.ndarray]:
        dummy = torch.zeros(len(batch), taxonomy.depth, dtype=torch.int64)
        return collect_logits(checkpoint.model, tensor_batches(batch, dummy, 128), torch.device("cpu"), amp=False,
                              channels_last=False)[0]

    known = assess(taxonomy, checkpoint.thresholds, logits_of(test_images))
    f1 = evaluate_predictions(taxonomy, test_targets.numpy(), known.predictions)["species"]["f1"]
    answers = assess(taxonomy, checkpoint.thresholds, logits_of(unseen_images))
    family = np.array([taxonomy.index("family", s.labels[1]) for s in unseen])
    order = np.array([taxonomy.index("order", s.labels[0]) for s in unseen])
    level = np.asarray(answers.lowest_reliable_level)
    family_right = answers.predictions[:, 1] == family
    order_right = answers.predictions[:, 0] == order
    correct_higher = ((level == 1) & family_right & order_right) | ((level == 0) & order_right)

    def share(mask: np.ndarray) -> float:
        return round(float(np.mean(mask)), 3)

    result = {"tag": args.tag, "f1": round(float(f1), 3),
              "known_at_sp": share(np.asarray(known.lowest_reliable_level) == 2), "unsure_sp": share(level < 2),
              "correct_hi": share(correct_higher), "fam_argmax": share(family_right),
              "at_family_right": share((level == 1) & family_right),
              "at_family_wrong": share((level == 1) & ~family_right),
              "at_order": share(level == 0), "none": share(level < 0), "s": round(time.time() - started)}
    print("RES", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
