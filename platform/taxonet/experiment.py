"""Experiments: N seeds of a multitask config and of its single-task baseline, evaluated on the test split and
summarised as mean ± SD per rank in the shape of the paper's Table 4 (Bjerge et al. 2023; METHOD.md "Evaluation").

Each run is an ordinary Ray Train run (:func:`taxonet.train.driver.run_training`) named
``<run_name>-mtl-s<seed>`` or ``<run_name>-baseline-s<seed>`` under ``train.storage``, so a rerun of the experiment
resumes each run from its latest checkpoint. With ``parallel=True`` every run is driven by its own Ray task
(``num_cpus=0``: the task only waits on its TorchTrainer, whose workers hold the resources), as many at a time as
the cluster's CPUs/GPUs allow; the best checkpoint of each run is then evaluated by a Ray task holding a CPU (or a
GPU when training used one). Results go next to the runs::

    <train.storage>/<run_name>-experiment/
        table4.md, table4.csv      mean ± SD per rank and model (single-task rows "–" above the leaf rank)
        runs.json                  every run: seed, variant, run URI, best checkpoint, test metrics (or its error)
        <run name>/                the evaluation report of each run (report.md, metrics.json, PNGs)
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from taxonet import storage
from taxonet.config import ConfigError, RunConfig
from taxonet.data.dataset import DatasetInfo
from taxonet.errors import DatasetError
from taxonet.evaluate.render import write_report
from taxonet.evaluate.report import json_ready
from taxonet.evaluate.run import run_evaluation
from taxonet.metrics import format_table4, summarize_runs
from taxonet.train.driver import run_training

log = logging.getLogger(__name__)

VARIANTS = ("mtl", "baseline")


class ExperimentError(RuntimeError):
    """Some runs of an experiment failed; the tables over the runs that finished were still written."""


@dataclass
class RunRecord:
    """One trained and evaluated run (or its failure)."""

    name: str
    variant: str
    seed: int
    run_uri: str = ""
    best_checkpoint: str = ""
    report_uri: str = ""
    #: test-split metrics per head rank: precision, recall, f1, accuracy, support
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    consistency: float | None = None
    lowest_reliable: dict[str, float] | None = None
    resumed_from_epoch: int | None = None
    #: wall-clock start and end (Unix time) of training + evaluation
    started: float = 0.0
    ended: float = 0.0
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ExperimentResult:
    experiment_uri: str
    runs: list[RunRecord]
    #: model label → rank → metric → (mean, sd), over the runs that finished
    summary_by_model: dict[str, dict[str, dict[str, tuple[float, float]]]]
    table_markdown: str
    table_csv: str
    #: name → URI of the files written (table4.md, table4.csv, runs.json)
    files: dict[str, str]

    @property
    def failed(self) -> list[RunRecord]:
        return [run for run in self.runs if not run.ok]


# ---------------------------------------------------------------------------------------------------------- plan
def plan_runs(config: RunConfig, seeds: int | Sequence[int], baseline: bool = True
              ) -> list[tuple[str, int, RunConfig]]:
    """(variant, seed, config) for every run: the multitask model (``model.single_task=false``) and, with
    ``baseline``, its single-task variant, each for every seed. Seeds are ``train.seed + i`` for an int count."""
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds must be a positive count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {seeds}")
        seed_list = [config.train.seed + i for i in range(seeds)]
    else:
        seed_list = [int(s) for s in seeds]
        if not seed_list or len(set(seed_list)) != len(seed_list):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    variants = VARIANTS if baseline else VARIANTS[:1]
    runs = []
    for variant in variants:
        for seed in seed_list:
            run_config = config.with_overrides({
                "model.single_task": variant == "baseline",
                "train.seed": seed,
                "train.run_name": f"{config.train.run_name}-{variant}-s{seed}",
                "name": f"{config.name}-{variant}",
            })
            runs.append((variant, seed, run_config))
    return runs


def model_label(config: RunConfig, variant: str, leaf_rank: str) -> str:
    """Row label in Table 4: "<backbone> MTL" or "<backbone> (<leaf> only)", as in the paper."""
    backbone = config.model.backbone
    return f"{backbone} MTL" if variant == "mtl" else f"{backbone} ({leaf_rank} only)"


# ---------------------------------------------------------------------------------------------------------- runs
def train_and_evaluate(config: RunConfig, variant: str, seed: int, report_uri: str, *, evaluate_remotely: bool,
                       split: str = "test") -> RunRecord:
    """Train one run (resuming it if it exists), evaluate its best checkpoint on ``split`` and write the report to
    ``report_uri``. Failures are returned as the record's ``error``."""
    record = RunRecord(name=config.train.run_name, variant=variant, seed=seed, report_uri=report_uri,
                       started=time.time())
    try:
        result = run_training(config)
        record.run_uri, record.best_checkpoint = result.run_uri, result.best_checkpoint
        record.resumed_from_epoch = result.resumed_from_epoch
        if evaluate_remotely:
            resources = {"num_cpus": 1, "num_gpus": 0}
            if config.train.use_gpu:
                resources = {"num_cpus": min(1.0, config.train.cpus_per_worker), "num_gpus": 1}
            summary = ray.get(ray.remote(evaluate_to_uri).options(**resources).remote(
                result.best_checkpoint, config.data.dataset, split, report_uri))
        else:
            summary = evaluate_to_uri(result.best_checkpoint, config.data.dataset, split, report_uri)
        record.metrics = summary["rank_metrics"]
        record.consistency = summary["consistency"]
        record.lowest_reliable = summary["lowest_reliable"]
    except Exception as exc:  # one failed seed must not lose the others: recorded and reported at the end
        log.error("run %s failed: %s", record.name, exc)
        record.error = f"{type(exc).__name__}: {exc}"
        log.debug("%s", traceback.format_exc())
    record.ended = time.time()
    return record


