"""The fence watchdog: a small process forked by the agent that kills the node's algorithms
when the agent has not renewed its lease in time.

The agent itself kills its algorithms when it notices it cannot reach Redis, but an
agent that is frozen (SIGSTOP, a stuck host thread, swapping) notices nothing. The
watchdog is a separate process, so it keeps watching: the agent writes
``{"valid_until": t, "pgids": [...]}`` to a state file on each lease renewal and each
spawn, and when ``valid_until`` passes, the watchdog kills every listed process group.
``valid_until`` is a fraction of the lease TTL after the renewal, so the algorithms are
gone before the lease expires and the heartbeat manager starts them elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import time
from pathlib import Path

#: part of the lease TTL after a renewal at which an unrenewed node kills its algorithms
FENCE_FRACTION = 0.75
POLL = 0.05
#: longest sleep between two looks at the state file (new process groups show up by then)
MAX_WAIT = 0.25


def write_state(path: Path, valid_until: float, pgids: list[int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"valid_until": valid_until, "pgids": pgids}))
    tmp.replace(path)


def watch(path: Path, parent: int) -> None:
    """Loop until the agent is gone; kill the listed process groups while the state is stale."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the agent
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.getppid() == parent:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = None
        wait = POLL
        if state:
            left = float(state["valid_until"]) - time.time()
            if left < 0:
                for pgid in state.get("pgids", []):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(int(pgid), signal.SIGKILL)
            else:  # renewals only move the deadline later: no need to look before it
                wait = min(max(left, POLL), MAX_WAIT)
        time.sleep(wait)


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
