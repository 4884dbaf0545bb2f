"""The spread of the Ray Train learning test's figures over repeated runs (tests/integration/test_train_ray.py).

Trains the test's recipe (``_config`` there: the demo taxonomy, 48 synthetic images per species at 32 px, small_cnn,
2 Ray CPU workers, batch 16, lr 3e-3, the paper's loss) ``--runs`` times on local storage and prints, per run, the
best validation order and species macro-F1 over its epochs (what the test asserts) and the whole curve, then
min–max. With 2 workers the data order varies from run to run, so the figures do too; use it to choose the test's
epochs and thresholds. Starts Ray: run it under the shared lock.

    flock /tmp/taxonet-heavy.lock .venv/bin/python tests/bench/learning_test_spread.py --epochs 6 --runs 6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.integration importable from a checkout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (the test: 6)")
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()

    import ray

    from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset
    from taxonet.taxonomy import Taxonomy
    from taxonet.train.driver import run_training
    from tests.integration.test_train_ray import _config

    with tempfile.TemporaryDirectory(prefix="taxonet-spread-") as tmp:
        dataset = f"{tmp}/ds"
        write_synthetic_dataset(dataset, Taxonomy.demo(), per_species=48, image_size=32, seed=0,
                                options=PrepareOptions(workers=1, progress=False, shard_size=100))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        best_order, best_species = [], []
        for run in range(args.runs):
            started = time.monotonic()
            result = run_training(_config(dataset, f"{tmp}/runs", f"run{run}", epochs=args.epochs))
            curve = [(h["epoch"], round(h["val_order_f1"], 3), round(h["val_species_f1"], 3))
                     for h in result.history]
            best_order.append(max(c[1] for c in curve))
            best_species.append(max(c[2] for c in curve))
            print(f"RUN {run} {time.monotonic() - started:.0f} s best order F1 {best_order[-1]} best species F1 "
                  f"{best_species[-1]} (epoch, order F1, species F1): {curve}", flush=True)
        print(f"{args.runs} runs of {args.epochs} epochs: best order F1 {min(best_order)}–{max(best_order)}, "
              f"best species F1 {min(best_species)}–{max(best_species)}")
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