def evaluate_to_uri(checkpoint_uri: str, dataset_uri: str, split: str, report_uri: str) -> dict[str, Any]:
    """:func:`taxonet.evaluate.run.run_evaluation` and write its report to ``report_uri`` (local or S3); returns the
    JSON form of the report."""
    report = run_evaluation(checkpoint_uri, dataset_uri, split=split)
    if storage.is_s3(report_uri):
        with tempfile.TemporaryDirectory(prefix="taxonet-report-") as tmp:
            write_report(report, tmp)
            storage.upload_dir(tmp, report_uri)
    else:
        write_report(report, storage.local_path(report_uri))
    return report.to_dict()


def _max_concurrent(config: RunConfig, runs: int) -> int:
    """How many runs fit on the cluster at once: each needs ``num_workers`` × its per-worker CPUs (GPUs); one CPU
    stays free for Ray Data's read tasks, the threshold fit and the evaluations of finished runs, which would
    otherwise wait behind training workers holding every CPU."""
    total = ray.cluster_resources()
    workers = config.train.num_workers
    by_cpu = math.floor((total.get("CPU", 0.0) - 1.0) / max(workers * config.train.cpus_per_worker, 1e-9) + 1e-9)
    limit = by_cpu
    if config.train.use_gpu:
        by_gpu = math.floor(total.get("GPU", 0.0) / max(workers * config.train.gpus_per_worker, 1e-9) + 1e-9)
        limit = min(limit, by_gpu)
    return max(1, min(runs, limit))


def _absolute(uri: str) -> str:
    """Local paths made absolute: Ray tasks may run in another working directory than the caller."""
    if not uri or storage.is_s3(uri):
        return uri
    return os.path.abspath(str(storage.local_path(uri)))


