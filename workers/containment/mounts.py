"""Where this host mounts its cgroup hierarchies and where this process sits in each.

Read from ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` (paths given, so unit tests
can describe a fake host). A group for the agent's algorithms is made *below* the agent's
own cgroup in each hierarchy, so whatever holds the agent (a container, a sandbox) still
holds its algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: the v1 controllers containment uses
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")


@dataclass(frozen=True)
class Mount:
    fstype: str  # "cgroup" (v1) or "cgroup2"
    root: str  # the hierarchy path mounted here
    point: Path
    controllers: frozenset[str]  # v1: the controllers of this hierarchy; v2: empty


def read_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Mount]:
    out = []
    for line in mountinfo.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(rest[2].split(","))
        controllers = frozenset(options & set(V1_CONTROLLERS)) if rest[0] == "cgroup" else frozenset()
        out.append(Mount(rest[0], _unescape(fields[3]), Path(_unescape(fields[4])), controllers))
    return out


def read_own(cgroup_file: Path = Path("/proc/self/cgroup")) -> dict[str, str]:
    """This process's cgroup per v1 controller, and under ``""`` its v2 cgroup."""
    own: dict[str, str] = {}
    for line in cgroup_file.read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path
    return own


def own_dir(mount: Mount, path: str) -> Path | None:
    """The directory of cgroup ``path`` under ``mount``, or None when the mount does not show it."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    return mount.point / path[len(root) :].lstrip("/")


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
