"""Serving follows a model reference: what one classifier replica polls, verifies, loads, refuses and remembers.

Pure logic (no Ray, no HTTP): :class:`taxonet.serve.app.TaxonetClassifier` calls :meth:`ModelFollower.poll` every
``model_poll_s`` in a worker thread and swaps in what it returns between batches.

A reference is a checkpoint URI or ``MODELS/NAME@ALIAS`` / ``MODELS/NAME@N`` (:func:`taxonet.registry.resolve`).
What it points at is identified by its manifest's sha256 (the *fingerprint*), not by a URI string, so both an alias
that moved and a checkpoint re-published in place at the same URI are seen. A new target is fully verified (every
listed file's sha256, no unlisted file in a registry version, no key escaping it) before it is loaded; a target that
fails verification or loading is refused, logged and remembered by fingerprint, so it is not tried again until what
the reference points at changes. Every replica verifies for itself: one started after a refusal refuses the same
version (it never trusts another replica's word, nor a version because an alias names it).

While nothing is loaded the replica is *waiting*: nothing published yet, or only refused targets. It keeps polling;
``/readyz`` and ``/v1/classify`` answer 503 with ``Retry-After`` meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from taxonet.checkpoint import verify_checkpoint
from taxonet.errors import CheckpointError, StorageError
from taxonet.registry import NotPublishedError, ResolvedModel, model_uri, parse_reference, read_alias, resolve

log = logging.getLogger(__name__)

M = TypeVar("M")  # the loaded model (a Predictor in serving; anything in tests)

#: previous alias targets a replica without a model tries in one poll when the alias's target is refused
HISTORY_TRIES = 3
#: what a poll did
UNCHANGED, LOADED, REFUSED, WAITING, FAILED = "unchanged", "loaded", "refused", "waiting", "failed"


class ModelNotReady(RuntimeError):
    """No model is loaded yet on this replica (nothing published, or every candidate refused): answer 503."""


@dataclass(frozen=True)
class Served(Generic[M]):
    """A loaded model and what it was loaded from."""

    resolved: ResolvedModel
    model: M
    loaded_at: float


@dataclass(frozen=True)
class Refusal:
    """A target that failed verification or loading; not tried again while the reference points at it."""

    reference: str
    uri: str
    version: str
    fingerprint: str
    error: str
    at: float

    def to_dict(self) -> dict[str, str]:
        return {"reference": self.reference, "uri": self.uri, "version": self.version,
                "fingerprint": self.fingerprint, "error": self.error, "at": _iso(self.at)}


@dataclass(frozen=True)
class PollResult(Generic[M]):
    """One poll's outcome: ``LOADED`` (``served`` is the new model: swap it in), ``UNCHANGED`` (also: the target
    is one refused before), ``WAITING`` (nothing published), ``REFUSED`` (a new target failed verification or
    loading: a load failure) or ``FAILED`` (the reference could not be read or a file not fetched: storage down, a
    corrupt alias; retried next poll, a failure each time)."""

    outcome: str
    served: Served[M] | None = None
    message: str | None = None

    @property
    def is_failure(self) -> bool:
        return self.outcome in (REFUSED, FAILED)


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


@dataclass
class ModelFollower(Generic[M]):
    """Follows ``reference``; ``load`` turns a verified :class:`ResolvedModel` into a model (e.g. a Predictor).

    ``fallback`` (optional) is a second reference used only while nothing is loaded and ``reference`` yields
    nothing loadable: a replica started after a refused in-place rollout serves the application's own reference
    instead of nothing. Not thread-safe: call :meth:`poll` from one place at a time.
    """

    reference: str
    load: Callable[[ResolvedModel], M]
    fallback: str | None = None
    current: Served[M] | None = None
    #: the last poll's problem (refusal, storage error, or "not published yet"); None after a poll that found
    #: the current model still current or loaded a new one
    last_error: str | None = None
    last_error_at: float | None = None
    last_poll_at: float | None = None
    load_failures: int = 0
    refused: dict[str, Refusal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_reference(self.reference)  # a malformed reference or unsupported scheme fails here, clearly
        if self.fallback is not None:
            parse_reference(self.fallback)

    def follow(self, reference: str) -> None:
        """Follow another reference from the next poll on; the current model stays until a new one loads."""
        parse_reference(reference)
        self.reference = reference

    def poll(self) -> PollResult[M]:
        """Resolve the reference; load what it points at if that is new, verified and not refused before.

        While nothing is loaded and the reference yields nothing loadable, the alias's previous targets (newest
        first; what replicas that were running when it moved still serve) and then ``fallback`` are tried.
        """
        self.last_poll_at = time.time()
        result = self._try(self.reference)
        if result.outcome == LOADED or self.current is not None:
            return result
        for candidate in self._fallbacks():
            fallback = self._try(candidate, quiet=True)
            if fallback.outcome == LOADED:
                assert fallback.served is not None
                log.warning("taxonet: %s yields no loadable model (%s); serving %s (version %s) meanwhile",
                            self.reference, result.message, candidate, fallback.served.resolved.version)
                # still a failed attempt at the followed reference: say so until that one loads
                self.last_error = f"{result.message}; serving {candidate} meanwhile"
                self.last_error_at = time.time()
                return PollResult(LOADED, fallback.served, result.message)
        return result

    def _fallbacks(self) -> list[str]:
        """Previous targets of a followed alias (newest first, at most :data:`HISTORY_TRIES`), then ``fallback``."""
        out = []
        ref = parse_reference(self.reference)
        if ref.is_registry and ref.alias is not None:
            try:
                record = read_alias(ref.models, ref.name, ref.alias)
            except Exception as exc:  # the alias itself unreadable: nothing to walk back through
                log.debug("alias history of %s unreadable: %s", self.reference, exc)
                record = None
            if record is not None:
                previous = [int(h["version"]) for h in reversed(record.history) if h["version"] != record.version]
                out += [f"{model_uri(ref.models, ref.name)}@{v}" for v in dict.fromkeys(previous)][:HISTORY_TRIES]
        if self.fallback and self.fallback != self.reference:
            out.append(self.fallback)
        return out

    def _try(self, reference: str, quiet: bool = False) -> PollResult[M]:
        try:
            resolved = resolve(reference)
        except NotPublishedError as exc:
            return self._problem(WAITING, str(exc), quiet=quiet)
        except CheckpointError as exc:  # a corrupt alias or manifest: refused until it changes
            key = f"unresolvable:{reference}:{exc}"
            if key in self.refused:
                return PollResult(UNCHANGED, message=self.refused[key].error)
            self.load_failures += not quiet
            message = f"refused {reference}: {exc}"
            self.refused[key] = Refusal(reference, reference, "", key, message, time.time())
            return self._problem(REFUSED, message, log_level=logging.ERROR, quiet=quiet)
        except Exception as exc:  # storage unreachable, corrupt alias or manifest: retried next poll
            self.load_failures += not quiet
            return self._problem(FAILED, f"could not resolve {reference}: {exc}", log_level=logging.ERROR,
                                 quiet=quiet)
        if self.current is not None and resolved.fingerprint == self.current.resolved.fingerprint:
            if reference == self.reference:
                self.last_error = self.last_error_at = None
            return PollResult(UNCHANGED)
        refusal = self.refused.get(resolved.fingerprint)
        if refusal is not None:  # refused before: nothing new (not another failure)
            return PollResult(UNCHANGED, message=refusal.error)
        try:
            # registry versions hold exactly their listed files; a run's own checkpoint may hold more (Ray Train)
            verify_checkpoint(resolved.uri, allow_extra_files=resolved.number is None)
            model = self.load(resolved)
        except (StorageError, OSError) as exc:  # the store, not the version: try again next poll
            self.load_failures += not quiet
            return self._problem(FAILED, f"could not load {resolved.uri} (version {resolved.version}) of "
                                         f"{reference}: {exc}", log_level=logging.ERROR, quiet=quiet)
        except Exception as exc:  # verification or load failed: refuse this exact target
            self.load_failures += 1
            message = (f"refused {resolved.name} version {resolved.version} ({resolved.uri}) of {reference}: "
                       f"{type(exc).__name__}: {exc}")
            self.refused[resolved.fingerprint] = Refusal(reference, resolved.uri, resolved.version,
                                                         resolved.fingerprint, message, time.time())
            return self._problem(REFUSED, message, log_level=logging.ERROR, quiet=quiet)
        self.current = Served(resolved, model, time.time())
        self.last_error = self.last_error_at = None
        log.info("taxonet: loaded %s version %s from %s (%s)", resolved.name, resolved.version, resolved.uri,
                 reference)
        return PollResult(LOADED, self.current)

    def _problem(self, outcome: str, message: str, log_level: int = logging.INFO,
                 quiet: bool = False) -> PollResult[M]:
        """A poll that loaded nothing; ``quiet`` for a fallback candidate (the followed reference's problem is the
        one reported)."""
        if quiet:
            log.info("taxonet: fallback %s", message)
            return PollResult(outcome, message=message)
        if self.current is not None:
            message = f"{message}; still serving version {self.current.resolved.version}"
        if message != self.last_error:  # once per new problem, not every poll
            log.log(log_level, "taxonet: %s", message)
        self.last_error, self.last_error_at = message, time.time()
        return PollResult(outcome, message=message)

    def status(self) -> dict[str, object]:
        """What GET /v1/model adds: the reference, the live version, the last attempt's error, refused versions."""
        current = self.current
        live = None
        if current is not None:
            resolved = current.resolved
            live = {"name": resolved.name, "version": resolved.version, "uri": resolved.uri,
                    "reference": resolved.reference, "fingerprint": resolved.fingerprint,
                    "loaded": _iso(current.loaded_at)}
        return {
            "model_reference": self.reference,
            "ready": current is not None,
            "live": live,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at) if self.last_error_at else None,
            "last_poll": _iso(self.last_poll_at) if self.last_poll_at else None,
            "load_failures": self.load_failures,
            "refused": [r.to_dict() for r in self.refused.values()],
        }

