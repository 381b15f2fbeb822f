"""One retry delay for every loop that waits out an outage: ``first``, doubled after each
failure up to ``cap``, with up to 20% jitter so a fleet that lost a server together does
not come back in lockstep."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, first: float = 0.5, cap: float = 10.0, jitter: float = 0.2) -> None:
        self.first, self.cap, self.jitter = first, cap, jitter
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt (and count a failure)."""
        delay = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return delay * random.uniform(1.0 - self.jitter, 1.0)

    def reset(self) -> None:
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0
