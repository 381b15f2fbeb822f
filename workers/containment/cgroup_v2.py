"""Containment by cgroup v2: a cgroup per deployment below the agent's own, with
``memory.max``, ``cpu.max`` / ``cpu.weight`` and ``pids.max``.

Layout: ``<agent's cgroup>/dm/node-<id>-<agent pid>/<group>``. v2 lets a cgroup enable
controllers for its children only while it holds no process itself, so when the agent's
cgroup holds the agent alone, the agent first moves into a leaf of its own
(``<agent's cgroup>/dm-agent-<pid>``); when other processes share it, the host must
delegate a cgroup to the agent (systemd ``Delegate=yes``), and until then this mode is
unavailable and the node says why.
"""

from __future__ import annotations

import os
from pathlib import Path

from workers.containment.base import Containment, Group, Limits, Unavailable, read_keyed, read_pids, write
from workers.containment.mounts import own_dir, read_mounts, read_own

CONTROLLERS = ("memory", "cpu", "pids")
#: the period cpu.max gives its quota against
CPU_PERIOD_US = 100_000


class CgroupV2Group(Group):
    def __init__(self, name: str, limits: Limits, path: Path) -> None:
        super().__init__(name, limits)
        self.path = path

    def join_files(self) -> list[str]:
        return [str(self.path / "cgroup.procs")]

    def pids(self) -> list[int]:
        return read_pids(self.path / "cgroup.procs")

    def hold_cpu(self) -> None:
        if self.limits.cpu_hard:
            write(self.path / "cpu.max", f"{max(1000, round(self.limits.cpu * CPU_PERIOD_US))} {CPU_PERIOD_US}")

    def kill(self) -> bool:
        kill = self.path / "cgroup.kill"  # 5.14+: the kernel kills them all at once, forks included
        if kill.exists():
            try:
                write(kill, "1")
            except OSError:
                pass
        return super().kill()

    def oom_killed(self) -> bool:
        return read_keyed(self.path / "memory.events").get("oom_kill", 0) > 0

    def memory(self) -> int:
        current = read_pids(self.path / "memory.current")
        inactive = read_keyed(self.path / "memory.stat").get("inactive_file", 0)
        return max(0, (current[0] if current else 0) - inactive)

    def cpu_seconds(self) -> float:
        return read_keyed(self.path / "cpu.stat").get("usage_usec", 0) / 1e6

    def remove(self) -> bool:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True


class CgroupV2(Containment):
    mode = "cgroup v2"

    def __init__(self, scope_dir: Path) -> None:
        self.scope_dir = scope_dir

    @classmethod
    def probe(
        cls,
        scope: str,
        mountinfo: Path = Path("/proc/self/mountinfo"),
        cgroup_file: Path = Path("/proc/self/cgroup"),
        pid: int | None = None,
    ) -> CgroupV2:
        pid = os.getpid() if pid is None else pid
        mount = next((m for m in read_mounts(mountinfo) if m.fstype == "cgroup2"), None)
        if mount is None:
            raise Unavailable("no cgroup v2 hierarchy is mounted")
        base = own_dir(mount, read_own(cgroup_file).get("", "/"))
        if base is None:
            raise Unavailable(f"this process's cgroup is not visible under {mount.point}")
        available = set((_read(base / "cgroup.controllers") or "").split())
        missing = [c for c in CONTROLLERS if c not in available]
        if missing:
            raise Unavailable(f"the cgroup v2 hierarchy at {base} offers no {', '.join(missing)} controller")
        dm_dir = base / "dm"
        try:
            dm_dir.mkdir(exist_ok=True)
            if not _enable(base):
                # the agent's own cgroup holds processes: move the agent into a leaf when it is alone there
                others = [p for p in read_pids(base / "cgroup.procs") if p != pid]
                if others:
                    raise Unavailable(
                        f"the cgroup {base} holds other processes too: delegate a cgroup of its own to the agent"
                    )
                leaf = base / f"dm-agent-{pid}"
                leaf.mkdir(exist_ok=True)
                write(leaf / "cgroup.procs", str(pid))
                if not _enable(base):
                    raise Unavailable(f"cannot enable {', '.join(CONTROLLERS)} in {base}/cgroup.subtree_control")
            scope_dir = dm_dir / scope
            if not _enable(dm_dir):
                raise Unavailable(f"cannot enable {', '.join(CONTROLLERS)} in {dm_dir}/cgroup.subtree_control")
            scope_dir.mkdir(exist_ok=True)
            if not _enable(scope_dir):
                raise Unavailable(f"cannot enable {', '.join(CONTROLLERS)} in {scope_dir}/cgroup.subtree_control")
        except OSError as exc:
            raise Unavailable(f"cannot write the cgroup {dm_dir}: {exc.strerror}") from exc
        return cls(scope_dir)

    def close(self) -> None:
        try:
            self.scope_dir.rmdir()
        except OSError:
            pass

    def create(self, name: str, limits: Limits, uid: int | None = None) -> Group:
        path = self.scope_dir / name
        group = CgroupV2Group(name, limits, path)
        try:
            path.mkdir(exist_ok=True)
            write(path / "memory.max", str(limits.memory_bytes))
            if (path / "memory.swap.max").exists():  # no swapping past the limit either
                write(path / "memory.swap.max", "0")
            # never less than one ordinary process (100), as with v1's shares
            write(path / "cpu.weight", str(min(10_000, max(100, round(limits.cpu * 100)))))
            write(path / "cpu.max", f"max {CPU_PERIOD_US}")  # the quota comes after the start: hold_cpu
            write(path / "pids.max", str(limits.pids))
        except OSError:
            group.remove()
            raise
        return group


def _enable(cgroup: Path) -> bool:
    """Enable the controllers for ``cgroup``'s children; False when the kernel refuses."""
    wanted = set(CONTROLLERS)
    if wanted <= set((_read(cgroup / "cgroup.subtree_control") or "").split()):
        return True
    try:
        write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
    except OSError:
        return False
    return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
