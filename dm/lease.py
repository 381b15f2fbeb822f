"""A lease: a Redis lock with a TTL that its holder renews, so one process of several does a job."""

from __future__ import annotations

import time

from redis import Redis
from redis.exceptions import LockError, RedisError


class Lease:
    """A Redis lock with a TTL, renewed by calling :meth:`hold` more often than ``ttl / 3``."""

    def __init__(self, r: Redis, key: str, ttl: float) -> None:
        self.ttl = ttl
        self.lock = r.lock(key, timeout=ttl, blocking=False, thread_local=False)
        self.held = False
        self.renewed = 0.0

    def hold(self) -> bool:
        """Take or renew the lease; False while another process holds it."""
        now = time.monotonic()
        if self.held and now - self.renewed < self.ttl / 3:
            return True
        try:
            self.held = self.lock.reacquire() if self.held else self.lock.acquire(blocking=False)
        except LockError:  # it expired and another took it
            self.held = False
        if self.held:
            self.renewed = now
        return self.held

    def fresh(self) -> bool:
        """Held, and renewed recently enough to stay ours for a while yet (read-only: any thread)."""
        return self.held and time.monotonic() - self.renewed < self.ttl / 2

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.lock.release()
            except (LockError, RedisError):  # it expires by itself
                pass
