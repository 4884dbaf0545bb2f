"""Connecting to Ray: the embedded local default, or an existing cluster (``--address`` / ``RAY_ADDRESS``).

Local development keeps everything on loopback and the CLIs usable without a token (ENVIRONMENT.md); on a cluster
Ray's own settings apply untouched.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def local_defaults() -> None:
    """Environment for an embedded local Ray: loopback only, no auth token, no usage stats."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init(address: str | None = None, num_cpus: int | None = None, **kwargs: object) -> None:
    """Join ``address`` (or $RAY_ADDRESS, or the job's cluster when run by ``ray job submit``), else start Ray here."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
        return
    local_defaults()
    log.info("starting an embedded local Ray (%s CPUs)", num_cpus or "all")
    # The dashboard (on loopback) serves Ray's state API, which Ray Train's placement-group cleaner polls: without
    # it every training run logs "Failed to query Ray Train Controller actor state" every few seconds.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             **kwargs)
