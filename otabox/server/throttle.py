"""Sliding-window counting of failed sign-ins (MQTT logins and console sign-ins)."""

from __future__ import annotations

import time
from collections import deque


class LoginLimiter:
    """Counts failed logins per key (a device from an address, an address, ...) in a sliding window."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def locked(self, *keys: str, limit: int | None = None) -> bool:
        """True when any key has `limit` (default: the limiter's) failures in the window."""
        now = time.monotonic()
        threshold = self.limit if limit is None else limit
        return any(len(self._recent(k, now)) >= threshold for k in keys)

    def count(self, key: str) -> int:
        return len(self._recent(key, time.monotonic()))

    def fail(self, *keys: str) -> None:
        now = time.monotonic()
        for k in keys:
            self._failures.setdefault(k, deque()).append(now)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)
