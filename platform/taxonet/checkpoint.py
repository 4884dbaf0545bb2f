"""Checkpoints: everything serving and evaluation need, in one directory (local, or S3 through :mod:`taxonet.storage`).

Layout::

    model.pt          state_dict, loaded with ``weights_only=True``
    model.json        architecture (backbone, hidden, dropout, heads) + name/version
    taxonomy.json     the taxonomy the heads index into
    config.json       the resolved run config
    transform.json    the eval transform (input size, normalisation)
    thresholds.json   per-rank anomaly thresholds (+ thresholds.csv, the same table for people)
    metrics.json      validation metrics of the epoch that produced it
    train_state.pt    optimiser state and epoch (resume only; serving ignores it)
    checkpoint.json   manifest: every file with its size and sha256 — written LAST

The manifest is the checkpoint. A directory without one is not a checkpoint (an interrupted write); the manifest
lists exactly the files its writer produced (:func:`write_manifest` is told which; it never adopts whatever else
lies in the directory), and readers read only listed files and check each against its sha256 — a stale
``thresholds.json`` left beside new weights is never loaded. :func:`verify_checkpoint` checks a whole directory:
every listed file present with its size and hash, no unlisted file (what the model registry requires of a
version), no key that escapes the directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taxonet import storage
from taxonet.anomaly import AnomalyThresholds
from taxonet.config import from_dict
from taxonet.data.transforms import TransformSpec
from taxonet.errors import CheckpointError
from taxonet.models import HierarchicalClassifier, build_backbone
from taxonet.taxonomy import Taxonomy

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
#: what a complete checkpoint must list (serving and evaluation read all of these)
REQUIRED_FILES = ("model.pt", "model.json", "taxonomy.json", "config.json", "transform.json", "metrics.json")
#: every file taxonet writes into a checkpoint; :func:`write_manifest` lists these when not told otherwise
KNOWN_FILES = REQUIRED_FILES + ("thresholds.json", "thresholds.csv", "train_state.pt")
#: model-config fields a resume must match (``weights`` only says how a fresh run initialises: irrelevant there)
ARCHITECTURE_FIELDS = ("backbone", "hidden", "dropout", "single_task")


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


# ---------------------------------------------------------------------------------------------------- manifest
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(directory: str | Path, name: str | None = None, version: str | None = None, *,
                   files: Iterable[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``checkpoint.json`` for a local checkpoint directory; call it last, after every listed file is written.

    ``files`` are the relative paths the writer produced; without it, the :data:`KNOWN_FILES` present are listed.
    Any other file in the directory is left out (and so never read). ``name``/``version`` default to the previous
    manifest's; ``extra`` adds top-level keys (the registry records where a version came from).
    """
    directory = Path(directory)
    old = parse_manifest((directory / MANIFEST).read_bytes(), directory) if (directory / MANIFEST).exists() else {}
    if files is None:
        names = [n for n in KNOWN_FILES if (directory / n).is_file()]
        ignored = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in KNOWN_FILES
                         and p.name != MANIFEST and not p.name.startswith("."))
        if ignored:
            log.info("checkpoint %s: not listing files taxonet did not write: %s", directory, ignored)
    else:
        names = sorted({_safe_name(n, directory) for n in files} - {MANIFEST})
    listed = {}
    for name_ in sorted(names):
        path = directory.joinpath(*name_.split("/"))
        if not path.is_file():
            raise CheckpointError(f"{directory}: cannot list {name_} in {MANIFEST}: no such file")
        listed[name_] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or old.get("name", "taxonet"),
        "version": version or old.get("version") or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "created": _now(),
        **(extra or {}),
        "files": listed,
    }
    storage.write_bytes(str(directory / MANIFEST), _manifest_bytes(manifest))  # atomic: old or new, never partial
    return manifest


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")


def _safe_name(name: str, where: Any) -> str:
    try:
        return storage.safe_relative(name)
    except storage.UnsafePathError as exc:
        raise CheckpointError(f"checkpoint {where}: {exc}") from None


