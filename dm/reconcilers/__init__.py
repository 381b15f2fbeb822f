"""The reconcilers: each compares what should be with what is, and acts on the difference.

- :mod:`.detect`, task ``dm.detect`` (every ``heartbeat_interval``): a node whose presence
  connection closed, whose agent exited or whose lease expired becomes ``dead``; its
  deployments ``lost`` and placed again;
- :mod:`.replace`, ``dm.replace`` (every ``heartbeat_interval``): what a fail-over cut
  short, what was not started in time, and what waits for room are placed; a node is
  added when none has room;
- :mod:`.scale`, ``dm.scale`` (every few seconds): idle nodes above ``min_nodes`` stopped;
- :mod:`.allocations`, ``dm.allocations`` (every 15 s): the fleet's allocations made to
  agree with the registry's active deployments.

Each is a pure decision (a function of what it observed) and an application of it
through :func:`dm.lifecycle.transition` and the ports of :mod:`dm.ports`. Each is
idempotent and safe with several beats and control workers running at once: every move
is a compare-and-set, and no lock is held while a node starts or many deployments are
placed (placement takes the placement lock for one decision at a time). One deployment
that cannot be placed never blocks the others.
"""

from __future__ import annotations

from typing import Any

from dm.ports import Ports
from dm.reconcilers import allocations, detect, replace, scale


def run_all(ports: Ports, now: float | None = None) -> dict[str, Any]:
    """One pass of each (tests and benchmarks; beat runs them as separate tasks)."""
    return {
        "detect": detect.run(ports, now),
        "replace": replace.run(ports, now),
        "scale": scale.run(ports, now),
    }


__all__ = ["allocations", "detect", "replace", "run_all", "scale"]
