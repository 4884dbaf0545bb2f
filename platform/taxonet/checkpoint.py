"""Checkpoints: everything serving and evaluation need, in one directory (local, or S3 via storage/Ray Train).

Layout::

    model.pt          state_dict, loaded with ``weights_only=True``
    model.json        architecture (backbone, hidden, dropout, heads) + name/version
    taxonomy.json     the taxonomy the heads index into
    config.json       the resolved run config
    transform.json    the eval transform (input size, normalisation)
    thresholds.json   per-rank anomaly thresholds (+ thresholds.csv, the same table for people)
    metrics.json      validation metrics of the epoch that produced it
    train_state.pt    optimiser state and epoch (resume only; serving ignores it)
    checkpoint.json   manifest with sha256 of every file — written LAST

A directory without ``checkpoint.json``, or whose files do not match it, is refused: an interrupted write never
yields a checkpoint that serving would load half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taxonet.errors import CheckpointError
from taxonet.taxonomy import Taxonomy

FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    taxonomy: Taxonomy
    config: Any  # taxonet.config.RunConfig
    transform: Any  # taxonet.data.transforms.TransformSpec
    thresholds: Any | None  # taxonet.anomaly.AnomalyThresholds
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    path: str
    train_state: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.get("name", "taxonet")

    @property
    def version(self) -> str:
        return self.manifest.get("version", "")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_manifest(directory: str | Path, name: str | None = None, version: str | None = None) -> dict[str, Any]:
    """(Re)write checkpoint.json over the files now in ``directory``; call it last."""
    directory = Path(directory)
    old = read_manifest(directory, verify=False) if (directory / MANIFEST).exists() else {}
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or old.get("name", "taxonet"),
        "version": version or old.get("version") or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    tmp = directory / (MANIFEST + ".tmp")
    _write_json(tmp, manifest)
    os.replace(tmp, directory / MANIFEST)  # atomic: the manifest is either old or new, never partial
    return manifest


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{directory} is not a complete taxonet checkpoint (no {MANIFEST}; "
                              "an interrupted write or the wrong directory)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {manifest.get('format_version')} is not supported "
                              f"(this taxonet reads format {FORMAT_VERSION})")
    if verify:
        for name, info in manifest.get("files", {}).items():
            file = directory / name
            if not file.exists():
                raise CheckpointError(f"{directory}: file {name} listed in {MANIFEST} is missing")
            if file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
                raise CheckpointError(f"{directory}: file {name} does not match {MANIFEST} (corrupt or partial)")
    return manifest


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    taxonomy: Taxonomy,
    config: Any,
    transform: Any,
    *,
    thresholds: Any | None = None,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    name: str | None = None,
    version: str | None = None,
) -> Path:
    """Write a complete checkpoint into ``directory`` (created; existing files replaced; manifest last)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # invalid until the new manifest is written
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    torch.save(state, directory / "model.pt")
    model_config = config.model
    _write_json(directory / "model.json", {
        "backbone": model_config.backbone,
        "hidden": model_config.hidden,
        "dropout": model_config.dropout,
        "single_task": model_config.single_task,
        "heads": list(getattr(module, "ranks", taxonomy.ranks)),
    })
    _write_json(directory / "taxonomy.json", taxonomy.to_dict())
    _write_json(directory / "config.json", config.to_dict())
    _write_json(directory / "transform.json", transform.to_dict())
    _write_json(directory / "metrics.json", metrics or {})
    if thresholds is not None:
        _write_thresholds(directory, thresholds)
    if train_state is not None:
        torch.save(train_state, directory / "train_state.pt")
    write_manifest(directory, name=name or config.name, version=version)
    return directory


def _write_thresholds(directory: Path, thresholds: Any) -> None:
    _write_json(directory / "thresholds.json", thresholds.to_dict())
    thresholds.save(directory / "thresholds.csv")


