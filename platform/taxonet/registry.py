"""Model registry: immutable, numbered model versions and movable aliases on plain storage (no server).

Layout below a registry root ``MODELS`` (local directory or ``s3://bucket/prefix``)::

    MODELS/NAME/versions/000001/        an immutable checkpoint; its manifest (checkpoint.json, every file with
                                        sha256) is written last — a version exists once, and only once, it has one
    MODELS/NAME/aliases/production.json {"model", "alias", "version", "updated", "history": [...]}, one write
    MODELS/NAME/claims/000001.json      who took version number 1 (created exclusively: the number's lock)
    MODELS/NAME/staging/<id>/           uploads in progress (or abandoned by a killed publish); never read

A **model reference** is a checkpoint URI (``s3://bucket/runs/x/best``) or ``MODELS/NAME@ALIAS``
(``s3://taxonet/models/resnet50_mtl@production``); ``MODELS/NAME@12`` pins version 12. :func:`resolve` turns a
reference into the checkpoint to load plus a fingerprint that changes whenever what it points at changes, which is
what a server polls.

Publishing (:func:`publish`) uploads into ``staging/``, verifies the upload, then claims the next number with an
exclusive create (:func:`taxonet.storage.create_new`: ``link(2)`` locally, ``PUT If-None-Match: *`` on S3), copies
the files into ``versions/N/`` and writes the manifest last. Two runs publishing at once get two numbers; a
publish killed at any step leaves either nothing visible or a complete version — aliases and existing versions
are never touched by it. Promotion (:func:`promote`) verifies the version (every file's sha256, no unlisted file)
and refuses a taxonomy change unless asked; :func:`rollback` returns an alias to its previous version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from taxonet import storage
from taxonet.checkpoint import (
    MANIFEST,
    manifest_bytes,
    parse_manifest,
    read_listed_json,
    taxonomy_differences,
    verify_checkpoint,
)
from taxonet.config import ALIAS_PATTERN, MODEL_NAME_PATTERN
from taxonet.errors import CheckpointError, StorageError
from taxonet.taxonomy import Taxonomy

log = logging.getLogger(__name__)

VERSIONS = "versions"
ALIASES = "aliases"
CLAIMS = "claims"
STAGING = "staging"
#: version directories are zero-padded so that they sort by number in any listing
VERSION_DIGITS = 6
#: how many previous targets an alias remembers (rollback goes back through them)
HISTORY_LIMIT = 100
#: give up claiming after this many numbers taken by others (only a storm of concurrent publishes gets near it)
MAX_CLAIM_ATTEMPTS = 1000
_VERSION_DIR = re.compile(r"^\d{1,9}$")
_CLAIM_FILE = re.compile(r"^(\d{1,9})\.json$")


class RegistryError(CheckpointError):
    """A registry operation refused: bad reference, unknown alias, a promotion that would change the taxonomy."""


class NotPublishedError(RegistryError):
    """The reference names an alias or version that does not exist (yet): a server keeps waiting for it."""


# ---------------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class ModelReference:
    """A parsed model reference: either ``checkpoint`` (a plain checkpoint URI) or ``models``/``name`` with an
    ``alias`` or a pinned ``version``."""

    text: str
    checkpoint: str | None = None
    models: str | None = None
    name: str | None = None
    alias: str | None = None
    version: int | None = None

    @property
    def is_registry(self) -> bool:
        return self.name is not None

    def __str__(self) -> str:
        return self.text


def parse_reference(reference: str) -> ModelReference:
    """``MODELS/NAME@ALIAS`` / ``MODELS/NAME@12`` → registry reference; anything else → a checkpoint URI.

    The URI is checked (an unsupported scheme such as ``gs://`` raises StorageError).
    """
    text = storage.check_uri(str(reference).strip())
    head, _, last = text.rstrip("/").rpartition("/")
    if "@" in last:
        name, _, target = last.rpartition("@")
        if MODEL_NAME_PATTERN.match(name) and (ALIAS_PATTERN.match(target) or target.isdigit()):
            models = head or "."
            if target.isdigit():
                if int(target) < 1:
                    raise RegistryError(f"model reference {text!r}: versions start at 1")
                return ModelReference(text, models=models, name=name, version=int(target))
            return ModelReference(text, models=models, name=name, alias=target)
        raise RegistryError(f"model reference {text!r}: expected MODELS/NAME@ALIAS (alias: a letter, then letters, "
                            "digits, '_' or '-') or MODELS/NAME@VERSION")
    return ModelReference(text, checkpoint=text)


def split_model(model: str) -> tuple[str, str]:
    """``MODELS/NAME`` → ``(MODELS, NAME)``, the name checked."""
    text = storage.check_uri(str(model).strip()).rstrip("/")
    models, _, name = text.rpartition("/")
    _check_name(name)
    return models or ".", name


def _check_name(name: str) -> str:
    if not MODEL_NAME_PATTERN.match(name or ""):
        raise RegistryError(f"invalid model name {name!r}: letters, digits, '.', '_' and '-' (up to 128 characters)")
    return name


def _check_alias(alias: str) -> str:
    if not ALIAS_PATTERN.match(alias or ""):
        raise RegistryError(f"invalid alias {alias!r}: a letter, then letters, digits, '_' or '-' (up to 64)")
    return alias


def model_uri(models: str, name: str) -> str:
    return storage.join(models, _check_name(name))


def version_uri(models: str, name: str, version: int) -> str:
    return storage.join(model_uri(models, name), VERSIONS, f"{int(version):0{VERSION_DIGITS}d}")


def alias_uri(models: str, name: str, alias: str) -> str:
    return storage.join(model_uri(models, name), ALIASES, f"{_check_alias(alias)}.json")


# ---------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class AliasRecord:
    model: str
    alias: str
    version: int
    updated: str
    #: previous targets, oldest first: ``{"version": N, "updated": when it became the target}``
    history: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "alias": self.alias, "version": self.version, "updated": self.updated,
                "history": [dict(h) for h in self.history]}

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "AliasRecord":
        try:
            raw = json.loads(data)
            return cls(model=str(raw["model"]), alias=str(raw["alias"]), version=int(raw["version"]),
                       updated=str(raw.get("updated", "")),
                       history=tuple({"version": int(h["version"]), "updated": str(h.get("updated", ""))}
                                     for h in raw.get("history", [])))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"alias file {where} is corrupt ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class ResolvedModel:
    """What a reference points at now. ``fingerprint`` (sha256 of the manifest) changes whenever the checkpoint
    at ``uri`` changes — also when a plain checkpoint URI is re-published in place — so a follower reloads on it."""

    reference: str
    uri: str
    name: str
    version: str
    alias: str | None
    fingerprint: str
    #: the registry version number (None for a plain checkpoint URI)
    number: int | None = None


@dataclass(frozen=True)
class VersionInfo:
    name: str
    number: int
    uri: str
    created: str
    source: dict[str, Any]
    aliases: tuple[str, ...] = ()
    bytes: int = 0
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.number, "uri": self.uri, "created": self.created,
                "aliases": list(self.aliases), "bytes": self.bytes, "source": self.source}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------------- reading
def read_alias(models: str, name: str, alias: str) -> AliasRecord | None:
    uri = alias_uri(models, name, alias)
    try:
        data = storage.read_bytes(uri, replaced_in_place=True)  # promote replaces it while servers poll
    except FileNotFoundError:
        return None
    return AliasRecord.from_bytes(data, uri)


def list_aliases(models: str, name: str) -> dict[str, AliasRecord]:
    found = {}
    for entry, is_dir in storage.list_children(storage.join(model_uri(models, name), ALIASES)).items():
        alias = entry[:-len(".json")] if entry.endswith(".json") else ""
        if not is_dir and ALIAS_PATTERN.match(alias):
            record = read_alias(models, name, alias)
            if record is not None:
                found[alias] = record
    return found


def list_models(models: str) -> list[str]:
    """Model names under a registry root (directories that hold versions or aliases)."""
    names = []
    for entry, is_dir in storage.list_children(models).items():
        if is_dir and MODEL_NAME_PATTERN.match(entry):
            children = storage.list_children(storage.join(models, entry))
            if VERSIONS in children or ALIASES in children:
                names.append(entry)
    return names


def _numbers_below(uri: str, pattern: re.Pattern[str], want_dir: bool) -> list[int]:
    numbers = []
    for entry, is_dir in storage.list_children(uri).items():
        match = pattern.match(entry)
        if match and is_dir == want_dir:
            numbers.append(int(match.group(1) if match.groups() else entry))
    return sorted(numbers)


def list_versions(models: str, name: str) -> list[VersionInfo]:
    """The visible versions of a model, oldest first: directories whose manifest exists and parses. A directory
    without one (a publish still running or killed) is not a version. Files are not hashed here (see verify)."""
    base = model_uri(models, name)
    aliases = list_aliases(models, name)
    out = []
    for number in _numbers_below(storage.join(base, VERSIONS), _VERSION_DIR, want_dir=True):
        uri = version_uri(models, name, number)
        try:
            manifest = parse_manifest(manifest_bytes(uri), uri)
        except CheckpointError as exc:
            log.debug("skipping %s: %s", uri, exc)
            continue
        out.append(VersionInfo(
            name=name, number=number, uri=uri, created=str(manifest.get("created", "")),
            source=dict(manifest.get("source") or {}),
            aliases=tuple(sorted(a for a, r in aliases.items() if r.version == number)),
            bytes=sum(int(i["bytes"]) for i in manifest["files"].values()), manifest=manifest))
    return out


def resolve(reference: str | ModelReference) -> ResolvedModel:
    """The checkpoint a reference points at now (NotPublishedError when the alias or version does not exist yet).

    Cheap enough to poll: one or two small reads (the alias and the manifest), no file hashing; verify or load the
    returned ``uri`` before serving it.
    """
    ref = reference if isinstance(reference, ModelReference) else parse_reference(reference)
    if not ref.is_registry:
        data = manifest_bytes(ref.checkpoint)
        manifest = parse_manifest(data, ref.checkpoint)
        return ResolvedModel(reference=ref.text, uri=ref.checkpoint, name=str(manifest.get("name", "taxonet")),
                             version=str(manifest.get("version", "")), alias=None,
                             fingerprint=hashlib.sha256(data).hexdigest())
    number = ref.version
    if ref.alias is not None:
        record = read_alias(ref.models, ref.name, ref.alias)
        if record is None:
            raise NotPublishedError(f"{ref.text}: alias {ref.alias!r} of model {ref.name!r} does not exist yet "
                                    f"(nothing promoted to it under {ref.models})")
        number = record.version
    uri = version_uri(ref.models, ref.name, number)
    try:
        data = manifest_bytes(uri)
    except CheckpointError:
        raise NotPublishedError(f"{ref.text}: version {number} of model {ref.name!r} is not published "
                                f"(no {MANIFEST} in {uri})") from None
    parse_manifest(data, uri)
    return ResolvedModel(reference=ref.text, uri=uri, name=ref.name, version=str(number), alias=ref.alias,
                         fingerprint=hashlib.sha256(data).hexdigest(), number=number)


def verify(reference: str | ModelReference) -> dict[str, Any]:
    """Fully verify what a reference points at (every file's sha256, nothing unlisted, no escaping key) and return
    its manifest. For a registry reference the version must be exactly what was published."""
    resolved = resolve(reference)
    return verify_checkpoint(resolved.uri, allow_extra_files=resolved.number is None)


def show(reference: str | ModelReference, *, check: bool = True) -> dict[str, Any]:
    """A description of what a reference points at: resolution, manifest summary, metrics, aliases, verification."""
    try:
        resolved = resolve(reference)
        manifest = parse_manifest(manifest_bytes(resolved.uri), resolved.uri)
    except NotPublishedError:
        raise
    except CheckpointError as exc:  # a version whose manifest itself is refused: say so rather than fail
        return {"reference": str(reference), "verified": False, "verify_error": str(exc)}
    out: dict[str, Any] = {
        "reference": resolved.reference, "uri": resolved.uri, "name": resolved.name, "version": resolved.version,
        "alias": resolved.alias, "fingerprint": resolved.fingerprint, "created": manifest.get("created"),
        "source": manifest.get("source"), "files": {n: i["bytes"] for n, i in manifest["files"].items()},
    }
    try:
        metrics = read_listed_json(resolved.uri, "metrics.json", manifest)
        out["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        taxonomy = Taxonomy.from_dict(read_listed_json(resolved.uri, "taxonomy.json", manifest))
        out["taxonomy"] = {rank: taxonomy.num_classes(rank) for rank in taxonomy.ranks}
    except CheckpointError as exc:
        out["metrics"], out["taxonomy"] = None, None
        out["read_error"] = str(exc)
    ref = parse_reference(resolved.reference)
    if ref.is_registry:
        out["aliases"] = {a: r.to_dict() for a, r in list_aliases(ref.models, ref.name).items()}
    if check:
        try:
            verify_checkpoint(resolved.uri, allow_extra_files=resolved.number is None)
            out["verified"], out["verify_error"] = True, None
        except CheckpointError as exc:
            out["verified"], out["verify_error"] = False, str(exc)
    return out


# ---------------------------------------------------------------------------------------------------- publishing
def _next_number(models: str, name: str) -> int:
    base = model_uri(models, name)
    taken = _numbers_below(storage.join(base, CLAIMS), _CLAIM_FILE, want_dir=False)
    taken += _numbers_below(storage.join(base, VERSIONS), _VERSION_DIR, want_dir=True)
    return max(taken, default=0) + 1


def _claim(models: str, name: str, claim: dict[str, Any]) -> int:
    """Take the next free version number: an exclusive create of ``claims/N.json``; taken → try N+1."""
    number = _next_number(models, name)
    for _ in range(MAX_CLAIM_ATTEMPTS):
        uri = storage.join(model_uri(models, name), CLAIMS, f"{number:0{VERSION_DIGITS}d}.json")
        if storage.create_new(uri, json.dumps({**claim, "version": number}, indent=2).encode("utf-8")):
            return number
        log.info("version %d of %s was claimed by another publish; trying %d", number, name, number + 1)
        number += 1
    raise RegistryError(f"could not claim a version number for {name} after {MAX_CLAIM_ATTEMPTS} attempts")


def publish(checkpoint: str | os.PathLike, models: str, name: str) -> int:
    """Publish a checkpoint (local directory or URI) as the next version of ``MODELS/NAME``; returns its number.

    Steps, each safe to be killed after: (1) the source is verified and its listed files are copied into
    ``staging/<id>/``, then read back and hashed; (2) a version number is claimed exclusively; (3) the files are
    copied into ``versions/N/`` (server-side on S3) and (4) the manifest is written last, naming the model, the
    number and the source; (5) the staging copy is removed. Until (4) completes nothing is visible; no alias moves.
    """
    _check_name(name)
    source = str(checkpoint)
    models = storage.check_uri(models).rstrip("/") or "."
    storage.check_writable(models)
    manifest = verify_checkpoint(source, allow_extra_files=True)  # a run's directory may hold more; only listed go
    base = model_uri(models, name)
    publish_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:12]}"
    staging = storage.join(base, STAGING, publish_id)
    for file in manifest["files"]:
        storage.copy_file(storage.join(source, file), storage.join(staging, file))
    for file, info in manifest["files"].items():  # read the upload back: what gets a number is what was verified
        _check_staged(staging, file, info)
    claim = {"model": name, "publish_id": publish_id, "source": source, "host": socket.gethostname(),
             "pid": os.getpid(), "claimed": _now()}
    number = _claim(models, name, claim)
    target = version_uri(models, name, number)
    for file in manifest["files"]:
        storage.copy_file(storage.join(staging, file), storage.join(target, file))
    present = storage.list_relative(target)
    for file, info in manifest["files"].items():
        if present.get(file) != info["bytes"]:
            raise RegistryError(f"publishing {source} as {name} version {number}: {file} was not copied whole")
    version_manifest = {
        "format_version": manifest["format_version"], "name": name, "version": str(number), "created": _now(),
        "source": {"uri": source, "name": manifest.get("name"), "version": manifest.get("version"),
                   "created": manifest.get("created"), "publish_id": publish_id},
        "files": manifest["files"],
    }
    storage.write_bytes(storage.join(target, MANIFEST), json.dumps(version_manifest, indent=2).encode("utf-8"))
    storage.delete_tree(staging)
    log.info("published %s as %s version %d (%s)", source, name, number, target)
    return number


def _check_staged(staging: str, file: str, info: dict[str, Any]) -> None:
    digest, size = hashlib.sha256(), 0
    with storage.open_input(storage.join(staging, file)) as stream:
        for block in iter(lambda: stream.read(storage.CHUNK_BYTES), b""):
            digest.update(block)
            size += len(block)
    if size != info["bytes"] or digest.hexdigest() != info["sha256"]:
        raise RegistryError(f"upload of {file} to {staging} does not match the checkpoint (corrupted in transit); "
                            "nothing was published")


# ---------------------------------------------------------------------------------------------------- aliases
def _version_taxonomy(models: str, name: str, number: int) -> Taxonomy:
    uri = version_uri(models, name, number)
    manifest = parse_manifest(manifest_bytes(uri), uri)
    return Taxonomy.from_dict(read_listed_json(uri, "taxonomy.json", manifest))


def _verify_version(models: str, name: str, number: int, action: str) -> None:
    uri = version_uri(models, name, number)
    try:
        verify_checkpoint(uri)
    except CheckpointError as exc:
        raise RegistryError(f"refusing to {action} {name} version {number}: it does not verify: {exc}") from None


def promote(models: str, name: str, version: int, alias: str, allow_taxonomy_change: bool = False) -> AliasRecord:
    """Point ``alias`` at ``version`` after verifying it; the alias file is replaced in one write.

    Refused (RegistryError, alias unchanged): a version that does not exist or does not verify; a version whose
    taxonomy differs from that of the alias's current version, unless ``allow_taxonomy_change`` (clients of an
    alias expect its labels). Promoting the current version again changes nothing.
    """
    _check_alias(alias)
    version = int(version)
    _verify_version(models, name, version, f"promote to {alias!r}")
    current = read_alias(models, name, alias)
    if current is not None and current.version == version:
        return current
    if current is not None and not allow_taxonomy_change:
        try:
            old = _version_taxonomy(models, name, current.version)
        except CheckpointError as exc:  # the current target is broken: replacing it is the point
            log.warning("alias %s of %s: current version %d unreadable (%s); not comparing taxonomies", alias, name,
                        current.version, exc)
        else:
            differences = taxonomy_differences(old, _version_taxonomy(models, name, version),
                                               old_label=f"version {current.version}", new_label=f"version {version}")
            if differences:
                raise RegistryError(f"refusing to promote {name} version {version} to {alias!r}: its taxonomy differs "
                                    f"from version {current.version} now behind it: {'; '.join(differences)}; "
                                    "pass --allow-taxonomy-change if clients expect the new labels")
    history = (*current.history, {"version": current.version, "updated": current.updated}) if current else ()
    record = AliasRecord(model=name, alias=alias, version=version, updated=_now(),
                         history=tuple(history[-HISTORY_LIMIT:]))
    _write_alias(models, name, record)
    log.info("alias %s of %s now points at version %d", alias, name, version)
    return record


def rollback(models: str, name: str, alias: str) -> AliasRecord:
    """Point ``alias`` back at the version it pointed at before the current one (which must still verify)."""
    _check_alias(alias)
    current = read_alias(models, name, alias)
    if current is None:
        raise NotPublishedError(f"{model_uri(models, name)}@{alias}: no such alias")
    if not current.history:
        raise RegistryError(f"{model_uri(models, name)}@{alias}: no previous version to roll back to "
                            f"(it has pointed only at version {current.version})")
    previous = current.history[-1]
    _verify_version(models, name, int(previous["version"]), f"roll {alias!r} back to")
    record = AliasRecord(model=name, alias=alias, version=int(previous["version"]), updated=_now(),
                         history=current.history[:-1])
    _write_alias(models, name, record)
    log.info("alias %s of %s rolled back from version %d to %d", alias, name, current.version, record.version)
    return record


def _write_alias(models: str, name: str, record: AliasRecord) -> None:
    storage.write_bytes(alias_uri(models, name, record.alias), json.dumps(record.to_dict(), indent=2).encode("utf-8"))


# ---------------------------------------------------------------------------------------------------- training hooks
@dataclass(frozen=True)
class PublishedRun:
    models: str
    name: str
    version: int
    alias: AliasRecord | None
    #: True when the checkpoint was already published as ``version`` (same files, same hashes): nothing new written
    reused: bool = False

    @property
    def reference(self) -> str:
        """The new version, pinned: ``MODELS/NAME@N``."""
        return f"{model_uri(self.models, self.name)}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """What ``taxonet train`` prints under ``"published"``."""
        model = model_uri(self.models, self.name)
        return {"model": model, "name": self.name, "version": self.version, "reference": self.reference,
                "alias": self.alias.alias if self.alias else None,
                "alias_reference": f"{model}@{self.alias.alias}" if self.alias else None, "reused": self.reused}


def check_publish_target(config: Any) -> None:
    """Fail before training if the run's ``registry:`` section cannot be published to (bad URI, no bucket)."""
    if config.registry.uri:
        _check_name(config.registry.name or config.name)
        storage.check_writable(config.registry.uri)


def publish_run(checkpoint: str, config: Any) -> PublishedRun | None:
    """What a finished training run does with its best checkpoint: publish it as the next version of
    ``registry.name`` (default: the config's name) under ``registry.uri`` and move ``registry.promote`` to it
    (:func:`publish`, :func:`promote`: verified, the taxonomy-change rule). None when ``registry.uri`` is empty.

    A checkpoint whose files (names and sha256) are exactly those of a published version is not published again:
    that version is reused (a retried job, or a rerun of a finished run, which trains nothing new). Either failure
    raises RegistryError saying what exists and the command that finishes the job by hand; the checkpoint itself is
    never touched. A refused promotion raises after the version is published.
    """
    registry = config.registry
    if not registry.uri:
        return None
    name = registry.name or config.name
    model = model_uri(registry.uri, name)
    alias_flag = f" --alias {registry.promote}" if registry.promote else ""
    try:
        number = _published_as(checkpoint, registry.uri, name)
        reused = number is not None
        if number is None:
            number = publish(checkpoint, registry.uri, name)
        else:
            log.info("%s is already published as %s version %d (same files): not publishing it again", checkpoint,
                     name, number)
    except (CheckpointError, StorageError, OSError) as exc:
        raise RegistryError(f"could not publish {checkpoint} as a new version of {model}: {exc} (nothing was "
                            f"published; retry with `taxonet models publish {checkpoint} {model}{alias_flag}`)"
                            ) from exc
    record = None
    if registry.promote:
        try:
            record = promote(registry.uri, name, number, registry.promote)
        except (CheckpointError, StorageError, OSError) as exc:
            raise RegistryError(f"published {name} version {number}, but did not promote it to "
                                f"{registry.promote!r}: {exc} ({model}@{number} exists, the alias is unchanged; "
                                f"promote by hand with `taxonet models promote {model} {number} --alias "
                                f"{registry.promote}`)") from exc
    return PublishedRun(models=registry.uri, name=name, version=number, alias=record, reused=reused)


def _published_as(checkpoint: str, models: str, name: str) -> int | None:
    """The newest version whose files (names, sizes, sha256) are exactly those the checkpoint's manifest lists and
    that verifies, or None."""
    files = parse_manifest(manifest_bytes(checkpoint), checkpoint)["files"]
    for version in reversed(list_versions(models, name)):
        if version.manifest["files"] == files:
            try:
                verify_checkpoint(version.uri)
            except CheckpointError as exc:
                log.warning("%s version %d lists the same files but does not verify (%s): publishing anew", name,
                            version.number, exc)
                continue
            return version.number
    return None
