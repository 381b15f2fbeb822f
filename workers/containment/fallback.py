"""The fallback where no cgroup can be written: ``prlimit`` and an RSS watchdog.

What it gives: a deployment whose resident memory passes its limit is killed by the
supervisor's watchdog (checked a few times a second, so a fast allocation can overshoot
for that long) and reported out of memory; with a uid of its own, every process of that
uid is the group (a ``setsid`` double-fork included) and ``RLIMIT_NPROC`` is its pids
limit. What it gives up: no cpu limit at all; no kernel enforcement of memory between two
checks; under a shared user (``DM_RUN_AS``, or a non-root agent) the group is the process
tree of the first process, so a process that leaves it with ``setsid`` and a double-fork
escapes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess

from workers.containment.base import Containment, Group, Limits, alive, proc_cpu_seconds, proc_rss

_KILL = shutil.which("kill")
_SETPRIV = shutil.which("setpriv")


class FallbackGroup(Group):
    def __init__(self, name: str, limits: Limits, uid: int | None) -> None:
        super().__init__(name, limits)
        #: the deployment's own uid (never a shared one): its processes are the group
        self.uid = uid
        self.leader: int | None = None
        self.over = False

    def adopt(self, pid: int) -> None:
        self.leader = pid
        if self.uid is not None:
            # set on the first process while it execs: a fork bomb may get a few forks in before
            with contextlib.suppress(OSError):
                resource.prlimit(pid, resource.RLIMIT_NPROC, (self.limits.pids, self.limits.pids))

    def pids(self) -> list[int]:
        if self.uid is not None:
            return uid_pids(self.uid)
        if self.leader is None:
            return []
        return ([self.leader] if alive(self.leader) else []) + descendants(self.leader)

    def kill(self) -> bool:
        if self.uid is not None and _SETPRIV and _KILL and self.pids():
            # kill(-1) from inside the uid: the kernel signals every process of it at once
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [_SETPRIV, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--",
                     _KILL, "-s", "KILL", "--", "-1"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5,
                )  # fmt: skip
        elif self.leader is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.leader, signal.SIGKILL)
        return super().kill()

    def check(self) -> bool:
        if self.memory() > self.limits.memory_bytes:
            self.over = True
            return False
        return True

    def oom_killed(self) -> bool:
        return self.over

    def memory(self) -> int:
        return proc_rss(self.pids())

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pids())

    def remove(self) -> bool:
        return True


class Fallback(Containment):
    mode = "none (rss watchdog)"

    def __init__(self, note: str) -> None:
        self.note = note

    def create(self, name: str, limits: Limits, uid: int | None = None) -> Group:
        return FallbackGroup(name, limits, uid)


def uid_pids(uid: int) -> list[int]:
    """Every process whose /proc entry belongs to ``uid``."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """Child pids from /proc/<pid>/task/*/children, recursively: no scan of every process
    on the host (psutil's children() reads them all, about 2 ms a sample)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out
