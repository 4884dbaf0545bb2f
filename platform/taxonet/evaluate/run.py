"""Running a checkpoint over a prepared dataset: load it (local, file:// or s3://; verified: manifest, every file's
sha256, nothing unlisted), read the Parquet split(s),
collect the model's logits, and hand them to :func:`taxonet.evaluate.report.build_report`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from taxonet.checkpoint import LoadedCheckpoint, load_checkpoint
from taxonet.data.dataset import DatasetInfo
from taxonet.data.pipeline import Collator, iter_parquet_batches
from taxonet.data.transforms import TransformSpec
from taxonet.devices import resolve_device
from taxonet.errors import DatasetError
from taxonet.evaluate.report import EvaluationReport, UnseenInputs, build_report, encode_known_prefix
from taxonet.taxonomy import UNSPECIFIED, Taxonomy, is_unspecified
from taxonet.train.loop import collect_logits

#: what _labelled_batches yields: images, targets, label chains (lenient mode) and rows of known leaves skipped
LabelledBatch = tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str | None, ...]], int]


def run_evaluation(checkpoint_uri: str, dataset_uri: str, *, split: str = "test", unseen_uri: str | None = None,
                   device: str = "auto", batch_size: int = 64, chain_rule: str | None = None) -> EvaluationReport:
    """Evaluate a checkpoint (local, file:// or s3://) on ``split`` of a prepared dataset, optionally with an
    unseen-species dataset (its ``unseen`` split if it has one, else all its splits).

    ``chain_rule``: decide the lowest reliable rank under this rule instead of the one stored with the checkpoint's
    thresholds (``anomaly.chain_rule``), to compare the strict and lenient rules on one model."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    torch_device = resolve_device(device)
    info = DatasetInfo.load(dataset_uri)
    if split not in info.splits:
        raise DatasetError(f"dataset {dataset_uri} has no split {split!r}; splits are {list(info.splits)}")
    unseen_info = DatasetInfo.load(unseen_uri) if unseen_uri else None  # fail on a bad URI before any model work
    # verified as a whole (every listed file's sha256, no unlisted file): a report names what it evaluated
    loaded = load_checkpoint(checkpoint_uri, device=torch_device, strict=True)
    taxonomy = loaded.taxonomy
    _check_dataset_fits(info, taxonomy, [split], dataset_uri)
    if unseen_info is not None:
        _check_dataset_fits(unseen_info, taxonomy, None, str(unseen_uri), leaves_may_differ=True)
    amp, channels_last = loaded.config.train.amp, loaded.config.train.channels_last
    skipped: dict[str, int] = {}
    batches = _labelled_batches(info, [split], taxonomy, loaded.transform, batch_size, lenient=False,
                                skipped_records=skipped)
    logits, targets = collect_logits(loaded.model, (b[:2] for b in batches), torch_device, amp=amp,
                                     channels_last=channels_last)
    if not len(targets):
        raise DatasetError(f"split {split!r} of {dataset_uri} holds no decodable image: nothing to evaluate"
                           + (f" (skipped: {skipped})" if skipped else ""))
    unseen = None
    unseen_skipped: dict[str, int] = {}
    if unseen_info is not None:
        unseen_splits = ["unseen"] if "unseen" in unseen_info.splits else list(unseen_info.splits)
        unseen = _collect_unseen(loaded, unseen_info, unseen_splits, batch_size, torch_device, unseen_skipped)
    model_name = f"{loaded.name} {loaded.version}".strip()
    thresholds = loaded.thresholds
    if thresholds is not None and chain_rule is not None:
        thresholds = thresholds.with_chain_rule(chain_rule)
    report = build_report(taxonomy, logits, targets, thresholds=thresholds, checkpoint=str(checkpoint_uri),
                          dataset=str(dataset_uri), split=split, model_name=model_name,
                          history=loaded.metrics.get("history", []), unseen=unseen)
    for where, counts in ((f"split {split!r}", skipped), ("the unseen dataset", unseen_skipped)):
        if counts:
            report.notes.append(f"{sum(counts.values())} record(s) of {where} could not be used and were left out "
                                f"({', '.join(f'{reason}: {n}' for reason, n in sorted(counts.items()))})")
    return report


def _check_dataset_fits(info: DatasetInfo, taxonomy: Taxonomy, splits: Sequence[str] | None, uri: str, *,
                        leaves_may_differ: bool = False) -> None:
    """The dataset's ranks must be the checkpoint's; its labels in ``splits`` must be known to the checkpoint
    (for an unseen dataset: every rank above the leaf may hold unknown names too, reported as such)."""
    if tuple(info.taxonomy.ranks) != tuple(taxonomy.ranks):
        raise DatasetError(f"dataset {uri} has ranks {list(info.taxonomy.ranks)} but the checkpoint was trained on "
                           f"{list(taxonomy.ranks)}")
    if leaves_may_differ:
        return
    classes = info.counts.get("classes", {})
    unknown = []
    for level, rank in enumerate(taxonomy.ranks):
        for name, per_split in classes.get(rank, {}).items():
            if (level, name) not in taxonomy and any(per_split.get(s, 0) for s in (splits or per_split)):
                unknown.append(f"{rank} {name!r}")
    if unknown:
        raise DatasetError(f"split(s) {list(splits or [])} of {uri} hold classes the checkpoint does not know: "
                           f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} (evaluate species unseen "
                           "in training with --unseen DATASET)")


def _labelled_batches(info: DatasetInfo, splits: Sequence[str], taxonomy: Taxonomy, transform: TransformSpec,
                      batch_size: int, *, lenient: bool, skipped_records: dict[str, int] | None = None
                      ) -> Iterator[LabelledBatch]:
    """(images, targets, label chains, rows of known leaves skipped) per batch of the given splits.

    Strict (the evaluated split): the pipeline's :class:`~taxonet.data.pipeline.Collator` decodes and encodes whole
    batches; labels the taxonomy does not know were refused before (:func:`_check_dataset_fits`), and the chains are
    not needed. ``lenient`` (unseen species): labels are encoded with :func:`encode_known_prefix`, rows whose leaf
    the taxonomy knows are dropped, and rows go through the collator one by one, so that an undecodable image (which
    the collator skips) cannot shift the label chains against the images. Records the collator skipped (corrupt
    images) are counted by reason into ``skipped_records``.
    """
    collate = Collator(taxonomy, transform, train=False)
    ranks = list(taxonomy.ranks)
    for split in splits:
        for raw in iter_parquet_batches(info.uri, split, batch_size, shuffle=False, columns=["image", *ranks]):
            if not lenient:
                images, targets = collate(raw)
                yield images, targets, [], 0
                continue
            columns = [_as_list(raw[rank]) for rank in ranks]
            skipped = 0
            images_kept, targets_kept, chains = [], [], []
            for i, row in enumerate(zip(*columns)):
                chain = tuple(None if is_unspecified(v) else str(v) for v in row)
                encoded, whole = encode_known_prefix(taxonomy, chain)
                if whole:
                    skipped += 1
                    continue
                # only the names the checkpoint knows reach the collator: the rest is "unspecified" (−1)
                one = {"image": [raw["image"][i]]}
                one.update({rank: [taxonomy.names[level][encoded[level]] if encoded[level] != UNSPECIFIED else None]
                            for level, rank in enumerate(ranks)})
                image, target = collate(one)
                if len(image):
                    images_kept.append(image)
                    targets_kept.append(target)
                    chains.append(chain)
            if not chains:
                yield None, None, [], skipped
                continue
            yield torch.cat(images_kept), torch.cat(targets_kept), chains, skipped
    if skipped_records is not None:
        for reason, count in collate.skipped_by_reason.items():
            skipped_records[reason] = skipped_records.get(reason, 0) + count


def _collect_unseen(loaded: LoadedCheckpoint, info: DatasetInfo, splits: list[str], batch_size: int,
                    device: torch.device, skipped_records: dict[str, int]) -> UnseenInputs:
    chains: list[tuple[str | None, ...]] = []
    skipped = [0]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets, batch_chains, batch_skipped in _labelled_batches(
                info, splits, loaded.taxonomy, loaded.transform, batch_size, lenient=True,
                skipped_records=skipped_records):
            skipped[0] += batch_skipped
            if images is None:
                continue
            chains.extend(batch_chains)
            yield images, targets

    logits, targets = collect_logits(loaded.model, batches(), device, amp=loaded.config.train.amp,
                                     channels_last=loaded.config.train.channels_last)
    if not chains:
        raise DatasetError(f"unseen dataset {info.uri} (split(s) {splits}) holds no image of a class unknown to the "
                           f"checkpoint" + (f": all {skipped[0]} images are of known classes" if skipped[0] else ""))
    return UnseenInputs(dataset=str(info.uri), logits=logits, targets=targets, chains=chains, splits=splits,
                        skipped_known=skipped[0])


def _as_list(values: Any) -> list[Any]:
    return values.tolist() if hasattr(values, "tolist") else list(values)
