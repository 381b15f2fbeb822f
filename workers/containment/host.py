"""This node's containment as one object: the mode, whom algorithms run as, where their
files live, and the start of one contained process (``launch``) and its end (``release``).

The supervisor owns the processes' lives (exits, restarts, reports); this module owns how
each one is held. Where files live: ``DM_HOME`` when algorithms run as the agent's user;
otherwise ``DM_RUN_DIR`` (default ``/var/lib/dm/run/<hash of DM_HOME>``), a directory their
uids can pass through but not list, and ``DM_HOME`` (the fleet's URLs, the logs, the fence
files) is made 0700.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dm import keys as k
from dm.control import Control
from dm.package import load_spec
from dm.settings import Settings
from workers.containment import Fallback, detect
from workers.containment import spawn as sp
from workers.containment.base import Group, Limits
from workers.containment.users import User, Users

log = logging.getLogger("workers.supervisor")

#: seconds between two checks of each group's memory where no kernel enforces it (the fallback)
MEMORY_CHECK_INTERVAL = 0.25
#: where algorithms' files live when they run under their own uids (DM_RUN_DIR unset)
RUN_ROOT = Path("/var/lib/dm/run")


class Host:
    def __init__(self, settings: Settings, node_id: str) -> None:
        self.settings = settings
        self.node_id = node_id
        self.home = settings.home
        self.users = Users(settings.uid_range, settings.run_as)
        self.containment = detect(settings.containment, f"node-{node_id}-{os.getpid()}")
        self.containment.cleanup_stale()
        #: as root, the agent is never the OOM killer's choice; its algorithms get a high score
        self.protected = protect_self()
        self.interpreter = sp.interpreter_for_others() if self.users.switches else sys.executable
        self.run_root = self._run_root()
        self.cache = self.run_root / "cache"
        self.work = self.run_root / "work"
        for path in (self.cache, self.work):
            path.mkdir(parents=True, exist_ok=True)
        self._limits: dict[Path, Limits] = {}
        #: groups whose processes did not all die yet: killed again and removed later
        self.leftovers: list[Group] = []

    def _run_root(self) -> Path:
        if not self.users.switches:
            return self.home
        if self.settings.run_dir:
            root, made_below = Path(self.settings.run_dir), Path(self.settings.run_dir).parent
        else:
            key = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
            root, made_below = RUN_ROOT / key, RUN_ROOT.parent.parent
        for d in (root, root / "cache", root / "work"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o711)
        blocked = sp.traversable(root, made_below)
        if blocked:
            log.warning("algorithms under their own uids cannot reach %s: %s is closed to others; set DM_RUN_DIR "
                        "to a directory others can pass through", root, blocked[0])  # fmt: skip
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        return root

    def announce(self, ctl: Control) -> None:
        """Say at start how this node holds its algorithms: in the log, and in its Redis hash
        (fields ``containment`` and ``run_as``) and registry record."""
        mode, users = self.containment.mode, self.users.describe()
        if isinstance(self.containment, Fallback):
            log.warning("node-%s cannot use cgroups (%s): it falls back to prlimit and an rss watchdog (memory "
                        "checked every %gs, no cpu limit)", self.node_id, self.containment.note,
                        MEMORY_CHECK_INTERVAL)  # fmt: skip
        log.warning("node-%s containment: %s; algorithms run as %s", self.node_id, mode, users)
        try:
            ctl.redis.hset(k.NODE.format(self.node_id), mapping={"containment": mode, "run_as": users})
            ctl.registry.upsert_node(self.node_id, containment=mode, run_as=users)
        except Exception as exc:  # the stores are retried by the agent; this is only a label
            log.warning("node-%s could not record its containment: %s", self.node_id, exc)

    def limits(self, package: Path) -> Limits:
        """What the package's algorithm.toml declares, with its [limits] (read once a package)."""
        limits = self._limits.get(package)
        if limits is None:
            spec = load_spec(package)
            s = self.settings
            limits = Limits.of(spec.demand.cpu, spec.demand.memory, spec.limits, s.memory_headroom, s.pids_limit)
            self._limits[package] = limits
        return limits

    def launch(
        self, payload: dict[str, Any], package: Path, restarts: int, log_path: Path
    ) -> tuple[subprocess.Popen[bytes], Group, User | None]:
        """Start a deployment's command in a new group, as its user, output to ``log_path``.
        Raises what stopped it (OSError, ValueError, BadPackage), having given back what it took."""
        dep_id, generation = str(payload["id"]), int(payload["generation"])
        group: Group | None = None
        try:
            limits = self.limits(package)
            user = self.users.acquire(dep_id)
            workdir = self.work / dep_id
            sp.own_workdir(workdir, user)
            env = sp.algorithm_env(os.environ, {
                **(payload.get("env") or {}),
                "DM_ARGS": json.dumps(payload.get("args") or {}),
                "DM_DEPLOYMENT_ID": dep_id,
                "DM_GENERATION": str(generation),
                "DM_NODE_ID": self.node_id,
                "DM_PACKAGE_DIR": str(package),
                "PYTHONUNBUFFERED": "1",
            }, user, workdir)  # fmt: skip
            own_uid = user.uid if user is not None and user.own else None
            group = self.containment.create(f"{dep_id}.{generation}.{restarts}", limits, own_uid)
            command = sp.command_line(payload["command"], package, self.interpreter)
            cmd = sp.argv(command, group, user, self.protected)
            with open(log_path, "ab") as out:
                header = f"--- dm: gen {generation} restart {restarts} on node-{self.node_id} at {time.ctime()}\n"
                out.write(header.encode())
                out.flush()
                popen = subprocess.Popen(
                    cmd,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # a preexec_fn makes Python fork the whole agent instead of using vfork/posix_spawn
                    # (7-11 ms a start against under 1 ms): util-linux's setpriv sets the same death
                    # signal and then execs the command in the same pid and session
                    preexec_fn=None if sp.SETPRIV else sp.die_with_parent,
                )
        except BaseException:
            self.release(dep_id, group)
            raise
        group.adopt(popen.pid)
        if self.protected and not group.join_files():  # no shell step to set it before the exec
            set_oom_score(popen.pid, sp.ALGORITHM_OOM_SCORE_ADJ)
        return popen, group, user

    def release(self, dep_id: str, group: Group | None) -> None:
        """Kill what is left of a deployment's group, remove it, and give back its user."""
        if group is not None:
            group.kill()
            if not group.remove():
                self.leftovers.append(group)
            self.containment.removed(group)
        self.users.release(dep_id)
        sp.lock_workdir(self.work / dep_id)

    def sweep(self) -> None:
        """Kill again and remove the groups that could not be removed before."""
        for group in list(self.leftovers):
            group.kill()
            if group.remove():
                self.leftovers.remove(group)

    def close(self) -> None:
        """The agent stops with nothing running: remove its own cgroup directories."""
        self.sweep()
        if not self.leftovers:
            self.containment.close()


def describe_start_error(exc: BaseException) -> str:
    """What stopped a process from starting, for its deployment's reason."""
    if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
        return "its args and environment are too large for the system (E2BIG): pass less in args"
    if isinstance(exc, ValueError) and "null" in str(exc):
        return f"a NUL byte in its command or environment ({exc})"
    if isinstance(exc, OSError) and exc.errno is not None:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        name = str(exc.filename or "")
        where = f": {name if len(name) <= 80 else '...' + name[-60:]}" if name else ""
        return f"{exc.strerror} ({code}){where}"
    return f"{type(exc).__name__}: {exc}"


def protect_self() -> bool:
    """As root: make the agent the OOM killer's last choice (-1000). True when done."""
    if os.geteuid() != 0:
        return False
    return set_oom_score(os.getpid(), -1000)


def set_oom_score(pid: int, score: int) -> bool:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError:
        return False
    return True
