"""What a node holds each deployment to, behind one small interface.

A :class:`Containment` makes one :class:`Group` per started process tree: the kernel's
cgroup (v1 or v2, see ``cgroup_v1.py`` and ``cgroup_v2.py``) where the host lets the agent
write one, else the fallback of ``fallback.py`` (prlimit and an RSS watchdog). A group is
the unit for signals: stop, kill, fencing and the watchdog take every process in it, so a
``setsid`` double-fork goes with the rest. The child joins its cgroup before it execs (the
files of :meth:`Group.join_files`, written by a small shell step in front of the command),
so nothing it forks is ever outside.
"""

from __future__ import annotations

import contextlib
import os
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: seconds after a start before the cpu quota applies: an interpreter starting up needs
#: tens of ms of cpu, which a quota of 0.1 core would stretch tenfold
CPU_START_GRACE = 1.0
#: rounds of SIGKILL to every listed process before a group is taken as unkillable for now
KILL_ROUNDS = 50
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Unavailable(Exception):
    """This kind of containment cannot be used on this host (the message says why)."""


@dataclass(frozen=True)
class Limits:
    """What one deployment is held to."""

    #: memory limit in MiB
    memory_mib: float
    #: cores: the cpu quota when ``cpu_hard``, else only the weight (shares)
    cpu: float
    cpu_hard: bool
    #: most processes at once
    pids: int

    @classmethod
    def of(cls, demand_cpu: float, demand_memory: float, limits: dict[str, Any], headroom: float, pids: int) -> Limits:
        """From an algorithm's declared demand and its ``[limits]`` table (which wins)."""
        return cls(
            memory_mib=float(limits.get("memory") or demand_memory * headroom),
            cpu=float(limits.get("cpu") or demand_cpu),
            cpu_hard=bool(limits.get("cpu_hard_limit", True)),
            pids=int(limits.get("pids") or pids),
        )

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mib * 1024 * 1024)

    def describe_oom(self) -> str:
        return f"out of memory (limit {self.memory_mib:g} MiB)"


class Group(ABC):
    """One deployment's processes, as started once (a restart gets a new group)."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.name = name
        self.limits = limits

    def join_files(self) -> list[str]:
        """Files the child writes its pid into before it execs (none: nothing to join)."""
        return []

    def adopt(self, pid: int) -> None:  # noqa: B027 - most groups need nothing after the spawn
        """The group's first process was spawned with ``pid``."""

    def hold_cpu(self) -> None:  # noqa: B027 - the fallback has no cpu limit
        """Apply the cpu quota (a group starts with shares only: see ``CPU_START_GRACE``)."""

    @abstractmethod
    def pids(self) -> list[int]:
        """Every process in the group now."""

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every process of the group; returns how many were signalled."""
        sent = 0
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                sent += 1
        return sent

    def kill(self) -> bool:
        """SIGKILL every process until none is left (forks between rounds are caught by the
        next one; the pids limit bounds them); True when the group is empty."""
        for _ in range(KILL_ROUNDS):
            if not self.signal(signal.SIGKILL) and not self.pids():
                return True
        return not self.pids()

    @abstractmethod
    def oom_killed(self) -> bool:
        """True when a process of the group was killed at the group's memory limit."""

    @abstractmethod
    def memory(self) -> int:
        """Bytes of memory the group uses now."""

    @abstractmethod
    def cpu_seconds(self) -> float:
        """cpu seconds the group has used (a counter: rates come from two readings)."""

    def check(self) -> bool:
        """Called often by the supervisor: False when the group must be killed (over its
        memory limit where no kernel enforces it)."""
        return True

    @abstractmethod
    def remove(self) -> bool:
        """Drop the group once its processes are gone; False while it cannot be yet."""


class Containment(ABC):
    """A way to contain deployments on this host."""

    #: what the node reports: "cgroup v1", "cgroup v2" or "none (rss watchdog)"
    mode: str = ""
    #: why this mode (a fallback says what it could not use)
    note: str = ""

    @abstractmethod
    def create(self, name: str, limits: Limits, uid: int | None = None) -> Group:
        """A new group for a process about to start (under ``uid``, when it has its own)."""

    def removed(self, group: Group) -> None:  # noqa: B027 - only weights kept per node need it
        """``group`` was removed."""

    def close(self) -> None:  # noqa: B027 - the fallback keeps nothing on the host
        """Remove this agent's own directories (its groups are gone: the agent stops)."""

    def cleanup_stale(self) -> int:
        """Empty and remove groups left by agents that died; returns how many."""
        return 0


def write(path: Path | str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def read_pids(path: Path | str) -> list[int]:
    try:
        with open(path) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def read_keyed(path: Path | str) -> dict[str, int]:
    """A file of ``key value`` lines (memory.stat, memory.events, cpu.stat, oom_control)."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = int(value)
    except OSError:
        pass
    return out


def proc_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (from /proc), for groups without a cpu counter."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / _CLOCK_TICKS


def proc_rss(pids: list[int]) -> int:
    """Resident bytes of these processes that are their own: resident minus shared (file
    and shmem) pages, from /proc/PID/statm. What a memory cgroup would charge them, near
    enough: the C library's pages every process maps do not count against each of them."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                fields = f.read().split()
            total += max(0, int(fields[1]) - int(fields[2])) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (exited, not yet reaped by its parent) does not: an
    agent killed with ``kill -9`` stays one until its launcher reaps it, and what it left is
    swept meanwhile."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc to tell: it answered the signal
        return True