# ---------------------------------------------------------------------------------------------------------- main
def run_experiment(config: RunConfig, *, seeds: int | Sequence[int] = 5, baseline: bool = True,
                   out_uri: str | None = None, parallel: bool = True, max_concurrent: int | None = None,
                   on_run: Callable[[RunRecord], None] | None = None) -> ExperimentResult:
    """Train ``seeds`` seeds of ``config`` as a multitask model and (``baseline``) as its single-task variant,
    evaluate every best checkpoint on the dataset's test split and write Table 4 (mean ± SD per rank).

    Needs a connected Ray cluster (``ray.init``). ``parallel`` runs as many trainings at once as the cluster's
    resources allow (``max_concurrent`` caps it); otherwise one after another in this process. Runs that fail are
    recorded in runs.json, the tables cover the runs that finished, and :class:`ExperimentError` is raised at the
    end naming the failed runs.
    """
    if not ray.is_initialized():
        raise RuntimeError("run_experiment needs a Ray cluster: call ray.init() (taxonet experiment does) first")
    if not config.data.dataset:
        raise DatasetError("data.dataset is not set: give the prepared dataset URI (--set data.dataset=URI)")
    config = config.with_overrides({"data.dataset": _absolute(config.data.dataset),
                                    "train.storage": _absolute(config.train.storage)})
    info = DatasetInfo.load(config.data.dataset)  # fail fast (and before any training) on a bad dataset
    if "test" not in info.splits:
        raise DatasetError(f"dataset {config.data.dataset} has no test split to evaluate on; splits are "
                           f"{list(info.splits)}")
    experiment_uri = _absolute(out_uri) if out_uri else storage.join(config.train.storage,
                                                                     f"{config.train.run_name}-experiment")
    storage.check_writable(experiment_uri)
    planned = plan_runs(config, seeds, baseline)
    leaf_rank = info.taxonomy.ranks[-1]
    started = time.time()
    records: list[RunRecord] = []

    def finished(record: RunRecord) -> None:
        records.append(record)
        log.info("run %s %s in %.0f s%s", record.name, "finished" if record.ok else "FAILED", record.seconds,
                 "" if record.ok else f": {record.error}")
        if on_run:
            on_run(record)

    jobs = [(variant, seed, run_config, storage.join(experiment_uri, run_config.train.run_name))
            for variant, seed, run_config in planned]
    if parallel:
        limit = max_concurrent or _max_concurrent(config, len(jobs))
        # No runtime_env env_vars: secrets passed that way show in the dashboard (ray#39502). Workers inherit the
        # S3 settings from the cluster's environment (a mounted Secret on Kubernetes).
        options: dict[str, Any] = {"num_cpus": 0, "max_retries": 0}
        remote = ray.remote(train_and_evaluate).options(**options)
        log.info("experiment: %d runs, up to %d at a time", len(jobs), limit)
        pending: list[ray.ObjectRef] = []
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < limit:
                variant, seed, run_config, report_uri = queue.pop(0)
                pending.append(remote.remote(run_config, variant, seed, report_uri, evaluate_remotely=True))
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                finished(ray.get(ref))
    else:
        for variant, seed, run_config, report_uri in jobs:
            finished(train_and_evaluate(run_config, variant, seed, report_uri, evaluate_remotely=False))

    order = {(variant, seed): i for i, (variant, seed, _, _) in enumerate(jobs)}
    records.sort(key=lambda r: order[(r.variant, r.seed)])
    result = _write_results(config, experiment_uri, records, leaf_rank, list(info.taxonomy.ranks),
                            time.time() - started)
    if result.failed:
        raise ExperimentError(
            f"{len(result.failed)} of {len(records)} runs failed ("
            + "; ".join(f"{r.name}: {r.error}" for r in result.failed)
            + f"); the tables over the {len(records) - len(result.failed)} finished runs and runs.json are in "
            f"{experiment_uri}. Rerun the same experiment to resume the failed runs.")
    return result


def summarize(config: RunConfig, records: Sequence[RunRecord], leaf_rank: str
              ) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """Mean ± SD per model label, rank and metric over the runs that finished (MTL first, as in Table 4)."""
    summary = {}
    for variant in VARIANTS:
        runs = [r.metrics for r in records if r.ok and r.variant == variant and r.metrics]
        if runs:
            summary[model_label(config, variant, leaf_rank)] = summarize_runs(runs)
    return summary


def _write_results(config: RunConfig, experiment_uri: str, records: list[RunRecord], leaf_rank: str,
                   ranks: list[str], seconds: float) -> ExperimentResult:
    summary = summarize(config, records, leaf_rank)
    counts = {model_label(config, v, leaf_rank): sum(1 for r in records if r.ok and r.variant == v) for v in VARIANTS}
    if summary:
        markdown = format_table4(summary, ranks, fmt="markdown")
        csv_text = format_table4(summary, ranks, fmt="csv")
    else:
        markdown, csv_text = "No run finished: nothing to summarise.\n", ""
    seeds_line = ", ".join(f"{label}: {counts[label]} seed(s)" for label in summary)
    document = (f"# Table 4: {config.name} (mean ± SD over seeds, test split)\n\n{markdown}\n"
                f"Macro precision (P), recall (R) and F1 per rank on the test split of `{config.data.dataset}`; "
                f"{seeds_line or 'no finished run'}. SD with ddof=1; \"–\": the single-task baseline has no head "
                f"for that rank. Per-run reports are in the folders beside this file.\n")
    runs_document = {
        "config": config.to_dict(),
        "dataset": config.data.dataset,
        "ranks": ranks,
        "seconds": seconds,
        "runs": [asdict(r) for r in records],
        "summary": {label: {rank: {metric: {"mean": mean, "sd": sd} for metric, (mean, sd) in metrics.items()}
                            for rank, metrics in by_rank.items()} for label, by_rank in summary.items()},
    }
    files = {"table4.md": storage.join(experiment_uri, "table4.md"),
             "table4.csv": storage.join(experiment_uri, "table4.csv"),
             "runs.json": storage.join(experiment_uri, "runs.json")}
    storage.write_bytes(files["table4.md"], document.encode("utf-8"))
    storage.write_bytes(files["table4.csv"], csv_text.encode("utf-8"))
    storage.write_bytes(files["runs.json"], json.dumps(json_ready(runs_document), indent=2).encode("utf-8"))
    return ExperimentResult(experiment_uri=experiment_uri, runs=records, summary_by_model=summary,
                            table_markdown=markdown, table_csv=csv_text, files=files)


__all__ = ["ExperimentError", "ExperimentResult", "RunRecord", "model_label", "plan_runs", "run_experiment",
           "summarize", "train_and_evaluate"]
