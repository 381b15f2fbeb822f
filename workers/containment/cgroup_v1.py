"""Containment by cgroup v1: a directory per deployment in each of the ``memory``, ``cpu``
(and ``cpuacct`` and ``pids``, where mounted) hierarchies, below the agent's own cgroup.

Layout: ``<hierarchy>/<agent's cgroup>/dm-node-<id>-<agent pid>/<group>``. The agent stays
in its own cgroup, outside every group; a cgroup's OOM kill only picks inside that cgroup.

cpu weights: a group weighs its declared cores (``cpu.shares`` = cores x 1024) but never less
than one ordinary process (1024), so an algorithm declaring 0.1 core does not start ten
times slower on a busy host than it did uncontained; the node's directory weighs the sum of
its groups (it competes with the host's other processes as its algorithms would one by one).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from workers.containment.base import (
    Containment,
    Group,
    Limits,
    Unavailable,
    alive,
    proc_cpu_seconds,
    read_keyed,
    read_pids,
    write,
)
from workers.containment.mounts import V1_CONTROLLERS, own_dir, read_mounts, read_own

#: the cfs period the cpu quota is given against (the kernel's default)
CFS_PERIOD_US = 100_000
_SCOPE = re.compile(r"dm-node-.+-(\d+)$")
#: cpu.shares of one ordinary process
SHARES = 1024


def _unique(dirs: dict[str, Path]) -> list[Path]:
    return list(dict.fromkeys(dirs.values()))


class CgroupV1Group(Group):
    def __init__(self, name: str, limits: Limits, dirs: dict[str, Path]) -> None:
        super().__init__(name, limits)
        self.dirs = dirs

    def join_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in _unique(self.dirs)]

    def pids(self) -> list[int]:
        return read_pids(self.dirs["memory"] / "cgroup.procs")

    def hold_cpu(self) -> None:
        if self.limits.cpu_hard:
            cpu = self.dirs["cpu"]
            write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            write(cpu / "cpu.cfs_quota_us", str(max(1000, round(self.limits.cpu * CFS_PERIOD_US))))

    def oom_killed(self) -> bool:
        control = read_keyed(self.dirs["memory"] / "memory.oom_control")
        if "oom_kill" in control:
            return control["oom_kill"] > 0
        failcnt = read_pids(self.dirs["memory"] / "memory.failcnt")  # kernels before 4.13
        return bool(failcnt) and failcnt[0] > 0

    def memory(self) -> int:
        usage = read_pids(self.dirs["memory"] / "memory.usage_in_bytes")
        stat = read_keyed(self.dirs["memory"] / "memory.stat")
        # what it cannot give back: without the page cache it could drop (the working set)
        return max(0, (usage[0] if usage else 0) - stat.get("total_inactive_file", 0))

    def cpu_seconds(self) -> float:
        if "cpuacct" in self.dirs:
            usage = read_pids(self.dirs["cpuacct"] / "cpuacct.usage")
            if usage:
                return usage[0] / 1e9
        return proc_cpu_seconds(self.pids())

    def remove(self) -> bool:
        done = True
        for d in _unique(self.dirs):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                done = False
        return done


class CgroupV1(Containment):
    mode = "cgroup v1"

    def __init__(self, dirs: dict[str, Path]) -> None:
        #: controller -> this agent's directory in that controller's hierarchy
        self.dirs = dirs
        #: cpu.shares of each group
        self.weights: dict[str, int] = {}

    def removed(self, group: Group) -> None:
        if self.weights.pop(group.name, None) is not None:
            self._reweigh()

    def _reweigh(self) -> None:
        try:
            write(self.dirs["cpu"] / "cpu.shares", str(max(2, sum(self.weights.values()))))
        except OSError:
            pass  # the groups' own weights still hold among themselves

    @classmethod
    def probe(
        cls, scope: str, mountinfo: Path = Path("/proc/self/mountinfo"), cgroup_file: Path = Path("/proc/self/cgroup")
    ) -> CgroupV1:
        mounts = [m for m in read_mounts(mountinfo) if m.fstype == "cgroup"]
        own = read_own(cgroup_file)
        dirs: dict[str, Path] = {}
        for controller in V1_CONTROLLERS:
            mount = next((m for m in mounts if controller in m.controllers), None)
            where = own_dir(mount, own.get(controller, "/")) if mount is not None else None
            if where is not None:
                dirs[controller] = where / f"dm-{scope}"
        missing = [c for c in ("memory", "cpu") if c not in dirs]
        if missing:
            raise Unavailable(f"no cgroup v1 {' or '.join(missing)} hierarchy is mounted")
        for d in _unique(dirs):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise Unavailable(f"cannot write the cgroup {d}: {exc.strerror}") from exc
        return cls(dirs)

    def create(self, name: str, limits: Limits, uid: int | None = None) -> Group:
        dirs = {c: d / name for c, d in self.dirs.items()}
        group = CgroupV1Group(name, limits, dirs)
        try:
            for d in _unique(dirs):
                d.mkdir(exist_ok=True)
            memory = dirs["memory"]
            write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():  # no swapping past the limit either
                write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            write(dirs["cpu"] / "cpu.shares", str(shares(limits)))
            self.weights[name] = shares(limits)
            self._reweigh()
            if "pids" in dirs:
                write(dirs["pids"] / "pids.max", str(limits.pids))
        except OSError:
            group.remove()
            raise
        return group

    def close(self) -> None:
        for d in _unique(self.dirs):
            with contextlib.suppress(OSError):
                d.rmdir()

    def cleanup_stale(self) -> int:
        """Scopes of agents that are gone (a kill -9 leaves them, maybe with a double-forked
        process inside): kill what is left in them and remove them."""
        removed = 0
        mine = {d.name for d in self.dirs.values()}
        for parent in {d.parent for d in self.dirs.values()}:
            with contextlib.suppress(OSError):
                for entry in os.scandir(parent):
                    match = _SCOPE.match(entry.name)
                    if not entry.is_dir() or match is None or entry.name in mine or alive(int(match.group(1))):
                        continue
                    for sub in [Path(entry.path, s) for s in os.listdir(entry.path)]:
                        if sub.is_dir():
                            CgroupV1Group(sub.name, Limits(0, 0, False, 0), {"memory": sub}).kill()
                            with contextlib.suppress(OSError):
                                sub.rmdir()
                    with contextlib.suppress(OSError):
                        Path(entry.path).rmdir()
                        removed += 1
        return removed


def shares(limits: Limits) -> int:
    return max(SHARES, round(limits.cpu * SHARES))
