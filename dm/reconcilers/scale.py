"""The scale-in reconciler: nodes above ``min_nodes`` that ran nothing for ``idle_timeout``
are stopped (they hand back what they hold as they go). Nothing is stopped while work
waits for room. A node its provider cannot stop (started by hand) is remembered as such,
so it costs no registry read on later passes."""

from __future__ import annotations

import time
from typing import Any

from dm import keys as k
from dm.lifecycle import LIVE_NODE, NodeState
from dm.ports import Ports

#: the idle-since mark of a node its provider cannot stop
CANNOT_STOP = "never"


def decide(
    views: list[tuple[str, str, int]], idle_since: dict[str, str], now: float, idle_timeout: float, min_nodes: int
) -> tuple[dict[str, str], list[str], list[str]]:
    """Pure: from (node id, state, deployments) of the live nodes and the idle marks, return
    (marks to set, marks to drop, nodes to stop, in that order of preference)."""
    busy = {n for n, state, count in views if count > 0 or state == NodeState.STARTING}
    drop = sorted(n for n in busy if n in idle_since)
    idle = sorted((n for n, _, _ in views if n not in busy), key=lambda n: idle_since.get(n, repr(now)))
    marks: dict[str, str] = {}
    stop: list[str] = []
    for node_id in idle:
        since = idle_since.get(node_id)
        if since is None:
            marks[node_id] = repr(now)
        elif since != CANNOT_STOP and now - float(since) >= idle_timeout and len(views) - len(stop) > min_nodes:
            stop.append(node_id)
    return marks, drop, stop


def run(ports: Ports, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    s = ports.settings
    views = [(n, state, count) for n, state, count in ports.fleet.live_counts() if state in LIVE_NODE]
    idle_since = ports.fleet.marks(k.IDLE_SINCE)
    marks, drop, candidates = decide(views, idle_since, now, s.idle_timeout, s.min_nodes)
    stopped: list[str] = []
    if candidates and not ports.store.any_waiting():  # work waiting for room keeps every node
        for node_id in candidates:
            if ports.provider.stop_node(node_id):
                drop.append(node_id)
                stopped.append(node_id)
            else:
                marks[node_id] = CANNOT_STOP
    ports.fleet.set_marks(k.IDLE_SINCE, marks, drop=drop)
    return {"scaled_in": stopped}
