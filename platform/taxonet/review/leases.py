"""Leases on queued crops, so that several reviewers never get the same crop at the same time.

A reviewer who is shown a crop holds a lease on it for ``ttl_s`` seconds (renewed each time it is shown again);
nobody else is shown it until the lease is released (a decision, or the reviewer moving on) or expires (a closed
laptop). A skip is remembered per reviewer for ``skip_s`` so the skipped crop goes to the others first. Leases live
in the review server's memory: one server process per queue (docs/review.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

#: default lease: long enough to look a crop up in a key, short enough that an abandoned one comes back soon
DEFAULT_TTL_S = 600.0
DEFAULT_SKIP_S = 3600.0


class Leases:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S, skip_s: float = DEFAULT_SKIP_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self.skip_s = skip_s
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}
        self._skipped: dict[tuple[str, str], float] = {}

    def holder(self, crop_id: str) -> str | None:
        """Who holds a live lease on the crop (None when nobody does)."""
        with self._lock:
            return self._live_holder(crop_id, self._clock())

    def _live_holder(self, crop_id: str, now: float) -> str | None:
        held = self._held.get(crop_id)
        if held is None:
            return None
        if held[1] <= now:
            del self._held[crop_id]
            return None
        return held[0]

    def available(self, crop_id: str, reviewer: str) -> bool:
        """Free or already the reviewer's."""
        return self.holder(crop_id) in (None, reviewer)

    def acquire(self, crop_ids: Iterable[str], reviewer: str) -> list[str]:
        """Lease (or renew) every crop that is free or the reviewer's; returns those now held by the reviewer."""
        granted = []
        with self._lock:
            now = self._clock()
            for crop in crop_ids:
                if self._live_holder(crop, now) in (None, reviewer):
                    self._held[crop] = (reviewer, now + self.ttl_s)
                    granted.append(crop)
        return granted

    def release(self, crop_ids: Iterable[str], reviewer: str) -> None:
        """Give back the reviewer's leases on these crops (others' leases are left alone)."""
        with self._lock:
            for crop in crop_ids:
                held = self._held.get(crop)
                if held is not None and held[0] == reviewer:
                    del self._held[crop]

    def release_all_but(self, keep: Iterable[str], reviewer: str) -> None:
        keep = set(keep)
        with self._lock:
            for crop, (holder, _) in list(self._held.items()):
                if holder == reviewer and crop not in keep:
                    del self._held[crop]

    def skip(self, crop_id: str, reviewer: str) -> None:
        with self._lock:
            self._skipped[(reviewer, crop_id)] = self._clock() + self.skip_s
            held = self._held.get(crop_id)
            if held is not None and held[0] == reviewer:
                del self._held[crop_id]

    def skipped(self, crop_id: str, reviewer: str) -> bool:
        with self._lock:
            until = self._skipped.get((reviewer, crop_id))
            if until is None:
                return False
            if until <= self._clock():
                del self._skipped[(reviewer, crop_id)]
                return False
            return True
