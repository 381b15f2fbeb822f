"""Containment of a node's algorithms: a cgroup per deployment (v1 or v2, whichever the
host lets the agent write), else the prlimit and RSS watchdog fallback; and the user
each deployment runs as. :func:`detect` picks the mode once, at the agent's start."""

from __future__ import annotations

from workers.containment.base import Containment, Group, Limits, Unavailable
from workers.containment.cgroup_v1 import CgroupV1
from workers.containment.cgroup_v2 import CgroupV2
from workers.containment.fallback import Fallback
from workers.containment.users import User, Users

__all__ = ["Containment", "Fallback", "Group", "Limits", "User", "Users", "detect"]

#: DM_CONTAINMENT values
AUTO, CGROUP, NONE = "", "cgroup", "none"


def detect(forced: str, scope: str) -> Containment:
    """The containment for this host: ``forced`` is DM_CONTAINMENT ("", "cgroup", "none",
    "cgroup v1", "cgroup v2"); ``scope`` names this agent's cgroups (unique on the host)."""
    want = forced.strip().lower()
    if want in ("none", "off", "rss"):
        return Fallback("DM_CONTAINMENT=none")
    kinds: list[type[CgroupV1] | type[CgroupV2]] = [CgroupV2, CgroupV1]
    if want in ("cgroup v1", "v1"):
        kinds = [CgroupV1]
    elif want in ("cgroup v2", "v2"):
        kinds = [CgroupV2]
    elif want not in (AUTO, "auto", CGROUP):
        from dm.errors import ConfigError

        raise ConfigError(f"DM_CONTAINMENT={forced!r} is not a mode: use cgroup, none, or leave it unset")
    problems = []
    for kind in kinds:
        try:
            return kind.probe(scope)
        except (Unavailable, OSError) as exc:
            problems.append(f"{kind.mode}: {exc}")
    if want:
        from dm.errors import ConfigError

        because = "; ".join(problems)
        raise ConfigError(f"DM_CONTAINMENT={forced} but {because}; unset it to fall back to the rss watchdog")
    return Fallback("; ".join(problems))
