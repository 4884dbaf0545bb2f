"""`taxonet evaluate`: a real (tiny) checkpoint on real Parquet datasets of known and unseen species.

The numbers are checked against an independent computation: images read straight from the shards with pyarrow,
the model run here, and the metrics recomputed with scikit-learn and a from-scratch implementation of the paper's
lowest-reliable-rank rule.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score, roc_curve
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from taxonet.anomaly import AnomalyThresholds
from taxonet.checkpoint import load_checkpoint
from taxonet.data.dataset import DatasetInfo
from taxonet.data.prepare import PrepareOptions, SourceItem, build_dataset
from taxonet.data.synthetic import SyntheticInsects, unseen_species
from taxonet.data.transforms import build_eval_transform, decode_image
from taxonet.errors import DatasetError
from taxonet.evaluate.render import table4_markdown, write_report
from taxonet.evaluate.report import UNSURE, UnseenInputs, build_report, encode_known_prefix
from taxonet.evaluate.run import run_evaluation
from taxonet.taxonomy import Taxonomy
from tests.support import quick_checkpoint

pytestmark = pytest.mark.integration

IMAGE_SIZE = 32
KNOWN_PER_SPECIES = 4
UNSEEN_PER_SPECIES = 4
KNOWN_IN_UNSEEN = 2  # images of a known species slipped into the unseen dataset: must be left out and counted


def _items(samples, split: str) -> list[SourceItem]:
    items = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        items.append(SourceItem(origin=f"test:{'/'.join(sample.labels)}/{sample.index}", labels=tuple(sample.labels),
                                split=split, source="synthetic", data=buffer.getvalue()))
    return items


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    taxonomy = Taxonomy.demo()
    checkpoint = quick_checkpoint(root / "run", taxonomy=taxonomy, image_size=IMAGE_SIZE, epochs=2)
    generator = SyntheticInsects(taxonomy, image_size=IMAGE_SIZE, seed=0)
    options = PrepareOptions(workers=0, progress=False, max_side=IMAGE_SIZE)
    # images far from the training indices (quick_checkpoint uses 0.. and 10000..), all in the test split
    known = build_dataset(_items(generator.samples(KNOWN_PER_SPECIES, start_index=50_000), "test"),
                          str(root / "known"), taxonomy, options, source_description="test")
    chains = unseen_species(taxonomy, per_family=1, seed=0)
    extended = Taxonomy.from_rows([*taxonomy.rows(), *chains], taxonomy.ranks)
    unseen_samples = list(generator.samples(UNSEEN_PER_SPECIES, chains=chains, start_index=60_000))
    known_chain = taxonomy.rows()[0]
    unseen_samples += list(generator.samples(KNOWN_IN_UNSEEN, chains=[known_chain], start_index=70_000))
    unseen = build_dataset(_items(unseen_samples, "unseen"), str(root / "unseen"), extended, options,
                           source_description="test")
    return {"root": root, "taxonomy": taxonomy, "checkpoint": str(checkpoint), "known": known.info.uri,
            "unseen": unseen.info.uri, "chains": chains}


@pytest.fixture(scope="module")
def report(setup: dict):
    return run_evaluation(setup["checkpoint"], setup["known"], split="test", unseen_uri=setup["unseen"], device="cpu",
                          batch_size=16)


# ---------------------------------------------------------------------------------------------------- reference
def _read_split(uri: str, split: str, taxonomy: Taxonomy, transform) -> tuple[torch.Tensor, list[tuple]]:
    """Images and label chains straight from the shards (pyarrow + PIL), independent of the evaluation code."""
    import pyarrow.parquet as pq

    info = DatasetInfo.load(uri)
    images, chains = [], []
    for shard in info.shard_uris(split):
        table = pq.read_table(shard, columns=["image", *taxonomy.ranks])
        columns = [table.column(rank).to_pylist() for rank in taxonomy.ranks]
        for i, data in enumerate(table.column("image").to_pylist()):
            images.append(transform(decode_image(data)))
            chains.append(tuple(column[i] for column in columns))
    return torch.stack(images), chains


def _reference(setup: dict) -> dict:
    loaded = load_checkpoint(setup["checkpoint"])
    taxonomy, thresholds = loaded.taxonomy, loaded.thresholds
    transform = build_eval_transform(loaded.transform)

    def run(images: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {rank: value.numpy() for rank, value in loaded.model.eval()(images).items()}

    def lowest_reliable(logits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        predictions = np.stack([logits[rank].argmax(1) for rank in taxonomy.ranks], axis=1)
        sure = np.zeros(predictions.shape, dtype=bool)
        for level, rank in enumerate(taxonomy.ranks):
            for i, cls in enumerate(predictions[:, level]):
                row = thresholds.get(rank, int(cls))
                sure[i, level] = row is None or logits[rank][i, cls] >= row.threshold
        out = np.full(len(predictions), -1)
        for i, chain in enumerate(predictions):
            # METHOD.md: species if family and species are sure; else family if order and family; else order;
            # a chain that breaks the taxonomy is unsure (the authors' strict rule, anomaly.chain_rule's default)
            consistent = [True] + [taxonomy.parents[lv][chain[lv]] == chain[lv - 1] for lv in range(1, 3)]
            if not all(consistent):
                out[i] = -1
            elif sure[i, 1] and sure[i, 2]:
                out[i] = 2
            elif sure[i, 0] and sure[i, 1] and consistent[1]:
                out[i] = 1
            elif sure[i, 0]:
                out[i] = 0
        return predictions, out

    images, chains = _read_split(setup["known"], "test", taxonomy, transform)
    targets = np.asarray([taxonomy.encode(chain) for chain in chains])
    logits = run(images)
    predictions, level = lowest_reliable(logits)
    unseen_images, unseen_chains = _read_split(setup["unseen"], "unseen", taxonomy, transform)
    keep = [i for i, chain in enumerate(unseen_chains) if chain[-1] not in taxonomy.names[-1]]
    unseen_logits = run(unseen_images[keep])
    unseen_predictions, unseen_level = lowest_reliable(unseen_logits)
    return {"taxonomy": taxonomy, "targets": targets, "logits": logits, "predictions": predictions, "level": level,
            "unseen_logits": unseen_logits, "unseen_predictions": unseen_predictions, "unseen_level": unseen_level,
            "unseen_chains": [unseen_chains[i] for i in keep], "unseen_skipped": len(unseen_chains) - len(keep)}


@pytest.fixture(scope="module")
def reference(setup: dict) -> dict:
    return _reference(setup)


# ---------------------------------------------------------------------------------------------------- tests
def test_per_rank_metrics_match_sklearn(report, reference) -> None:
    taxonomy = reference["taxonomy"]
    assert report.images == len(taxonomy.names[-1]) * KNOWN_PER_SPECIES
    assert report.head_ranks == list(taxonomy.ranks)
    for level, rank in enumerate(taxonomy.ranks):
        y_true, y_pred = reference["targets"][:, level], reference["predictions"][:, level]
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
        got = report.rank_metrics[rank]
        assert got["precision"] == pytest.approx(p, abs=1e-9)
        assert got["recall"] == pytest.approx(r, abs=1e-9)
        assert got["f1"] == pytest.approx(f, abs=1e-9)
        assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-9)
        assert got["support"] == report.images
    chains = reference["predictions"]
    consistent = np.mean([taxonomy.is_consistent(chain) for chain in chains])
    assert report.consistency == pytest.approx(consistent)


def test_lowest_reliable_rank_and_confusion_unsure_column_match_the_rule(report, reference) -> None:
    taxonomy, level = reference["taxonomy"], reference["level"]
    assert report.threshold_k == 2.0
    for index, rank in enumerate(taxonomy.ranks):
        assert report.lowest_reliable[rank] == pytest.approx(np.mean(level == index))
    assert report.lowest_reliable[UNSURE] == pytest.approx(np.mean(level == -1))
    assert sum(report.lowest_reliable.values()) == pytest.approx(1.0)
    for index, rank in enumerate(taxonomy.ranks):
        n = taxonomy.num_classes(rank)
        y_true = reference["targets"][:, index]
        reported = level >= index
        expected = np.zeros((n, n + 1), dtype=int)
        if reported.any():  # sklearn refuses empty inputs; nothing reported at this rank leaves zeros
            expected[:, :n] = sklearn_confusion_matrix(y_true[reported], reference["predictions"][reported, index],
                                                       labels=range(n))
        expected[:, n] = np.bincount(y_true[~reported], minlength=n)
        np.testing.assert_array_equal(report.confusion[rank], expected)


def test_unseen_table_and_separation_match_an_independent_computation(report, reference, setup) -> None:
    unseen = report.unseen
    taxonomy = reference["taxonomy"]
    assert unseen is not None and unseen.leaf_rank == "species" and unseen.splits == ["unseen"]
    assert unseen.skipped_known == KNOWN_IN_UNSEEN == reference["unseen_skipped"]
    assert any("left out of the unseen-species table" in note for note in report.notes)
    assert [c.name for c in unseen.classes] == sorted(chain[-1] for chain in setup["chains"])
    chains = reference["unseen_chains"]
    leaves = np.asarray([chain[-1] for chain in chains])
    for result in unseen.classes:
        mask = leaves == result.name
        assert result.images == UNSEEN_PER_SPECIES == mask.sum()
        chain = next(c for c in setup["chains"] if c[-1] == result.name)
        assert result.lineage == tuple(chain[:-1])  # the family and order of the unseen species are known
        level = reference["unseen_level"][mask]
        predictions = reference["unseen_predictions"][mask]
        true_family, true_order = taxonomy.index(1, chain[1]), taxonomy.index(0, chain[0])
        correct = ((level == 1) & (predictions[:, 1] == true_family)) | \
                  ((level == 0) & (predictions[:, 0] == true_order))
        assert result.unsure_at_leaf == pytest.approx(np.mean(level < 2))
        assert result.correct_higher == pytest.approx(np.mean(correct))
        assert result.wrongly_reliable == pytest.approx(np.mean((level >= 0) & ~correct))
        assert result.unsure_everywhere == pytest.approx(np.mean(level == -1))
        assert result.correct_higher + result.wrongly_reliable + result.unsure_everywhere == pytest.approx(1.0)
    assert unseen.overall.images == len(chains)
    # AUROC / FPR@95%TPR of the max logit at species: known test images positive, unseen negative
    known = reference["logits"]["species"].max(1)
    new = reference["unseen_logits"]["species"].max(1)
    labels = np.r_[np.ones(len(known)), np.zeros(len(new))]
    scores = np.r_[known, new]
    assert unseen.separation["max_logit"]["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    assert unseen.separation["max_logit"]["fpr_at_95_tpr"] == pytest.approx(fpr[tpr >= 0.95].min())
    softmax = lambda z: np.exp(z.max(1) - np.log(np.exp(z).sum(1)))  # noqa: E731
    assert unseen.separation["max_softmax"]["auroc"] == pytest.approx(
        roc_auc_score(labels, np.r_[softmax(reference["logits"]["species"]),
                                    softmax(reference["unseen_logits"]["species"])]))
    energy = lambda z: np.log(np.exp(z).sum(1))  # noqa: E731
    assert unseen.separation["energy"]["auroc"] == pytest.approx(
        roc_auc_score(labels, np.r_[energy(reference["logits"]["species"]),
                                    energy(reference["unseen_logits"]["species"])]))
    assert unseen.known_unsure_at_leaf == pytest.approx(np.mean(reference["level"] < 2))


def test_write_produces_readable_report_metrics_and_images(report, tmp_path: Path) -> None:
    files = write_report(report, tmp_path / "report")
    expected = {"report", "metrics", "curves", "unseen", "confusion_order", "confusion_family", "confusion_species"}
    assert set(files) == expected
    for key in ("curves", "confusion_order", "confusion_family", "confusion_species"):
        with Image.open(files[key]) as image:
            image.verify()  # a complete, valid PNG
        with Image.open(files[key]) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
            # not a blank canvas: a plot has many colours
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
    metrics = json.loads(files["metrics"].read_text(encoding="utf-8"))
    assert metrics["rank_metrics"]["species"]["f1"] == pytest.approx(report.rank_metrics["species"]["f1"])
    assert metrics["confusion"]["family"]["columns"][-1] == UNSURE
    assert metrics["confusion"]["family"]["matrix"] == report.confusion["family"].tolist()
    assert metrics["history_epochs"] == 2
    text = files["report"].read_text(encoding="utf-8")
    assert "| model | order P | order R | order F1 | family P" in text
    f1 = report.rank_metrics["species"]["f1"]
    assert f"{f1:.3f}" in text
    for name in ("confusion_order.png", "curves.png", "Apidae sp. novum 1", "AUROC", "Lowest reliable rank"):
        assert name in text
    csv_lines = files["unseen"].read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("species,order,family,images,unsure_at_species")
    assert len(csv_lines) == 1 + len(report.unseen.classes) + 1


def test_the_curves_come_from_the_history_in_the_checkpoint(setup: dict, tmp_path: Path) -> None:
    """Every training run stores its per-epoch history in the completed checkpoint; without one, no curves."""
    from taxonet.checkpoint import load_checkpoint, save_checkpoint

    with_history = run_evaluation(setup["checkpoint"], setup["known"], device="cpu")
    assert [h["epoch"] for h in with_history.history] == [0, 1]
    assert sum(h["is_best"] for h in with_history.history) >= 1
    assert "curves" in write_report(with_history, tmp_path / "with")
    loaded = load_checkpoint(setup["checkpoint"])
    best = save_checkpoint(tmp_path / "run" / "best", loaded.model, loaded.taxonomy, loaded.config, loaded.transform,
                           thresholds=loaded.thresholds,
                           metrics={k: v for k, v in loaded.metrics.items() if k != "history"})
    no_history = run_evaluation(str(best), setup["known"], device="cpu")
    assert no_history.history == []
    files = write_report(no_history, tmp_path / "without")
    assert "curves" not in files and not (tmp_path / "without" / "curves.png").exists()
    assert "no curves" in files["report"].read_text(encoding="utf-8")


def test_evaluate_verb_takes_the_chain_rule(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`taxonet evaluate --chain-rule lenient` decides under that rule (the report and metrics.json say so); without
    the flag, the rule stored with the checkpoint's thresholds (strict) applies; an unknown rule is refused."""
    from taxonet.cli import main

    stored = load_checkpoint(setup["checkpoint"]).thresholds.chain_rule
    assert stored == "strict"
    for flag, expected in (([], "strict"), (["--chain-rule", "lenient"], "lenient")):
        out = tmp_path / f"report-{expected}"
        assert main(["evaluate", setup["checkpoint"], setup["known"], "--device", "cpu", "--out", str(out),
                     *flag]) == 0
        assert f"chain rule {expected}" in capsys.readouterr().out
        assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["chain_rule"] == expected
    with pytest.raises(SystemExit):
        main(["evaluate", setup["checkpoint"], setup["known"], "--chain-rule", "loose"])
    assert "invalid choice: 'loose'" in capsys.readouterr().err


