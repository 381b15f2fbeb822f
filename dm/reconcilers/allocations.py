"""The allocations reconciler: the fleet's allocations (a cache in Redis) made to agree with
the registry's active deployments (the truth). It frees what a move's effect could not
(Redis was away when a deployment ended) and rebuilds what a Redis that lost its data no
longer has, so placement never counts a phantom or misses a real demand for long."""

from __future__ import annotations

import time
from typing import Any

from dm.models import Demand
from dm.ports import Ports

#: seconds an allocation must have existed before it is freed for want of a deployment: the
#: registry is read first, so a deployment placed after the read is not taken for a phantom
FREE_AFTER = 30.0


def diff(truth: dict[str, Demand], held: dict[str, dict[str, Any]], now: float) -> tuple[dict[str, Demand], list[str]]:
    """Pure, for one node: (allocations to add, allocations to free)."""
    add = {dep_id: demand for dep_id, demand in truth.items() if dep_id not in held}
    free = [dep_id for dep_id, a in held.items() if dep_id not in truth and now - float(a.get("ts") or 0) > FREE_AFTER]
    return add, free


def run(ports: Ports, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    truth = ports.store.active_by_node()
    added = freed = 0
    for node_id in sorted(set(truth) | set(ports.fleet.node_hashes())):
        held = ports.fleet.allocations(node_id)
        add, free = diff(truth.get(node_id, {}), held, now)
        for dep_id, demand in add.items():
            ports.fleet.allocate(node_id, dep_id, demand)
        for dep_id in free:
            ports.fleet.release(node_id, dep_id)
        added += len(add)
        freed += len(free)
    return {"added": added, "freed": freed}
