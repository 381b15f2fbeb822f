"""Each deployment's cpu and memory use, read from its group (its cgroup's counters, or
/proc for the fallback): cores since the previous reading, and MiB now."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.containment.base import Group

MIB = 1024 * 1024


@dataclass(frozen=True)
class Use:
    cpu: float  # cores
    memory: float  # MiB
    memory_limit: float  # MiB

    def to_dict(self) -> dict[str, float]:
        return {"cpu": round(self.cpu, 3), "memory": round(self.memory, 1), "memory_limit": self.memory_limit}


class Meter:
    def __init__(self, groups: Callable[[], dict[str, Group]]) -> None:
        self.groups = groups
        self._last: dict[str, tuple[float, float]] = {}  # group name -> (cpu seconds, monotonic time)

    def read(self) -> dict[str, Use]:
        """The use of each deployment's group now (cpu: 0 at a group's first reading)."""
        now = time.monotonic()
        seen: dict[str, tuple[float, float]] = {}
        out: dict[str, Use] = {}
        for dep_id, group in self.groups().items():
            seconds = group.cpu_seconds()
            before = self._last.get(group.name)
            cores = max(0.0, (seconds - before[0]) / (now - before[1])) if before and now > before[1] else 0.0
            seen[group.name] = (seconds, now)
            out[dep_id] = Use(cores, group.memory() / MIB, group.limits.memory_mib)
        self._last = seen
        return out
