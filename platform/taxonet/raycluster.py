"""Connecting to Ray: the embedded local default, or an existing cluster (``--address`` / ``RAY_ADDRESS``).

Local development keeps everything on loopback and the CLIs usable without a token (ENVIRONMENT.md); on a cluster
Ray's own settings apply untouched.

An embedded Ray never outlives the command that started it: :func:`init` marks the session with an environment
variable that every process of it inherits (gcs_server, raylet, dashboard, workers and so Serve's controller, proxy
and replicas, whose command lines Ray rewrites), and :func:`shutdown` ends Ray, then kills whatever still carries
the mark.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray

log = logging.getLogger(__name__)

#: environment variable set to a fresh id before an embedded Ray starts; inherited by every process of its session
SESSION_ENV = "TAXONET_RAY_SESSION"


@dataclass(frozen=True)
class EmbeddedRay:
    """A local Ray started by this process: the mark its processes carry and its session directory."""

    mark: str
    session_dir: str


def local_defaults() -> None:
    """Environment for an embedded local Ray: loopback only, no auth token, no usage stats."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init(address: str | None = None, num_cpus: int | None = None, **kwargs: object) -> EmbeddedRay | None:
    """Join ``address`` (or $RAY_ADDRESS, or the job's cluster when run by ``ray job submit``), else start Ray here.

    Returns the :class:`EmbeddedRay` when it started one (pass it to :func:`shutdown`), None when it joined a
    cluster or Ray was already initialised.
    """
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
        return None
    local_defaults()
    mark = uuid.uuid4().hex
    os.environ[SESSION_ENV] = mark  # before ray.init: the processes it starts copy this environment
    log.info("starting an embedded local Ray (%s CPUs)", num_cpus or "all")
    # The dashboard (on loopback) serves Ray's state API, which Ray Train's placement-group cleaner polls: without
    # it every training run logs "Failed to query Ray Train Controller actor state" every few seconds.
    # address="local": a new Ray of its own, even when a cluster someone started with `ray start` runs on this
    # machine (ray.init() without an address would join that one, and then refuse num_cpus)
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       _node_ip_address="127.0.0.1", **kwargs)
    return EmbeddedRay(mark=mark, session_dir=str(context.address_info.get("session_dir", "")))


def shutdown(embedded: EmbeddedRay | None, timeout_s: float = 10.0) -> list[int]:
    """Disconnect from Ray; for an embedded Ray, end every process of its session within about ``timeout_s``.

    ``ray.shutdown`` stops the processes this driver started (and the raylet its workers); it runs in a daemon
    thread so a wedged cluster cannot hold the caller. Whatever still carries the session's mark afterwards gets
    SIGTERM, then SIGKILL. Returns the process ids that had to be signalled (empty when Ray ended cleanly).
    """
    done = threading.Event()

    def stop_ray() -> None:
        try:
            ray.shutdown()
        except Exception as exc:  # a cluster in a bad state: the processes are ended below anyway
            log.warning("ray.shutdown failed: %r", exc)
        finally:
            done.set()

    threading.Thread(target=stop_ray, name="taxonet-ray-shutdown", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    done.wait(timeout_s)
    if embedded is None:
        return []
    # a raylet's workers notice its exit on their own, a moment later: give them until the deadline
    while session_processes(embedded.mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    signalled = kill_session(embedded.mark)
    if signalled:
        log.warning("killed %d process(es) of the embedded Ray session %s left after shutdown: %s",
                    len(signalled), embedded.session_dir, signalled)
    return signalled


def session_processes(mark: str) -> list[int]:
    """Live processes (not this one, not zombies) whose environment carries ``SESSION_ENV=mark`` (Linux /proc)."""
    needle = f"{SESSION_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def kill_session(mark: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process of the session, SIGKILL those still there after ``grace_s``; returns their ids."""
    pids = session_processes(mark)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_processes(mark):
        time.sleep(0.1)
    for pid in session_processes(mark):
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
