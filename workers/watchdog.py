"""The fence watchdog: a small process forked by the agent that kills the node's algorithms
when the agent has not renewed its lease in time, and when the agent dies.

The agent itself kills its algorithms when it notices it cannot reach Redis, but an
agent that is frozen (SIGSTOP, a stuck host thread, swapping) notices nothing. The
watchdog is a separate process, so it keeps watching: the agent writes
``{"valid_until": t, "pgids": [...], "cgroups": [...], "uids": [...]}`` to a state file on
each lease renewal and each spawn, and when ``valid_until`` passes, the watchdog kills
every listed process group, every process in each listed cgroup (its ``cgroup.procs``
file: a ``setsid`` double-fork is in there too) and every process of each listed uid (a
deployment's own uid, under the fallback without cgroups). ``valid_until`` is a fraction
of the lease TTL after the renewal, so the algorithms are gone before the lease expires
and the heartbeat manager starts them elsewhere.

When the agent dies (its death signal), the watchdog kills the same set before it exits:
``PR_SET_PDEATHSIG`` only reaches the agent's direct children, not what they double-forked.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.containment.base import alive

#: part of the lease TTL after a renewal at which an unrenewed node kills its algorithms
FENCE_FRACTION = 0.75
POLL = 0.05
#: longest sleep between two looks at the state file (new process groups show up by then)
MAX_WAIT = 0.25
#: rounds of SIGKILL over a cgroup's or uid's processes (forks between rounds are caught next)
KILL_ROUNDS = 20


#: where the state file lives when the host has it (a tmpfs on Linux): a rename over the old
#: file there takes microseconds, where ext4 flushes the new file's data first (0.14 ms alone,
#: 0.4 ms in a busy agent, measured; the agent rewrites the file on every spawn)
TMPFS = Path("/dev/shm")
#: the prefix of the private directories made there
TMPFS_PREFIX = "dm-node-"


#: seconds since a tmpfs state directory of an agent that is gone last changed before another
#: agent's start removes it: its own watchdog removes it in well under a second after the final
#: kill, and a live agent rewrites its file on every lease renewal
SWEEP_AFTER = 600.0


def state_file(home: Path, node_id: str) -> Path:
    """Where the agent of ``node_id`` keeps the state: in a directory of its own on the host's
    tmpfs (0700, a random name after the agent's pid: no one else's file is taken for it), else
    in ``home/nodes``. The watchdog removes a tmpfs one when it exits; what agents killed with
    their watchdogs left is swept first (:func:`sweep`)."""
    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK | os.X_OK):
        sweep(TMPFS)
        try:
            return Path(tempfile.mkdtemp(prefix=f"{TMPFS_PREFIX}{node_id}-pid{os.getpid()}-", dir=TMPFS)) / "fence"
        except OSError:
            pass
    path = home / "nodes" / f"node-{node_id}.fence"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def forget(path: Path) -> None:
    """Remove a state file made by :func:`state_file` on the tmpfs, with its directory (one in
    ``home/nodes`` stays, as before: it shows what the node ran last)."""
    if path.parent.parent == TMPFS and path.parent.name.startswith(TMPFS_PREFIX):
        _remove(path)


def _remove(path: Path) -> None:
    """A state file, its temporary one and their directory (left if anything else is in it)."""
    for leftover in (path, _tmp(path)):
        with contextlib.suppress(OSError):
            leftover.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def sweep(root: Path, now: float | None = None) -> list[Path]:
    """Remove the state directories under ``root`` of agents that are gone and whose watchdogs
    did not remove them (both killed at once: a SIGKILL of the agent's process group); returns
    those removed. One is gone when it is this user's, its name holds its agent's pid (older
    names hold none and are kept), no process runs with that pid (a zombie does not), and
    nothing in it changed for :data:`SWEEP_AFTER` seconds."""
    now = time.time() if now is None else now
    removed = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            pid = _owner(entry.name)
            if pid is None or alive(pid):
                continue
            try:
                info = entry.lstat()
                if info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):  # lstat: a link is not one
                    continue
                changed = max([info.st_mtime] + [f.lstat().st_mtime for f in entry.iterdir()])
            except OSError:
                continue
            if now - changed < SWEEP_AFTER:
                continue
            _remove(entry / "fence")
            if not entry.exists():
                removed.append(entry)
    return removed


def _owner(name: str) -> int | None:
    """The agent pid in a state directory's name (``dm-node-<id>-pid<pid>-<random>``), if any."""
    if not name.startswith(TMPFS_PREFIX):
        return None
    parts = name[len(TMPFS_PREFIX) :].rsplit("-", 2)
    pid = parts[1][3:] if len(parts) == 3 and parts[1].startswith("pid") else ""
    return int(pid) if pid.isdigit() else None


def _tmp(path: Path) -> Path:
    """The file a new state is written to before it is renamed over ``path``."""
    return path.with_name(path.name + ".tmp")


def write_state(
    path: Path,
    valid_until: float,
    pgids: list[int],
    cgroups: list[str] | None = None,
    uids: list[int] | None = None,
    held: list[dict[str, Any]] | None = None,
) -> None:
    """``held``: sets ({keep_for, pgids, cgroups, uids}) of deployments that keep running on a
    cut-off node for ``keep_for`` seconds past ``valid_until`` (``[disconnect] keep_for``)."""
    tmp = _tmp(path)
    tmp.write_text(json.dumps({"valid_until": valid_until, "pgids": pgids, "cgroups": cgroups or [],
                               "uids": uids or [], "held": held or []}))  # fmt: skip
    tmp.replace(path)


def kill_all(state: dict[str, Any]) -> None:
    """SIGKILL every process group, cgroup member and uid process the state lists."""
    for pgid in state.get("pgids", []):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pgid), signal.SIGKILL)
    cgroups = [str(p) for p in state.get("cgroups", [])]
    uids = {int(u) for u in state.get("uids", [])}
    for _ in range(KILL_ROUNDS):
        pids = [pid for procs in cgroups for pid in _read_pids(procs)] + (_uid_pids(uids) if uids else [])
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def watch(path: Path, parent: int) -> None:
    """Loop until the agent is gone; kill the listed processes while the state is stale,
    and once more when the agent dies.

    The death signal is blocked and waited for (``sigtimedwait``), never handled: a handler
    runs wherever the interpreter is, and one that raised between the loop's end and the final
    kill (the loop saw the agent gone first) skipped the kill, in about one agent death of
    forty on a loaded host."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # before it can be sent: kept pending
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG: told when the agent dies
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("-1000")  # never the OOM killer's choice (root only)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state: dict[str, Any] | None = None
    while os.getppid() == parent:  # an agent that died before the prctl: its child has a new parent
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # keep the last state read: the agent may be rewriting it
        wait = POLL
        if state:
            now = time.time()
            left = float(state["valid_until"]) - now
            if left < 0:
                kill_all(state)
                for held in state.get("held") or []:  # kept running cut off: until their own deadline
                    if left + float(held.get("keep_for") or 0) < 0:
                        kill_all(held)
            else:  # renewals only move the deadline later: no need to look before it
                wait = min(max(left, POLL), MAX_WAIT)
        if signal.sigtimedwait({signal.SIGUSR1}, wait) is not None:
            break  # the agent died
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(path.read_text())
    if state:  # the agent died: everything goes with it, held or not
        kill_all(state)
        for held in state.get("held") or []:
            kill_all(held)
    forget(path)


def start(path: Path) -> int:
    """Fork the watchdog; call before the agent starts any thread."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            watch(path, parent)
        finally:
            os._exit(0)
    return pid


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _uid_pids(uids: set[int]) -> list[int]:
    out = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me:
            with contextlib.suppress(OSError):
                if entry.stat().st_uid in uids:
                    out.append(int(entry.name))
    return out