def parse_manifest(data: bytes, where: Any) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: {MANIFEST} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{where}: {MANIFEST} is corrupt: no 'files' table")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format {manifest.get('format_version')} is not supported "
                              f"(this taxonet reads format {FORMAT_VERSION})")
    for name, info in manifest["files"].items():
        if _safe_name(name, where) != name or name == MANIFEST:
            raise CheckpointError(f"checkpoint {where}: {MANIFEST} lists a file under an unusual name {name!r}")
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)):
            raise CheckpointError(f"{where}: {MANIFEST} entry for {name} has no sha256/bytes")
    return manifest


def manifest_bytes(uri: str | Path) -> bytes:
    """The raw bytes of a checkpoint's manifest (a missing one is a CheckpointError saying what that means)."""
    try:
        return storage.read_bytes(storage.join(str(uri), MANIFEST))
    except FileNotFoundError:
        raise CheckpointError(f"{uri} is not a complete taxonet checkpoint (no {MANIFEST}; an interrupted write or "
                              "the wrong directory)") from None


def read_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint (local directory or URI); with ``verify``, every listed file is hashed too."""
    manifest = parse_manifest(manifest_bytes(directory), directory)
    if verify:
        for name, info in manifest["files"].items():
            _check_digest(directory, name, info, _hash_stream(directory, name))
    return manifest


def _hash_stream(uri: str | Path, name: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        with storage.open_input(storage.join(str(uri), name)) as stream:
            for block in iter(lambda: stream.read(storage.CHUNK_BYTES), b""):
                digest.update(block)
                size += len(block)
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: file {name} listed in {MANIFEST} is missing") from None
    return digest.hexdigest(), size


def _check_digest(uri: str | Path, name: str, info: dict[str, Any], found: tuple[str, int]) -> None:
    sha256, size = found
    if size != info["bytes"]:
        raise CheckpointError(f"{uri}: file {name} does not match {MANIFEST}: {size} bytes, it lists "
                              f"{info['bytes']} (corrupt or partial)")
    if sha256 != info["sha256"]:
        raise CheckpointError(f"{uri}: file {name} does not match its sha256 in {MANIFEST} (corrupt or replaced)")


def _check_listing(uri: str | Path, manifest: dict[str, Any], *, allow_extra_files: bool) -> None:
    """Every listed file present with its size (one listing, no reads); unlisted files refused unless allowed."""
    try:
        present = storage.list_relative(str(uri))
    except storage.UnsafePathError as exc:
        raise CheckpointError(f"checkpoint {uri} holds a file whose key escapes it: {exc}") from None
    for name, info in manifest["files"].items():
        if name not in present:
            raise CheckpointError(f"{uri}: file {name} listed in {MANIFEST} is missing")
        if present[name] != info["bytes"]:
            raise CheckpointError(f"{uri}: file {name} does not match {MANIFEST}: {present[name]} bytes, it "
                                  f"lists {info['bytes']} (corrupt or partial)")
    extra = sorted(set(present) - set(manifest["files"]) - {MANIFEST})
    if extra and not allow_extra_files:
        raise CheckpointError(f"{uri}: files not listed in {MANIFEST}: {extra[:5]} (a checkpoint holds exactly the "
                              "files its manifest lists)")


def verify_checkpoint(uri: str | Path, *, allow_extra_files: bool = False) -> dict[str, Any]:
    """Check a whole checkpoint (local or S3) and return its manifest; CheckpointError says what is wrong.

    Checked: the manifest parses and lists the required files under safe names; every listed file exists with its
    size and sha256 (streamed, nothing kept on disk); no key below the directory escapes it; and, unless
    ``allow_extra_files`` (a run's own checkpoints, where Ray Train may add metadata), no unlisted file.
    """
    manifest = parse_manifest(manifest_bytes(uri), uri)
    missing = [n for n in REQUIRED_FILES if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{uri}: {MANIFEST} does not list {missing} (not a complete checkpoint)")
    _check_listing(uri, manifest, allow_extra_files=allow_extra_files)
    for name, info in manifest["files"].items():
        _check_digest(uri, name, info, _hash_stream(uri, name))
    return manifest


def read_verified(uri: str | Path, names: Iterable[str], *, allow_extra_files: bool = True
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Verify a whole checkpoint (local or S3) as :func:`verify_checkpoint` does and return its manifest and the
    listed files ``names``, each read once, straight into memory (nothing written to disk) and checked against its
    sha256; the other listed files are hashed streamed. A file in ``names`` that the manifest does not list is a
    CheckpointError. What a resume reads: never a half-written or tampered checkpoint."""
    text = str(uri)
    manifest = parse_manifest(manifest_bytes(text), text)
    missing = [n for n in REQUIRED_FILES if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{text}: {MANIFEST} does not list {missing} (not a complete checkpoint)")
    _check_listing(text, manifest, allow_extra_files=allow_extra_files)
    wanted = set(names)
    files = {name: read_listed(text, name, manifest) for name in sorted(wanted)}
    for name, info in manifest["files"].items():
        if name not in wanted:
            _check_digest(text, name, info, _hash_stream(text, name))
    return manifest, files


def read_listed(uri: str | Path, name: str, manifest: dict[str, Any]) -> bytes:
    """One file of a checkpoint, only if the manifest lists it, checked against its sha256."""
    info = manifest["files"].get(name)
    if info is None:
        raise CheckpointError(f"{uri}: {MANIFEST} does not list {name}")
    try:
        data = storage.read_bytes(storage.join(str(uri), name))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: file {name} listed in {MANIFEST} is missing") from None
    _check_digest(uri, name, info, (hashlib.sha256(data).hexdigest(), len(data)))
    return data


def read_listed_json(uri: str | Path, name: str, manifest: dict[str, Any]) -> Any:
    try:
        return json.loads(read_listed(uri, name, manifest))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{uri}: {name} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------------- writing
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
    """Write a complete checkpoint into local ``directory`` (created; listed files replaced; manifest last)."""
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
    written = list(REQUIRED_FILES)
    if thresholds is not None:
        written += _write_thresholds(directory, thresholds)
    if train_state is not None:
        torch.save(train_state, directory / "train_state.pt")
        written.append("train_state.pt")
    write_manifest(directory, name=name or config.name, version=version, files=written)
    return directory


def _write_thresholds(directory: Path, thresholds: Any) -> list[str]:
    _write_json(directory / "thresholds.json", thresholds.to_dict())
    thresholds.save(directory / "thresholds.csv")
    return ["thresholds.json", "thresholds.csv"]


def add_thresholds(directory: str | Path, thresholds: Any, metrics: dict[str, Any] | None = None) -> None:
    """Store anomaly thresholds (and extra metrics) in an existing local checkpoint, manifest last."""
    directory = Path(directory)
    old = read_manifest(directory)
    (directory / MANIFEST).unlink()  # not a checkpoint while its files change
    written = set(old["files"]) | set(_write_thresholds(directory, thresholds))
    if metrics:
        merged = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
        merged.update(metrics)
        _write_json(directory / "metrics.json", merged)
    write_manifest(directory, name=old.get("name"), version=old.get("version"), files=written)


def copy_checkpoint(source: str | Path, target: str | Path) -> None:
    """Copy a verified checkpoint (local or URI) into a local directory, replacing ``target`` only when complete.

    Only listed files are copied, into a sibling ``.partial`` directory that is verified, then swapped in: the old
    target is moved aside (not deleted) until the new one is in place, so a failure at any point leaves the old
    checkpoint whole (or, between the two renames, briefly no directory — never a half one).
    """
    target = Path(target)
    manifest = read_manifest(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    partial = target.with_name(f".{target.name}.partial-{token}")
    try:
        _copy_listed(source, partial, manifest)
        verify_checkpoint(partial)
        aside = target.with_name(f".{target.name}.old-{token}")
        if target.exists():
            os.replace(target, aside)
        try:
            os.replace(partial, target)
        except OSError:
            if aside.exists():
                os.replace(aside, target)  # put the old checkpoint back
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _copy_listed(source: str | Path, target: str | Path, manifest: dict[str, Any]) -> None:
    """Copy the listed files, then the manifest (verbatim) last."""
    for name in manifest["files"]:
        storage.copy_file(storage.join(str(source), name), storage.join(str(target), name))
    storage.write_bytes(storage.join(str(target), MANIFEST), manifest_bytes(source))


def publish_checkpoint(local_dir: str | Path, uri: str) -> str:
    """Publish a verified checkpoint to ``uri`` (local or S3) so readers never load it half-written.

    A local target is replaced by :func:`copy_checkpoint`. On S3 the old manifest is removed first and the new one
    written last; files the new manifest does not list are deleted after it. A reader in between finds no manifest
    (not a checkpoint) or hashes that do not match (refused) — never a mix. For versions that readers follow while
    they change, publish to the model registry (:mod:`taxonet.registry`) instead: its versions never change.
    """
    manifest = read_manifest(local_dir)
    if storage.is_local(uri):
        copy_checkpoint(local_dir, storage.local_path(uri))
        return uri
    storage.delete_files([storage.join(uri, MANIFEST)])
    _copy_listed(local_dir, uri, manifest)
    stale = [storage.join(uri, n) for n in storage.list_relative(uri) if n not in manifest["files"] and n != MANIFEST]
    storage.delete_files(stale)
    return uri


# ---------------------------------------------------------------------------------------------------- reading
def materialize(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the checkpoint at ``uri``: the directory itself when local; otherwise the listed
    files are downloaded (and verified) into ``cache_dir`` — or a new temporary directory the caller must remove;
    prefer :func:`local_checkpoint`, which removes it."""
    text = str(uri)
    if storage.is_local(text):
        local = storage.local_path(text)
        if not local.is_dir():
            raise CheckpointError(f"checkpoint {text} not found (expected a directory)")
        return local
    target = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="taxonet-ckpt-"))
    manifest = parse_manifest(manifest_bytes(text), text)
    _copy_listed(text, str(target), manifest)
    read_manifest(target)
    return target


@contextmanager
def local_checkpoint(uri: str | Path) -> Iterator[Path]:
    """A local directory with the checkpoint at ``uri`` for the ``with`` block; a download is removed afterwards."""
    if storage.is_local(str(uri)):
        yield materialize(uri)
        return
    with tempfile.TemporaryDirectory(prefix="taxonet-ckpt-") as tmp:
        yield materialize(uri, Path(tmp) / "checkpoint")


def load_checkpoint(uri: str | Path, device: str | torch.device = "cpu", *, load_train_state: bool = False,
                    cache_dir: str | Path | None = None, strict: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint (local path, file:// or s3://) into an eval-mode model on ``device``.

    Only files the manifest lists are read, straight into memory (nothing is written to disk, also from S3), each
    checked against its sha256; every listed file must be present with its size. ``thresholds.json`` and
    ``train_state.pt`` are used only when listed. ``strict`` makes it a full :func:`verify_checkpoint` (every listed
    file hashed, no unlisted file): what serving a registry version needs. ``cache_dir`` is accepted for old
    callers and unused.
    """
    del cache_dir  # files are streamed into memory now: no download directory to leak
    text = str(uri)
    if storage.is_local(text) and not storage.local_path(text).is_dir():
        raise CheckpointError(f"checkpoint {text} not found (expected a directory)")
    manifest = parse_manifest(manifest_bytes(text), text)
    missing = [n for n in REQUIRED_FILES if n not in manifest["files"]]
    if missing:
        raise CheckpointError(f"{text}: {MANIFEST} does not list {missing} (not a complete checkpoint)")
    _check_listing(text, manifest, allow_extra_files=not strict)
    wanted = set(REQUIRED_FILES) | {"thresholds.json"} | ({"train_state.pt"} if load_train_state else set())
    if strict:  # hash what is not read below, streamed
        for name, info in manifest["files"].items():
            if name not in wanted:
                _check_digest(text, name, info, _hash_stream(text, name))
    try:
        taxonomy = Taxonomy.from_dict(read_listed_json(text, "taxonomy.json", manifest))
        config = from_dict(read_listed_json(text, "config.json", manifest))
        transform = TransformSpec.from_dict(read_listed_json(text, "transform.json", manifest))
        arch = read_listed_json(text, "model.json", manifest)
        metrics = read_listed_json(text, "metrics.json", manifest)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {uri} is unreadable: {exc}") from exc
    backbone, dim = build_backbone(arch["backbone"], None)  # weights come from model.pt
    heads = {rank: taxonomy.num_classes(rank) for rank in arch["heads"]}
    model = HierarchicalClassifier(backbone, dim, heads, hidden=arch["hidden"], dropout=arch["dropout"])
    state = torch.load(io.BytesIO(read_listed(text, "model.pt", manifest)), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {uri}: weights do not fit the architecture: {exc}") from exc
    model.to(device).eval()
    thresholds = None
    if "thresholds.json" in manifest["files"]:
        thresholds = AnomalyThresholds.from_dict(read_listed_json(text, "thresholds.json", manifest),
                                                 taxonomy=taxonomy)
    train_state = None
    if load_train_state and "train_state.pt" in manifest["files"]:
        train_state = torch.load(io.BytesIO(read_listed(text, "train_state.pt", manifest)), map_location="cpu",
                                 weights_only=True)
    return LoadedCheckpoint(model=model, taxonomy=taxonomy, config=config, transform=transform,
                            thresholds=thresholds, metrics=metrics, manifest=manifest, path=text,
                            train_state=train_state)


# ---------------------------------------------------------------------------------------------------- compatibility
def taxonomy_differences(old: Taxonomy, new: Taxonomy, *, old_label: str = "checkpoint",
                         new_label: str = "run") -> list[str]:
    """What differs between two taxonomies, one line per difference (empty when equal)."""
    if old == new:
        return []
    if old.ranks != new.ranks:
        return [f"taxonomy ranks differ: {old_label} {list(old.ranks)}, {new_label} {list(new.ranks)}"]
    differences = []
    for level, rank in enumerate(old.ranks):
        before, after = old.names[level], new.names[level]
        added = [n for n in after if n not in set(before)]
        removed = [n for n in before if n not in set(after)]
        if added or removed:
            parts = []
            if added:
                parts.append(f"{len(added)} only in the {new_label} ({', '.join(added[:5])}"
                             f"{', ...' if len(added) > 5 else ''})")
            if removed:
                parts.append(f"{len(removed)} only in the {old_label} ({', '.join(removed[:5])}"
                             f"{', ...' if len(removed) > 5 else ''})")
            differences.append(f"taxonomy rank {rank}: classes differ: {'; '.join(parts)}")
        elif before != after:
            differences.append(f"taxonomy rank {rank}: same classes in another order (head indices would change)")
        elif old.parents[level] != new.parents[level]:
            differences.append(f"taxonomy rank {rank}: same classes under other parents")
    return differences or ["taxonomy differs"]


def _checkpoint_parts(checkpoint: LoadedCheckpoint | str | Path) -> tuple[Taxonomy, dict[str, Any], str]:
    if isinstance(checkpoint, LoadedCheckpoint):
        return checkpoint.taxonomy, checkpoint.config.to_dict().get("model", {}), checkpoint.path
    text = str(checkpoint)
    manifest = parse_manifest(manifest_bytes(text), text)
    taxonomy = Taxonomy.from_dict(read_listed_json(text, "taxonomy.json", manifest))
    return taxonomy, dict(read_listed_json(text, "config.json", manifest).get("model", {})), text


def check_compatible(checkpoint: LoadedCheckpoint | str | Path, config: Any, taxonomy: Taxonomy) -> list[str]:
    """Differences that make ``checkpoint`` unfit to resume (or evaluate) the run ``config`` on ``taxonomy``:
    the taxonomy (ranks, classes, their order and parents) and the model architecture. Empty when compatible.

    ``checkpoint`` is a loaded checkpoint or a URI (then only its JSON files are read, checked against the manifest).
    """
    old_taxonomy, old_model, _ = _checkpoint_parts(checkpoint)
    differences = taxonomy_differences(old_taxonomy, taxonomy)
    new_model = config.to_dict().get("model", {})
    for key in ARCHITECTURE_FIELDS:
        if old_model.get(key) != new_model.get(key):
            differences.append(f"model.{key}: checkpoint {old_model.get(key)!r}, run {new_model.get(key)!r}")
    return differences


def require_compatible(checkpoint: LoadedCheckpoint | str | Path, config: Any, taxonomy: Taxonomy,
                       action: str = "resume from") -> None:
    """:func:`check_compatible`, raising CheckpointError with every difference in the message."""
    differences = check_compatible(checkpoint, config, taxonomy)
    if differences:
        where = checkpoint.path if isinstance(checkpoint, LoadedCheckpoint) else str(checkpoint)
        raise CheckpointError(f"cannot {action} {where}: it does not match this run: " + "; ".join(differences))