def add_thresholds(directory: str | Path, thresholds: Any, metrics: dict[str, Any] | None = None) -> None:
    """Store anomaly thresholds (and extra metrics) in an existing local checkpoint, manifest last."""
    directory = Path(directory)
    read_manifest(directory)
    (directory / MANIFEST).rename(directory / (MANIFEST + ".old"))
    _write_thresholds(directory, thresholds)
    if metrics:
        merged = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
        merged.update(metrics)
        _write_json(directory / "metrics.json", merged)
    old = json.loads((directory / (MANIFEST + ".old")).read_text(encoding="utf-8"))
    (directory / (MANIFEST + ".old")).unlink()
    write_manifest(directory, name=old.get("name"), version=old.get("version"))


def materialize(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the checkpoint at ``uri`` (downloaded from S3 when needed)."""
    text = str(uri)
    if text.startswith("s3://"):
        from taxonet import storage

        target = Path(cache_dir or tempfile.mkdtemp(prefix="taxonet-ckpt-"))
        storage.download_dir(text, target)
        return target
    local = Path(text.removeprefix("file://"))
    if not local.is_dir():
        raise CheckpointError(f"checkpoint {text} not found (expected a directory)")
    return local


def load_checkpoint(uri: str | Path, device: str | torch.device = "cpu", *, load_train_state: bool = False,
                    cache_dir: str | Path | None = None) -> LoadedCheckpoint:
    """Load a checkpoint directory (local path, file:// or s3://) into an eval-mode model on ``device``."""
    from taxonet.anomaly import AnomalyThresholds
    from taxonet.config import from_dict
    from taxonet.data.transforms import TransformSpec
    from taxonet.models import HierarchicalClassifier, build_backbone

    directory = materialize(uri, cache_dir)
    manifest = read_manifest(directory)
    try:
        taxonomy = Taxonomy.from_dict(json.loads((directory / "taxonomy.json").read_text(encoding="utf-8")))
        config = from_dict(json.loads((directory / "config.json").read_text(encoding="utf-8")))
        transform = TransformSpec.from_dict(json.loads((directory / "transform.json").read_text(encoding="utf-8")))
        arch = json.loads((directory / "model.json").read_text(encoding="utf-8"))
        metrics = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {uri} is unreadable: {exc}") from exc
    backbone, dim = build_backbone(arch["backbone"], None)  # weights come from model.pt
    heads = {rank: taxonomy.num_classes(rank) for rank in arch["heads"]}
    model = HierarchicalClassifier(backbone, dim, heads, hidden=arch["hidden"], dropout=arch["dropout"])
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {uri}: weights do not fit the architecture: {exc}") from exc
    model.to(device).eval()
    thresholds = None
    if (directory / "thresholds.json").exists():
        thresholds = AnomalyThresholds.from_dict(
            json.loads((directory / "thresholds.json").read_text(encoding="utf-8")), taxonomy=taxonomy)
    train_state = None
    if load_train_state and (directory / "train_state.pt").exists():
        train_state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=True)
    return LoadedCheckpoint(model=model, taxonomy=taxonomy, config=config, transform=transform,
                            thresholds=thresholds, metrics=metrics, manifest=manifest, path=str(uri),
                            train_state=train_state)


def copy_checkpoint(source: str | Path, target: str | Path) -> None:
    """Copy a verified local checkpoint; the target's manifest is copied last so readers never see it half-done."""
    source, target = Path(source), Path(target)
    read_manifest(source)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.name != MANIFEST:
            shutil.copy2(file, tmp / file.name)
    shutil.copy2(source / MANIFEST, tmp / MANIFEST)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def publish_checkpoint(local_dir: str | Path, uri: str) -> str:
    """Publish a verified local checkpoint to ``uri`` (local path or s3://) so readers never see it half-written.

    The target's old manifest is removed first and the new one uploaded last: during the upload the target is not
    a loadable checkpoint, before it is the old one, after it the new one.
    """
    from taxonet import storage

    local_dir = Path(local_dir)
    read_manifest(local_dir)
    if not storage.is_s3(uri):
        copy_checkpoint(local_dir, Path(uri.removeprefix("file://")))
        return uri
    storage.delete_files([storage.join(uri, MANIFEST)])
    for file in sorted(local_dir.iterdir()):
        if file.is_file() and file.name != MANIFEST:
            storage.write_bytes(storage.join(uri, file.name), file.read_bytes())
    storage.write_bytes(storage.join(uri, MANIFEST), (local_dir / MANIFEST).read_bytes())
    return uri