def test_bad_inputs_are_refused_with_clear_errors(setup: dict) -> None:
    with pytest.raises(DatasetError, match="no split 'validation'.*splits are \\['test'\\]"):
        run_evaluation(setup["checkpoint"], setup["known"], split="validation", device="cpu")
    # the unseen dataset's species are not in the checkpoint: evaluating it as a known split is refused
    with pytest.raises(DatasetError, match="classes the checkpoint does not know.*sp. novum.*--unseen"):
        run_evaluation(setup["checkpoint"], setup["unseen"], split="unseen", device="cpu")
    # a dataset of known species only, given as "unseen"
    with pytest.raises(DatasetError, match="no image of a class unknown to the checkpoint.*known classes"):
        run_evaluation(setup["checkpoint"], setup["known"], unseen_uri=setup["known"], device="cpu")
    with pytest.raises(DatasetError, match="no dataset at"):
        run_evaluation(setup["checkpoint"], str(setup["root"] / "missing"), device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        run_evaluation(setup["checkpoint"], setup["known"], batch_size=0)


# ---------------------------------------------------------------------------------------------------- logic on
# controlled logits: the reliability bookkeeping, independent of how well a tiny model happens to train
def _peaked(rng: np.random.Generator, classes: np.ndarray, n_classes: int, height: float) -> np.ndarray:
    logits = rng.normal(0.0, 0.3, (len(classes), n_classes))
    logits[np.arange(len(classes)), classes] = rng.normal(height, 0.4, len(classes))
    return logits


def test_unseen_species_of_a_known_family_is_mostly_unsure_at_species_but_right_at_family() -> None:
    rng = np.random.default_rng(0)
    taxonomy = Taxonomy.demo()
    leaves = np.repeat(np.arange(taxonomy.num_classes("species")), 30)
    targets = np.asarray([taxonomy.ancestors("species", int(i)) for i in leaves])

    def outputs(species_height: float, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"order": _peaked(rng, rows[:, 0], taxonomy.num_classes("order"), 8.0),
                "family": _peaked(rng, rows[:, 1], taxonomy.num_classes("family"), 8.0),
                "species": _peaked(rng, rows[:, 2], taxonomy.num_classes("species"), species_height)}

    thresholds = AnomalyThresholds.fit(taxonomy, outputs(8.0, targets), targets, k=2.0)
    known_logits = outputs(8.0, targets[:90])
    # an unseen Apidae species: the model is sure of Hymenoptera > Apidae, and its best species logit is weak
    chain = ("Hymenoptera", "Apidae", "Apidae sp. novum 1")
    encoded, whole = encode_known_prefix(taxonomy, chain)
    assert not whole and encoded[2] == -1
    apidae = np.asarray([taxonomy.ancestors("species", taxonomy.index("species", "Bombus terrestris"))] * 40)
    unseen_logits = outputs(3.0, apidae)
    report = build_report(taxonomy, known_logits, targets[:90], thresholds=thresholds, split="test",
                          unseen=UnseenInputs("memory", unseen_logits, np.asarray([encoded] * 40), [chain] * 40))
    row = report.unseen.classes[0]
    assert row.name == chain[-1] and row.lineage == chain[:-1] and row.images == 40
    assert row.unsure_at_leaf >= 0.9 and row.flagged_at_leaf >= 0.9
    assert row.lowest_reliable["family"] >= 0.8 and row.correct_higher >= 0.8
    assert row.wrongly_reliable <= 0.05
    assert report.unseen.known_unsure_at_leaf <= 0.1
    assert report.unseen.separation["max_logit"]["auroc"] > 0.95
    # a wrong family reported as reliable counts as "wrongly reliable", never as "correct higher rank"
    wrong = ("Diptera", "Syrphidae", "Syrphidae sp. novum 1")
    wrong_encoded, _ = encode_known_prefix(taxonomy, wrong)
    report = build_report(taxonomy, known_logits, targets[:90], thresholds=thresholds,
                          unseen=UnseenInputs("memory", unseen_logits, np.asarray([wrong_encoded] * 40), [wrong] * 40))
    assert report.unseen.classes[0].correct_higher == 0.0
    assert report.unseen.classes[0].wrongly_reliable >= 0.8


def test_any_rank_names_and_depth_and_single_task_models(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    taxonomy = Taxonomy.from_rows([("Alpha", "a1"), ("Alpha", "a2"), ("Beta", "b1"), ("Beta", "b2")],
                                  ranks=("genus", "taxon"))
    leaves = np.repeat(np.arange(4), 10)
    targets = np.asarray([taxonomy.ancestors("taxon", int(i)) for i in leaves])
    logits = {"taxon": _peaked(rng, np.where(rng.random(40) < 0.8, leaves, rng.integers(0, 4, 40)), 4, 5.0)}
    report = build_report(taxonomy, logits, targets, thresholds=None, model_name="single")
    assert report.head_ranks == ["taxon"] and set(report.derived_metrics) == {"genus"}
    predicted_genus = taxonomy.parent_table("taxon")[logits["taxon"].argmax(1)]
    p, r, f, _ = precision_recall_fscore_support(targets[:, 0], predicted_genus, average="macro", zero_division=0)
    assert report.derived_metrics["genus"]["f1"] == pytest.approx(f)
    assert report.lowest_reliable is None and report.confusion["taxon"][:, -1].sum() == 0
    assert "| single | – | – | – |" in table4_markdown(report)
    files = write_report(report, tmp_path)
    assert {"confusion_genus", "confusion_taxon"} <= set(files) and "curves" not in files
    text = files["report"].read_text(encoding="utf-8")
    assert "genus (derived from the taxonomy)" in text and "no anomaly thresholds" in text
    assert not math.isnan(report.consistency) and report.consistency == 1.0


def test_checkpoint_dataset_and_report_on_s3(setup: dict, report, s3_bucket: str) -> None:
    """The same evaluation with everything on S3 (moto's server over HTTP) gives the same numbers."""
    from taxonet import storage
    from taxonet.checkpoint import publish_checkpoint
    from taxonet.experiment import evaluate_to_uri

    base = f"s3://{s3_bucket}"
    publish_checkpoint(setup["checkpoint"], f"{base}/runs/quick/best")
    storage.upload_dir(setup["known"], f"{base}/data/known")
    summary = evaluate_to_uri(f"{base}/runs/quick/best", f"{base}/data/known", "test", f"{base}/reports/quick")
    written = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(f"{base}/reports/quick")}
    assert {"report.md", "metrics.json", "curves.png", "confusion_order.png", "confusion_species.png"} <= written
    for rank, values in report.rank_metrics.items():
        assert summary["rank_metrics"][rank]["f1"] == pytest.approx(values["f1"])
    assert json.loads(storage.read_bytes(f"{base}/reports/quick/metrics.json"))["checkpoint"] == \
        f"{base}/runs/quick/best"
